"""Unit tests of trainer/: data schedule, optimizer kernels, bf16 weights, prefetch, job JSON, TorchX component and
Volcano dry run (the checkpoint folder: test_checkpoint.py).

Single process, no torchrun (the multi-process runs are in test_trainer_dist.py).
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from common.config import LaunchConfig, StageConfig
from helpers import TINY_DIT, write_latent_dataset
from models.config import DiTConfig
from trainer import device
from trainer.component import stage_app
from trainer.data import LatentSplit, StepSampler
from trainer.job import StageJob

# ------------------------------------------------------------------------------------------------ data


def test_dataset_reads_train_split_and_top_fraction(tmp_path):
    root = write_latent_dataset(tmp_path / "lat", n_clips=8, n_val=2)
    ds = LatentSplit(root)
    assert len(ds) == 6 and "clip0000" not in ds.clip_ids
    latent, text, mask = ds.load(0)
    assert latent.shape == (24, 3, 8, 8) and text.shape == (16, 64) and mask.dtype == torch.bool
    best = LatentSplit(root, top_fraction=0.5)                      # scores = clip index: best are 5, 6, 7
    assert sorted(best.clip_ids) == ["clip0005", "clip0006", "clip0007"]
    b = best.batch([0, 1])
    assert b.latents_BCTHW.shape == (2, 24, 3, 8, 8) and b.text_mask_BL.shape == (2, 16)


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="latents dir not found"):
        LatentSplit(tmp_path / "missing")
    root = write_latent_dataset(tmp_path / "allval", n_clips=2, n_val=2)
    with pytest.raises(ValueError, match="'train' split is empty"):
        LatentSplit(root)


def _tokens(shape, patch=(1, 2, 2)):
    return shape[1] * shape[2] * shape[3] // (patch[0] * patch[1] * patch[2])


def test_sampler_is_deterministic_bucketed_and_covers_the_epoch():
    shapes = [(24, 3, 8, 8)] * 7 + [(24, 3, 8, 16)] * 5
    a, b = StepSampler(shapes, 2, 2, seed=7), StepSampler(shapes, 2, 2, seed=7)
    assert a.batches_per_epoch == 4                                        # 4 + 3 micro-batches over 2 ranks
    for step in range(12):
        r0, r1 = a.indices(step, 0), a.indices(step, 1)
        assert r0 == b.indices(step, 0) and r1 == b.indices(step, 1)       # pure function of (seed, step)
        assert len(r0) == len(r1) == 2
        assert len({shapes[i] for i in r0}) == 1 and len({shapes[i] for i in r1}) == 1   # one bucket per micro-batch
        assert a.step_tokens(step) == [2 * _tokens(shapes[r0[0]]), 2 * _tokens(shapes[r1[0]])]
    for epoch in range(3):
        seen = {i for s in range(4 * epoch, 4 * epoch + 4) for i in a.global_indices(s)}
        assert seen == set(range(12))                                      # every sample seen each epoch
    fresh = StepSampler(shapes, 2, 2, seed=7)
    assert fresh.indices(9, 1) == a.indices(9, 1)                          # resume: same batch without history
    other = StepSampler(shapes, 2, 2, seed=8)
    assert [other.global_indices(s) for s in range(4)] != [a.global_indices(s) for s in range(4)]


@pytest.mark.parametrize("seed", range(5))
def test_sampler_balances_tokens_across_dp_ranks(seed):
    """Random bucket sizes and shapes: per step, the DP ranks' token counts are as close as a sort-and-group of the
    epoch's micro-batches allows, i.e. never worse than any split of the same micro-batches into steps of dp."""
    import random

    rnd = random.Random(seed)
    kinds = [(24, t, h, w) for t in (1, 3, 5) for h, w in ((8, 8), (8, 16), (16, 16))]
    shapes = [rnd.choice(kinds) for _ in range(rnd.randint(20, 60))]
    dp = rnd.choice([2, 3, 4])
    for budget in (0, 256):
        s = StepSampler(shapes, 2, dp, seed=seed, tokens_per_micro_batch=budget)
        steps = range(s.batches_per_epoch)
        micro = sorted((t for st in steps for t in s.step_tokens(st)), reverse=True)
        spread = sum(max(s.step_tokens(st)) - min(s.step_tokens(st)) for st in steps)
        # lower bound: sorted groups of dp minimise the summed spread of a partition into groups of dp
        best = sum(max(micro[k:k + dp]) - min(micro[k:k + dp]) for k in range(0, len(micro), dp))
        assert spread == best
        for st in steps:
            for r in range(dp):
                idx = s.indices(st, r)
                assert len({shapes[i] for i in idx}) == 1                  # same bucket per micro-batch
                if budget:
                    assert len(idx) == max(1, budget // _tokens(shapes[idx[0]]))   # token budget sets the size
        assert {i for st in steps for i in s.global_indices(st)} == set(range(len(shapes)))


def test_lr_schedule():
    from trainer.optim import lr_at

    assert [lr_at(s, 1.0, 2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]          # warmup, then constant
    cos = [lr_at(s, 1.0, 2, "cosine", 0.1, 12) for s in range(12)]
    assert cos[:2] == [0.5, 1.0] and cos[-1] == pytest.approx(0.1) and cos[6] == pytest.approx(0.55, abs=0.1)
    assert all(x >= y for x, y in zip(cos[1:], cos[2:]))                        # monotone decay
    lin = [lr_at(s, 1.0, 0, "linear", 0.0, 11) for s in range(11)]
    assert lin == pytest.approx([1.0 - 0.1 * s for s in range(11)])
    with pytest.raises(ValueError, match="lr_schedule must be"):
        StageConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="min_lr must be in"):
        StageConfig(lr=1e-4, min_lr=1e-3)


def test_activation_checkpointing_is_exact():
    from models.dit import MUGDiT
    from trainer.parallel.recompute import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = DiTConfig(**TINY_DIT, caption_dropout_prob=0.0)
    ref, ac = MUGDiT(cfg), MUGDiT(cfg)
    ac.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), ac.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            q.copy_(p)
    apply_activation_checkpointing(ac)
    assert sorted(ac.state_dict()) == sorted(ref.state_dict())
    x, text = torch.randn(2, 24, 3, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    args = (x, torch.tensor([10.0, 700.0]), text, torch.ones(2, 16, dtype=torch.bool))
    for m in (ref, ac):
        m(*args).square().mean().backward()
    for (n, p), q in zip(ref.named_parameters(), ac.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_peak_flops_default_env_and_override(monkeypatch):
    from trainer import device

    rt = device.Runtime(torch.device("cpu"), "gloo", torch.float32)
    monkeypatch.delenv(device.PEAK_ENV, raising=False)
    assert device.peak_flops_per_s(rt) == device.PEAK_FLOPS_CPU_FP32_PER_THREAD * torch.get_num_threads()
    monkeypatch.setenv(device.PEAK_ENV, "2.5")
    assert device.peak_flops_per_s(rt) == 2.5e12
    assert device.peak_flops_per_s(rt, tflops=7.0) == 7e12


@pytest.fixture
def one_thread():
    """One intra-op thread, as the trainer's workers have (OMP_NUM_THREADS): on shared cores two threads make the tiny
    model's steps ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_model(seed: int = 0):
    from models.dit import MUGDiT

    torch.manual_seed(seed)
    model = MUGDiT(DiTConfig(**TINY_DIT, caption_dropout_prob=0.0))
    model.y_embedder.dropout_prob = 0.0
    return model


def test_adam_kernels_are_bitwise_equal_on_cpu(one_thread):
    """stage.optimizer_impl: fused, foreach and the per-tensor loop give the same weights and Adam state after 3
    steps (weight decay on); "auto" is foreach on CPU, fused on CUDA."""
    from trainer.optim import adam_impl, build_optimizer

    assert (adam_impl("auto", torch.device("cpu")), adam_impl("auto", torch.device("cuda"))) == ("foreach", "fused")
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 24, 3, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    args = (x, torch.tensor([10.0, 700.0]), text, torch.ones(2, 16, dtype=torch.bool))
    result = {}
    for impl in ("for_loop", "foreach", "fused"):
        model = _tiny_model()
        opt, _ = build_optimizer(StageConfig(lr=1e-2, weight_decay=0.1, optimizer_impl=impl), model.cfg, model, None)
        assert opt.defaults["foreach"] == (impl == "foreach") and opt.defaults["fused"] == (impl == "fused")
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(*args).square().mean().backward()
            opt.step()
        result[impl] = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()["state"])
    ref, ref_state = result["for_loop"]
    for impl in ("foreach", "fused"):
        sd, state = result[impl]
        assert all(torch.equal(sd[k], ref[k]) for k in ref), impl
        assert all(torch.equal(state[i]["exp_avg_sq"], ref_state[i]["exp_avg_sq"]) for i in ref_state), impl
    with pytest.raises(ValueError, match="optimizer_impl must be 'auto', 'fused', 'foreach' or 'for_loop'"):
        StageConfig(optimizer_impl="apex")


def test_bf16_weights_train_on_fp32_masters(tmp_path, one_thread):
    """stage.bf16_weights on CPU (bf16 autocast; the path CUDA takes by default, not run on a GPU here): during the
    step the parameters are bf16, the gradients of 2 micro-batches are summed in fp32, the optimizer updates fp32
    masters and the bf16 copies follow them; the losses track plain bf16 autocast (fp32 weights re-cast by every
    forward) to bf16 precision over 3 steps."""
    from trainer.data import LatentSplit
    from trainer.optim import build_optimizer
    from trainer.parallel import parallelize
    from trainer.precision import Bf16Weights, bf16_weights_on
    from trainer.train import micro_batch, train_step

    assert bf16_weights_on("auto", torch.bfloat16, 1) and not bf16_weights_on("auto", torch.float32, 1)
    assert not bf16_weights_on("auto", torch.bfloat16, 2)
    with pytest.raises(ValueError, match="bf16_weights 'on' is not supported with pipeline_parallel > 1"):
        StageConfig(bf16_weights="on", pipeline_parallel=2, data_parallel=1)
    StageConfig(bf16_weights="on", checkpoint_format="dist", distributed_optimizer=True)   # megatron's fp32 masters
    lat = write_latent_dataset(tmp_path / "lat")
    stage = StageConfig(name="bf16", data_parallel=1, micro_batches=2, lr=3e-3, warmup_steps=0)
    job = StageJob(stage=stage, dit=DiTConfig(**TINY_DIT), latents_dir=str(lat), output_dir=str(tmp_path / "o"))
    data, rt = LatentSplit(lat), device.Runtime(torch.device("cpu"), "gloo", torch.bfloat16)
    runs = {}
    for on in (True, False):
        model = _tiny_model()
        plan = parallelize(model, device.Layout.single())
        opt, _ = build_optimizer(stage, job.dit, model, plan)
        bf16 = Bf16Weights(model) if on else None
        seen: list = []
        if bf16 is not None:   # a forward hook: the dtype of the weights the forward uses
            model.final_layer.register_forward_hook(
                lambda mod, a, out, seen=seen: seen.append(next(mod.parameters()).dtype))
        losses = []
        for step in range(3):
            micro = [micro_batch(job, data.batch([2 * v, 2 * v + 1]), step, v, 8) for v in (0, 1)]
            losses.append(train_step(job, plan, model, opt, micro, step, rt, bf16=bf16).loss)
        sd = model.state_dict()
        assert all(v.dtype == torch.float32 for v in sd.values())                     # masters: checkpoints, EMA
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
        if bf16 is not None:
            assert seen == [torch.bfloat16] * 6                                        # 3 steps x 2 micro-batches
            assert all(torch.equal(bf16.copies[p], p.detach().to(torch.bfloat16)) for p in bf16.params)
        runs[on] = losses, sd
    (on_losses, on_sd), (off_losses, off_sd) = runs[True], runs[False]
    assert on_losses == pytest.approx(off_losses, rel=2e-2), (on_losses, off_losses)
    start = _tiny_model().state_dict()
    d_on, d_off = (torch.cat([(sd[k] - start[k]).flatten() for k in start]) for sd in (on_sd, off_sd))
    cos = float(d_on @ d_off / (d_on.norm() * d_off.norm()))
    print("bf16 losses", on_losses, "autocast", off_losses, "update cosine", cos)
    assert d_off.norm() > 1e-2 and cos > 0.9, cos   # the same updates up to bf16 rounding


@pytest.mark.parametrize("autocast,bf16_copies,compile_mode", [(False, False, "none"), (True, False, "blocks"),
                                                                (True, True, "none")])
def test_attention_probe_asks_about_the_forwards_tensors(monkeypatch, autocast, bf16_copies, compile_mode):
    """trainer.train.attention_backends (the stage's MLflow tag ``attention_backend`` and its startup line) asks
    models.attention about q, k, v of the dtypes a real forward hands ``attention`` (recorded here): fp32; fp32 q, k
    and bf16 v under bf16 autocast with fp32 weights (QK-norm); all bf16 with bf16 weight copies; under the forward's
    autocast, as compiled blocks do with compile "blocks"."""
    import models.attention as attn
    import models.dit as dit
    from trainer.precision import Bf16Weights
    from trainer.train import attention_backends

    rt = device.Runtime(torch.device("cpu"), "gloo", torch.bfloat16 if autocast else torch.float32)
    model = _tiny_model()
    bf16 = Bf16Weights(model) if bf16_copies else None
    forward: set = set()
    real = dit.attention
    monkeypatch.setattr(dit, "attention", lambda q, k, v, mask=None: (
        forward.add((q.dtype, k.dtype, v.dtype, mask is not None)), real(q, k, v, mask=mask))[1])
    g = torch.Generator().manual_seed(1)
    if bf16 is not None:
        bf16.begin()
    with torch.no_grad(), torch.autocast("cpu", dtype=rt.dtype, enabled=rt.autocast):
        model(torch.randn(2, 24, 3, 8, 8, generator=g), torch.tensor([10.0, 700.0]),
              torch.randn(2, 16, 64, generator=g), torch.ones(2, 16, dtype=torch.bool))
    if bf16 is not None:
        bf16.end()
    probed: set = set()

    def backend(q, k, v, mask=None, compiling=None):
        assert torch.is_autocast_enabled("cpu") == autocast and compiling == (compile_mode == "blocks")
        probed.add((q.dtype, k.dtype, v.dtype, mask is not None))
        return "sdpa:PROBED" if mask is None else "sdpa:MASKED"

    monkeypatch.setattr(attn, "attention_backend", backend)
    job = StageJob(stage=StageConfig(name="s", compile=compile_mode), dit=DiTConfig(**TINY_DIT), latents_dir="l",
                   output_dir="o")
    assert attention_backends(job, rt, model, bf16_copies=bf16_copies) == "self=sdpa:PROBED cross=sdpa:MASKED"
    assert probed == forward and len(forward) == 2, (probed, forward)
    monkeypatch.undo()
    assert attention_backends(job, rt, model, bf16_copies) == "self=sdpa:FLASH_ATTENTION cross=sdpa:FLASH_ATTENTION"


def test_prefetcher_makes_the_next_step_ahead_in_a_thread():
    import threading

    from trainer.data import Prefetcher

    made = []

    def make(step):
        made.append((step, threading.current_thread().name))
        if step == 4:
            raise ValueError("bad clip at step 4")
        return step * 10

    ahead = Prefetcher(make, start=2, end=5)
    assert [ahead.get(2), ahead.get(3)] == [20, 30]
    with pytest.raises(ValueError, match="bad clip at step 4"):   # raised in the step that needs it
        ahead.get(4)
    ahead.close()
    assert [s for s, _ in made] == [2, 3, 4] and all(name.startswith("prefetch") for _, name in made)
    off = Prefetcher(make, start=0, end=2, enabled=False)
    assert off.get(0) == 0 and made[-1] == (0, threading.current_thread().name) and len(made) == 4


# ------------------------------------------------------------------------------------------------ job


def test_job_json_round_trip_and_strictness(tmp_path):
    job = StageJob(stage=StageConfig(name="s1", tensor_parallel=2, data_parallel=1), dit=DiTConfig(**TINY_DIT),
                   latents_dir="/data/lat", output_dir="/out", config_hash="abc")
    path = job.write(tmp_path / "job.json")
    assert StageJob.read(path) == job
    data = json.loads(job.to_json())
    data["stage"]["tensor_paralel"] = 2
    with pytest.raises(ValueError, match="stage.tensor_paralel: unknown config key"):
        StageJob.from_json(json.dumps(data))
    data = json.loads(job.to_json())
    data["stage"]["steps"] = "10"
    with pytest.raises(ValueError, match="stage.steps: expected int"):
        StageJob.from_json(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="job file not found"):
        StageJob.read(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------------ component


def test_component_builds_torchrun_role():
    app = stage_app("runs/s/job.json", nnodes=1, nproc_per_node=2, python="/venv/bin/python", rdzv_port=29512)
    (role,) = app.roles
    cmd = role.args[1]
    assert role.entrypoint == "bash" and role.num_replicas == 1
    assert cmd.startswith("/venv/bin/python -m torch.distributed.run --nnodes 1 --nproc_per_node 2")
    assert "--rdzv_endpoint localhost:29512" in cmd and cmd.endswith("-m trainer.train --job runs/s/job.json")
    assert role.env["OMP_NUM_THREADS"] == "1" and role.env["PYTHONUNBUFFERED"] == "1"
    multi = stage_app("j.json", nnodes=3, nproc_per_node=8, gpu=8, cpu=32).roles[0]
    assert "${${rank0_env}:=localhost}:29500" in multi.args[1].replace("$$", "$") and multi.num_replicas == 3
    assert multi.resource.gpu == 8 and multi.env["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize("kwargs, message", [
    (dict(job_path="job.yaml"), "job_path must be the StageJob .json"),
    (dict(nnodes=0), "nnodes must be >= 1"),
    (dict(nproc_per_node=0), "nproc_per_node must be >= 1"),
    (dict(nproc_per_node=4, gpu=2), r"exceeds the GPUs per node \(gpu=2\).*nproc_per_node=2"),
    (dict(rdzv_port=80), r"rdzv_port must be .*e.g. 29500"),
    (dict(memMB=10), "memMB >= 256"),
    (dict(name="Stage_1"), "e.g. stage-1"),
    (dict(env={"BAD-NAME": "1"}), "env must map variable names"),
    (dict(max_restarts=-1), "max_restarts must be >= 0"),
])
def test_component_validation_names_the_fix(kwargs, message):
    args = dict(job_path="job.json", **kwargs) if "job_path" not in kwargs else kwargs
    with pytest.raises(ValueError, match=message):
        stage_app(**args)


def test_kubernetes_dryrun_is_a_volcano_job():
    from trainer.launch import dryrun_kubernetes

    launch = LaunchConfig(scheduler="kubernetes", image="ghcr.io/acme/trainer:1", queue="gpu-q", namespace="train",
                          cpu=16, gpu=8, memory_mb=65536)
    job = dryrun_kubernetes("/shared/run/job.json", launch, nnodes=2, nproc_per_node=8)
    assert job["kind"] == "Job" and job["apiVersion"].startswith("batch.volcano.sh/")
    assert job["spec"]["queue"] == "gpu-q" and job["spec"]["schedulerName"] == "volcano"   # namespace: set at submit
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 2
    for task in tasks:
        (container,) = task["template"]["spec"]["containers"]
        assert container["image"] == "ghcr.io/acme/trainer:1"
        limits = container["resources"]["limits"]
        assert limits == {"cpu": "16000m", "memory": "65536M", "nvidia.com/gpu": "8"}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["OMP_NUM_THREADS"] == "2" and env["PYTHONUNBUFFERED"] == "1"
        cmd = " ".join(container["command"])
        assert "--nnodes 2 --nproc_per_node 8" in cmd
        assert re.search(r"\$\{(TORCHX_RANK0_HOST|VC_TRAIN_0_HOSTS):=localhost\}:29500", cmd)   # replica 0 / others
        assert "-m trainer.train --job /shared/run/job.json" in cmd


def test_local_launch_keeps_the_callers_pythonpath(tmp_path, monkeypatch):
    """Workers see the repository first and then whatever the caller had on PYTHONPATH (packages carried to a GPU
    machine lived there; the first GPU run lost them)."""
    from trainer import launch as launch_mod

    monkeypatch.setenv("PYTHONPATH", "/opt/extra-site")
    job = StageJob(stage=StageConfig(name="pp"), dit=DiTConfig(**TINY_DIT), latents_dir="l", output_dir="o")
    app = launch_mod._app(job, tmp_path / "job.json", LaunchConfig(scheduler="local_cwd"), 1, 1)
    parts = app.roles[0].env["PYTHONPATH"].split(":")
    assert parts == [str(launch_mod._REPO_ROOT), "/opt/extra-site"]


# ------------------------------------------------------------------------------------------------ trainer CLI


@pytest.mark.parametrize("case, message", [
    ("missing", "latents dir not found"),
    ("empty", "'train' split is empty"),
    ("tp", r"tensor_parallel \(4\) must divide dit.num_heads \(2\)"),
    ("init", "init_checkpoint not found"),
])
def test_trainer_rejects_bad_input_before_starting(tmp_path, capsys, case, message):
    from trainer.train import main

    latents = tmp_path / "missing" if case == "missing" else \
        write_latent_dataset(tmp_path / "lat", n_clips=2, n_val=2 if case == "empty" else 0)
    stage = StageConfig(name="s", data_parallel=1)
    job = StageJob(stage=stage, dit=DiTConfig(**TINY_DIT), latents_dir=str(latents), output_dir=str(tmp_path / "o"),
                   init_checkpoint=str(tmp_path / "nope") if case == "init" else "")
    data = json.loads(job.to_json())
    if case == "tp":   # a job file written by hand: the layout is checked when it is read
        data["stage"]["tensor_parallel"] = 4
    (tmp_path / "job.json").write_text(json.dumps(data))
    assert main(["--job", str(tmp_path / "job.json")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
