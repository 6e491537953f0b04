"""Pipeline parallelism and gradient accumulation (``stage.pipeline_parallel``, ``stage.micro_batches``) through the
real launch path (run_stage -> TorchX local_cwd -> torchrun -> trainer.train) on gloo CPU processes.

One LatentDataset of clips with 50 and 47 tokens ([start, 48 or 45 video tokens, end]) and a depth-2 tiny DiT, so
the pipeline's activations change shape between the micro-batches of one step. Checked: PP=2 (2 processes, 1F1B
over 2 micro-batches of 1 clip, activation recomputation on) gives the losses, grad norms (1e-5 relative) and final
weights (1e-5 absolute) of PP=1 with micro_batches=2 on 1 process and of data_parallel=2 with micro_batches=1 on 2
processes, and so does TP=2 x PP=2 with sequence parallelism (4 processes): the same clips per step (micro-batch m
of DP rank r is the sampler's virtual rank r*M+m) and the same flow inputs (seeded by (seed, step, virtual rank)).
Measured: losses and grad norms equal to the printed digits, weights 2.1e-7 (PP=1, DP=2) and 8.8e-7 (TP2 x PP2 x
SP) apart after 4 steps; megatron's distributed optimizer with micro_batches=2 on 1 process (gradients accumulated
in its DDP buffer, one finish_grad_sync) too (7.7e-7). By hand, 3 steps, the same data: CP=2 x PP=2 5.1e-7, TP=2 x
PP=2 with recomputation 3.0e-7, DP=2 x PP=2 (micro_batches 1) 2.1e-7 from PP=1 with micro_batches=2 (losses equal,
grad norms <= 8.6e-8 relative). The full checkpoint of the PP run holds every key of the unsharded model (stage 1's
blocks gathered to rank 0) and meta.json records pipeline_parallel and micro_batches; tokens/s and samples/s count
both micro-batches. A PP=2 "dist" run whose stage-1 process SIGKILLs itself after step 3 resumes from step 2 and
ends bitwise equal to the uninterrupted run (model, EMA, losses), and its dist/ read whole by one process is the
gathered model.safetensors bitwise (PP=2 -> PP=1 resharding); the same with "full" checkpoints (per-rank AdamW
files, full weights filtered to each stage's keys) was bitwise by hand. PP=2 with megatron's distributed optimizer
(embedders' main_grad summed over PP before the DP reduce, flagged ``shared`` on stage 1 for the grad norm) equals
PP=1 with it (measured: losses equal, grad norms <= 6.2e-8 relative, weights 1.3e-7 after 4 steps; without the
``shared`` flag the grad norms are 5e-5..1.5e-3 relative off from step 2 on, without the PP sum the losses too), and
resumes bitwise after a SIGKILL. Config errors: depth not divisible by PP, and resuming with a changed
pipeline_parallel or micro_batches.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import PipelineConfig, StageConfig, from_dict
from helpers import LAUNCH, ODD_SHAPES, TINY_DIT, TOL, write_latent_dataset
from helpers import load_weights as _weights
from models.config import DiTConfig
from trainer import checkpoint
from trainer.job import StageJob
from trainer.launch import run_stage

DIT2 = {**TINY_DIT, "depth": 2}


def _run(tmp: Path, name: str, latents: Path, out: Path | None = None, **kw) -> tuple[Path, list]:
    stage = StageConfig(**{**dict(name=name, steps=4, lr=1e-3, warmup_steps=2, micro_batch_size=1,
                                  tensor_parallel=1, data_parallel=1, checkpoint_interval=2, keep_checkpoints=3,
                                  seed=1234), **kw})
    out = out or tmp / name
    job = StageJob(stage=stage, dit=DiTConfig(**DIT2), latents_dir=str(latents), output_dir=str(out),
                   config_hash=name)
    lines: list = []
    run_stage(job, job.write(tmp / f"{name}.job.json"), LAUNCH, log_dir=tmp / f"{name}-logs", progress=lines.append)
    return out, lines


def _metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    latents = write_latent_dataset(tmp / "latents", shapes=ODD_SHAPES)
    out = {"pp2": _run(tmp, "pp2", latents, pipeline_parallel=2, micro_batches=2, recompute=True)}
    out["pp1"] = _run(tmp, "pp1", latents, micro_batches=2)
    out["dp2"] = _run(tmp, "dp2", latents, data_parallel=2)
    out["distopt"] = _run(tmp, "distopt", latents, micro_batches=2, checkpoint_format="dist",
                          distributed_optimizer=True)
    out["pp2distopt"] = _run(tmp, "pp2distopt", latents, pipeline_parallel=2, micro_batches=2,
                             checkpoint_format="dist", distributed_optimizer=True)
    out["tp2pp2sp"] = _run(tmp, "tp2pp2sp", latents, pipeline_parallel=2, micro_batches=2, tensor_parallel=2,
                           sequence_parallel=True)
    return tmp, latents, out


def test_steps_mix_token_counts_within_a_step():
    """The schedule below: 2 virtual ranks x 1 clip per step; some step holds a 50- and a 47-token clip."""
    from trainer.data import StepSampler

    shapes = [tuple(s) for s in ODD_SHAPES]
    sampler = StepSampler(shapes, 1, 2, 1234, patch_size=tuple(DiTConfig(**DIT2).patch_size))
    per_step = [{shapes[i] for v in (0, 1) for i in sampler.indices(k, v)} for k in range(4)]
    assert any(len(s) == 2 for s in per_step), per_step


@pytest.mark.timeout(300)   # includes the `runs` fixture's three trainings: 112 s on a 2-vCPU AMD EPYC under CI's load
def test_pp2_equals_pp1_and_dp2(runs):
    _, _, out = runs
    rows = {k: _metrics(v[0]) for k, v in out.items()}
    assert [r["step"] for r in rows["pp2"]] == [1, 2, 3, 4]
    for name in ("pp1", "dp2", "tp2pp2sp", "distopt", "pp2distopt"):
        for a, b in zip(rows["pp2"], rows[name]):
            assert abs(a["loss"] - b["loss"]) <= TOL * abs(b["loss"]), (name, a, b)
            assert abs(a["grad_norm"] - b["grad_norm"]) <= TOL * abs(b["grad_norm"]), (name, a, b)
    last = {k: checkpoint.latest(v[0]) for k, v in out.items()}
    w = {k: _weights(d) for k, d in last.items()}
    assert set(w["pp2"]) == set(w["pp1"])            # rank 0 wrote stage 1's blocks and final layer too
    for name in ("pp1", "dp2", "tp2pp2sp", "distopt", "pp2distopt"):
        diff = max((w["pp2"][k] - w[name][k]).abs().max().item() for k in w[name])
        assert diff < TOL, (name, diff)
        print(name, "max weight difference to pp2", diff)
    # PP=2 + distributed optimizer against PP=1 + distributed optimizer (the same optimizer code, so no Adam-eps
    # rounding difference between the two optimizer paths)
    for a, b in zip(rows["pp2distopt"], rows["distopt"]):
        assert abs(a["loss"] - b["loss"]) <= TOL * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TOL * abs(b["grad_norm"]), (a, b)
    meta = checkpoint.read_meta(last["pp2"])
    assert (meta["pipeline_parallel"], meta["micro_batches"], meta["data_parallel"]) == (2, 2, 1)
    assert set(meta["checksums"]) >= {"model.safetensors", "ema.safetensors", "optim/rank00000.pt",
                                      "optim/rank00001.pt"}
    for r in rows["pp2"]:   # 2 micro-batches of 1 clip per step, both counted
        assert r["samples_per_s"] == pytest.approx(2 / r["step_time_s"])
        assert r["tokens_per_s"] * r["step_time_s"] in (pytest.approx(96), pytest.approx(93), pytest.approx(90))
    lines = out["pp2"][1]
    assert any("pp=2 micro_batches=2" in line for line in lines if line.startswith("launched"))
    from models.dit import MUGDiT, count_params
    n_params = count_params(MUGDiT(DiTConfig(**DIT2)))   # counted over the stages, embedders once
    assert any(line.startswith("stage=pp2 ") and " pp=2 " in line and f"params={n_params} " in line for line in lines)
    print({k: [(r["loss"], r["grad_norm"]) for r in v] for k, v in rows.items()})


def _kill_and_resume(tmp, latents, resume, name: str, kill: str, monkeypatch, **kw) -> None:
    """Run a 4-step stage whose process ``kill`` ("rank:step", step 3) SIGKILLs itself, check it saved step 2, rerun
    it and check it started from there."""
    from trainer.train import KILL_ENV

    monkeypatch.setenv(KILL_ENV, kill)
    with pytest.raises(RuntimeError, match="ended FAILED"):
        _run(tmp, f"{name}-a", latents, out=resume, **kw)
    monkeypatch.delenv(KILL_ENV)
    saved = checkpoint.latest(resume)
    assert saved is not None and saved.name == "step_00000002"
    _, lines = _run(tmp, f"{name}-b", latents, out=resume, **kw)
    assert any("start_step=2 steps=4" in line for line in lines)


@pytest.mark.timeout(150)
def test_pp_stage_sigkilled_resumes_bitwise_from_dist(runs, monkeypatch, tmp_path):
    """checkpoint_format "dist": weights, EMA and Adam moments of both stages in one dist/ (global block keys), so a
    SIGKILLed PP=2 stage resumes from it bitwise, and the folder's dist/ read whole by one process (PP=1, TP=1:
    ``trainer.export --source dist``) is bitwise the gathered model.safetensors."""
    from trainer.export import load_dist_weights

    tmp, latents, out = runs
    resume = tmp / "pp2-resume"
    kw = dict(pipeline_parallel=2, micro_batches=2, recompute=True, checkpoint_format="dist")
    _kill_and_resume(tmp, latents, resume, "pp2", "1:3", monkeypatch, **kw)   # the last stage, after step 3
    assert [r["loss"] for r in _metrics(resume)] == [r["loss"] for r in _metrics(out["pp2"][0])]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = _weights(resume / "step_00000004", name), _weights(out["pp2"][0] / "step_00000004", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
        d = load_dist_weights(resume / "step_00000004", ema=name.startswith("ema"))
        assert d.keys() == a.keys() and all(torch.equal(d[k], a[k]) for k in a), name
    # a changed pipeline_parallel or micro_batches cannot resume it
    step_dir = checkpoint.latest(resume)
    meta = checkpoint.read_meta(step_dir)
    kw = dict(tp=1, cp=1, dp=1, rank=0, tp_rank=0, cp_rank=0, dp_rank=0)
    assert checkpoint.resume_source_rank(step_dir, meta, pp=2, pp_rank=1, micro_batches=2, **{**kw, "rank": 1}) == 1
    with pytest.raises(checkpoint.CheckpointError, match=r"pipeline_parallel=2, micro_batches=2, this stage "
                                                         r"requests pipeline_parallel=1, micro_batches=2"):
        checkpoint.resume_source_rank(step_dir, meta, pp=1, micro_batches=2, **kw)
    with pytest.raises(checkpoint.CheckpointError, match="micro_batches=4"):
        checkpoint.resume_source_rank(step_dir, meta, pp=2, micro_batches=4, **kw)


@pytest.mark.timeout(150)
def test_pp_distopt_sigkilled_resumes_bitwise(runs, monkeypatch):
    """PP=2 with the distributed optimizer: dist/ holds both stages' optimizer buckets (one key per TP x PP domain)
    and the model with the replicated embedders saved once (stage 0); a run whose stage-0 process SIGKILLs itself
    after step 3 resumes from step 2 bitwise equal to the uninterrupted run (losses, grad norms, model, EMA), and its
    dist/ read whole by one process is the gathered model.safetensors bitwise."""
    from trainer.export import load_dist_weights

    tmp, latents, out = runs
    resume = tmp / "pp2distopt-resume"
    kw = dict(pipeline_parallel=2, micro_batches=2, checkpoint_format="dist", distributed_optimizer=True)
    _kill_and_resume(tmp, latents, resume, "pp2distopt", "0:3", monkeypatch, **kw)
    ref = out["pp2distopt"][0]
    assert [(r["loss"], r["grad_norm"]) for r in _metrics(resume)] == \
        [(r["loss"], r["grad_norm"]) for r in _metrics(ref)]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = _weights(resume / "step_00000004", name), _weights(ref / "step_00000004", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
        d = load_dist_weights(resume / "step_00000004", ema=name.startswith("ema"))   # one copy of the embedders
        assert d.keys() == a.keys() and all(torch.equal(d[k], a[k]) for k in a), name


def test_pipeline_config_errors():
    assert (StageConfig().pipeline_parallel, StageConfig().micro_batches) == (1, 1)
    st = StageConfig(pipeline_parallel=2, data_parallel=2, micro_batches=4)
    assert (st.world_size, st.nproc_per_node) == (4, 4)
    StageConfig(pipeline_parallel=2, checkpoint_format="dist", distributed_optimizer=True)   # supported
    st = StageConfig(pipeline_parallel=2, tensor_parallel=2, context_parallel=2, data_parallel=2, nnodes=2)
    assert (st.world_size, st.nproc_per_node) == (16, 8)
    for k in ("pipeline_parallel", "micro_batches"):
        with pytest.raises(ValueError, match=f"{k} must be >= 1"):
            StageConfig(**{k: 0})
    with pytest.raises(ValueError, match=r"train\.stages\[0\]\.pipeline_parallel \(2\) must divide dit\.depth \(3\)"):
        from_dict(PipelineConfig, {"train": {"dit": {"depth": 3}, "stages": [{"name": "a", "pipeline_parallel": 2}]}})


def test_apply_pipeline_parallel_keeps_the_stage_part():
    from models.dit import MUGDiT
    from trainer.device import Layout
    from trainer.parallel import parallelize
    from trainer.parallel.pipeline import PP_REPLICATED
    from trainer.parallel.state_dict import shard_full_state_dict

    full = MUGDiT(DiTConfig(**{**TINY_DIT, "depth": 4})).state_dict()
    parts = []
    for rank in range(2):
        m = MUGDiT(DiTConfig(**{**TINY_DIT, "depth": 4}))
        layout = Layout(rank=rank, world_size=2, local_rank=rank, tp=1, tp_rank=0, dp=1, dp_rank=0, pp=2,
                        pp_rank=rank)
        plan = parallelize(m, layout)
        assert plan.block_range == (2 * rank, 2 * rank + 2)
        keys = set(m.state_dict())
        parts.append(keys)
        own = {"0", "1"} if rank == 0 else {"2", "3"}
        assert all(k.split(".")[1] in own for k in keys if k.startswith("blocks."))
        assert any(k.startswith("x_embedder.") for k in keys) is (rank == 0)
        assert any(k.startswith("final_layer.") for k in keys) is (rank == 1)
        assert all(plan.role(n).pp_replicated is n.startswith(PP_REPLICATED) for n, p in m.named_parameters())
        assert all(p.shared is (rank > 0) for n, p in m.named_parameters() if n.startswith(PP_REPLICATED))
        # a full state dict loads into the stage (the other stages' keys are dropped)
        sd = shard_full_state_dict(plan, m, full)
        assert set(sd) == keys
    assert parts[0] | parts[1] == set(full)
    with pytest.raises(ValueError, match=r"pipeline_parallel \(3\) must divide dit.depth \(4\)"):
        StageJob(stage=StageConfig(name="pp3", pipeline_parallel=3), dit=DiTConfig(**{**TINY_DIT, "depth": 4}),
                 latents_dir="l", output_dir="o")
