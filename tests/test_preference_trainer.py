"""Flow-DPO and LoRA in the trainer (stage.objective "flow_dpo", stage.lora_rank), through the real launch path
(run_stage -> TorchX local_cwd -> torchrun -> trainer.train) on a tiny PreferencePairs folder written here: winners
are the structured latents of helpers.write_latent_dataset, losers noise-corrupted copies of them (the preferred
direction is known), from an init checkpoint whose final layer is not zero (a from-scratch DiT's output ignores its
blocks, so adapters would get no gradient).

Checked: the first loss is log 2 (policy = reference; 1e-6), with LoRA and with full fine-tuning; over 12 steps the
implicit accuracy rises above 0.5 and the reward margin grows; the checkpoint's model/ema.safetensors have MUGDiT's
plain keys and are the init's weights plus the merged adapters; LoRA at step 0 is the base model exactly; TP=2, with
and without sequence parallelism, gives the losses of TP=1 (1e-5) with LoRA; a DP=2 LoRA stage with dist checkpoints
SIGKILLed after step 3 resumes and ends bitwise equal to an uninterrupted run; a LoRA checkpoint resumes only with its
rank, alpha and base; the combinations the trainer does not implement are refused at config load.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import (
    TINY_DIT,
    assert_equal_step_folders,
    killed_and_rerun,
    run_stage_job,
    stage_config,
    stage_metrics,
    write_latent_dataset,
)
from helpers import load_weights as _weights
from models.config import DiTConfig
from trainer import checkpoint

LORA = dict(lora_rank=4, lora_alpha=8.0)


def _dpo(**kw):
    return stage_config(**{**dict(steps=4, lr=1e-3, warmup_steps=0, objective="flow_dpo", checkpoint_interval=2),
                           **kw})


def write_pairs_folder(root: Path, n_pairs: int = 8, noise_std: float = 1.0, seed: int = 0) -> Path:
    """A PreferencePairs folder: winner k = clip k of write_latent_dataset, loser k = it + noise_std * N(0, 1)."""
    from common.latents import LatentReader, LatentWriter
    from common.pairs import write_pairs

    src = LatentReader(write_latent_dataset(root.parent / f"{root.name}-winners", n_clips=n_pairs))
    g = torch.Generator().manual_seed(seed)
    writer, rows = LatentWriter(root), []
    for c in src.clip_ids():
        latent, text, mask = src.load(c)
        noisy = (latent + noise_std * torch.randn(latent.shape, generator=g)).contiguous()
        writer.add(c, latent, text, mask, caption=c)
        writer.add(f"{c}-noise", noisy, text.clone(), mask.clone(), caption=c)
        rows.append(dict(pair_id=f"p-{c}", winner=c, loser=f"{c}-noise", caption=c, source="auto:noise"))
    writer.finish({"vae": {"config": {"spatial_downsample": 8}}, "latent_mean": [0.0] * 24, "latent_std": [1.0] * 24})
    write_pairs(root, rows)
    return root


def write_init_checkpoint(out: Path, seed: int = 7) -> Path:
    """A step folder with a tiny DiT whose final layer is random (not MUGDiT's zero init), written by
    trainer.checkpoint.save in this process."""
    from models.dit import MUGDiT

    torch.manual_seed(seed)
    model = MUGDiT(DiTConfig(**TINY_DIT))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    sd = model.state_dict()
    return checkpoint.save(out, 1, rank=0, model_sd=sd, ema_sd=sd, rank_state={}, meta={"stage": "init"}, keep=1,
                           barrier=lambda ok: ok)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    return tmp, write_pairs_folder(tmp / "pairs"), str(write_init_checkpoint(tmp / "init"))


@pytest.fixture(scope="module")
def lora_run(setup):
    """DP=2 LoRA Flow-DPO, 12 steps, dist checkpoints at 4, 8, 12 (constant LR: its first 4 steps are the
    4-step stage's of the resume test)."""
    tmp, pairs, init = setup
    return run_stage_job(tmp, "lora", _dpo(name="lora", steps=12, checkpoint_interval=4, checkpoint_format="dist",
                                           **LORA), pairs, init=init)


@pytest.mark.timeout(120)
def test_lora_dpo_starts_at_log2_learns_and_saves_plain_keys(setup, lora_run):
    from safetensors.torch import load_file

    from models.lora import merge_adapters

    _, _, init = setup
    out, lines = lora_run
    rows = stage_metrics(out)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6                       # policy = reference at step 1
    assert rows[0]["dpo_implicit_acc"] == 0.0 and rows[0]["dpo_reward_margin"] == 0.0   # Δ = 0 exactly
    assert {"dpo_implicit_acc", "dpo_reward_margin", "dpo_kl_proxy"} <= set(rows[0])
    last = rows[-4:]
    assert sum(r["dpo_implicit_acc"] for r in last) / len(last) > 0.5
    assert min(r["dpo_reward_margin"] for r in last) > max(r["dpo_reward_margin"] for r in rows[:4]) > 0
    assert sum(r["loss"] for r in last) / len(last) < 0.8 * math.log(2)   # measured: 0.38 (log 2 = 0.69)
    assert any("objective=flow_dpo lora_rank=4" in line for line in lines)

    step = checkpoint.latest(out)
    meta = checkpoint.verify(step)
    assert meta["lora"]["rank"] == 4 and meta["objective"] == "flow_dpo"
    base, merged = _weights(Path(init)), _weights(step)
    assert merged.keys() == base.keys() and _weights(step, "ema.safetensors").keys() == base.keys()
    adapters = load_file(str(step / "lora.safetensors"))
    assert adapters and all(k.endswith((".lora.A", ".lora.B")) for k in adapters)
    expect = merge_adapters({**base, **adapters}, alpha=8.0)
    assert all(torch.allclose(merged[k], expect[k], atol=1e-6) for k in base)
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all(k.rsplit(".", 1)[0].endswith(("qkv", "proj", "q_linear", "kv_linear", "fc1", "fc2"))
                           for k in changed)   # only the adapted linears' weights moved


@pytest.mark.timeout(120)
def test_full_finetune_dpo_starts_at_log2(setup, lora_run):
    """Without LoRA the reference is a second frozen copy of the init weights: the same step-1 loss as with the
    adapters (off: the base; on: the base too, B = 0), log 2."""
    tmp, pairs, init = setup
    out, _ = run_stage_job(tmp, "full", _dpo(name="full", steps=2, data_parallel=1), pairs, init=init)
    rows = stage_metrics(out)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6 and rows[1]["loss"] < math.log(2)
    assert rows[0]["loss"] == stage_metrics(lora_run[0])[0]["loss"]


@pytest.mark.timeout(200)
def test_lora_dpo_tp2_matches_tp1(setup):
    """Same weights, pairs and flow inputs: TP=2 (column-parallel B / row-parallel A sharded, megatron's mappings on
    the rank-r projection) and TP=2 with sequence parallelism (megatron's SP gather / reduce-scatter on it) give
    TP=1's losses, grad norms and margins (measured: losses equal to the printed digits over 3 steps, grad norms
    <= 1e-7 relative, weights 1.5e-8). Flow-DPO amplifies weight differences by beta/2 = 250 in the loss, so longer
    runs drift more than a flow stage does (4th step: 2.5e-5, from weights 3e-7 apart; CP=2 the same).
    The TP=1 run also logs to MLflow."""
    from mlflow.tracking import MlflowClient

    tmp, pairs, init = setup
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("dpo-test")).info.run_id
    layouts = {"tp1": dict(tensor_parallel=1), "tp2": dict(tensor_parallel=2),
               "tp2sp": dict(tensor_parallel=2, sequence_parallel=True)}
    runs = {name: run_stage_job(tmp, name, _dpo(name=name, steps=3, checkpoint_interval=3, data_parallel=1, **kw,
                                                **LORA), pairs, init=init,
                                **(dict(mlflow_tracking_uri=uri, mlflow_run_id=run_id) if name == "tp1" else {}))[0]
            for name, kw in layouts.items()}
    one = stage_metrics(runs["tp1"])
    assert abs(one[0]["loss"] - math.log(2)) < 1e-6
    for key in ("loss", "dpo_implicit_acc", "dpo_reward_margin", "dpo_kl_proxy"):
        assert [m.value for m in client.get_metric_history(run_id, key)] == [r[key] for r in one], key
    w1 = _weights(checkpoint.latest(runs["tp1"]))
    for name in ("tp2", "tp2sp"):
        for r1, r2 in zip(one, stage_metrics(runs[name])):
            for key in ("loss", "grad_norm", "dpo_reward_margin"):
                assert abs(r2[key] - r1[key]) <= 1e-5 * max(1.0, abs(r1[key])), (name, key, r1, r2)
        w2 = _weights(checkpoint.latest(runs[name]))
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5, name


@pytest.mark.timeout(180)
def test_lora_dpo_dist_sigkill_resumes_bitwise(setup, lora_run, monkeypatch):
    """The 4-step stage (checkpoints every 2) whose rank 1 is SIGKILLed after step 3 resumes from dist/ (adapters,
    their EMA and the Adam moments; the base rebuilt from the init) and ends bitwise equal to the uninterrupted run
    (the 12-step run's first 4 steps: same constant LR, same batches)."""
    tmp, pairs, init = setup
    straight = lora_run[0]
    stage = _dpo(name="resume", checkpoint_format="dist", **LORA)
    resumed = killed_and_rerun(tmp, "resume", stage, pairs, monkeypatch, init=init)
    assert [r["loss"] for r in stage_metrics(resumed)] == [r["loss"] for r in stage_metrics(straight)[:4]]
    assert_equal_step_folders(resumed / "step_00000004", straight / "step_00000004")
    names = checkpoint.verify(straight / "step_00000004")["checksums"]
    assert any(f.startswith("dist/") for f in names) and "lora_ema.safetensors" in names


def test_lora_step0_is_the_base_and_adapters_off_is_the_reference():
    """In one process: LoRA (B = 0) leaves the output and the flow loss bitwise unchanged; with B moved, the
    adapters-off forward is the base bitwise and the merged plain weights give the adapted output."""
    from models import lora
    from models import rectified_flow as rf
    from models.dit import MUGDiT

    cfg = DiTConfig(**TINY_DIT)
    torch.manual_seed(0)
    base = MUGDiT(cfg)
    torch.nn.init.normal_(base.final_layer.linear.weight, std=0.05)
    adapted = MUGDiT(cfg)
    adapted.load_state_dict(base.state_dict())
    lora.apply_lora(adapted, rank=4, alpha=8.0)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == \
        {f"blocks.0.{t}.lora.{m}" for t in lora.TARGETS for m in "AB"}
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 24, 3, 8, 8, generator=g)
    x_t, t, noise = rf.training_step_inputs(x0, g, 0.0, 1.0, True)
    text, mask = torch.randn(2, 16, 64, generator=g), torch.ones(2, 16, dtype=torch.bool)
    v_base, v_lora = base(x_t, t, text, mask), adapted(x_t, t, text, mask)
    assert torch.equal(v_base, v_lora)
    assert torch.equal(rf.flow_loss(v_base, x0, noise), rf.flow_loss(v_lora, x0, noise))
    for _, a in lora.adapters(adapted):
        torch.nn.init.normal_(a.B, std=0.1)
    v_moved = adapted(x_t, t, text, mask)
    with lora.adapters_off(adapted):
        assert torch.equal(adapted(x_t, t, text, mask), v_base)
    assert (v_moved - v_base).abs().max() > 1e-3
    plain = MUGDiT(cfg)
    plain.load_state_dict(lora.merge_adapters(adapted.state_dict(), alpha=8.0))
    assert (plain(x_t, t, text, mask) - v_moved).abs().max() < 1e-5


@pytest.mark.parametrize("section, kw, match", [
    ("preference", dict(task_mix=[{"task": "i2v"}]), "flow_dpo trains text-to-video pairs"),
    ("preference", dict(top_fraction=0.5), "a flow_dpo stage trains on every pair"),
])
def test_unimplemented_combinations_are_refused_at_config_load(section, kw, match):
    from common.config import PipelineConfig, from_dict

    objective = "flow_dpo" if section == "preference" else "flow"
    stage = {"name": "post", "data_parallel": 1, "objective": objective, **kw}
    with pytest.raises(ValueError, match=rf"train.{section} \('post'\).*{match}"):
        from_dict(PipelineConfig, {"train": {"dit": {**TINY_DIT, "depth": 2}, section: stage}})


def test_lora_resume_needs_the_same_adapters_and_base(setup, lora_run, tmp_path):
    """The base is not in a LoRA checkpoint: resuming with another rank or on another init checkpoint is refused,
    naming both; the same base fetched to another path resumes (its identity is its meta.json checksums)."""
    import shutil

    from trainer.job import StageJob
    from trainer.parallel import ParallelPlan
    from trainer.state import _check_lora_resume

    _, pairs, init = setup
    step = checkpoint.latest(lora_run[0])
    meta = checkpoint.read_meta(step)

    def check(rank: int, init_dir: str) -> None:
        job = StageJob(stage=_dpo(lora_rank=rank, lora_alpha=8.0), dit=DiTConfig(**TINY_DIT), latents_dir=str(pairs),
                       output_dir=str(tmp_path), init_checkpoint=init_dir)
        _check_lora_resume(step, meta, job, ParallelPlan(ParallelPlan.single().layout, lora_rank=rank,
                                                         lora_alpha=8.0 if rank else 0.0))

    moved = tmp_path / "fetched" / Path(init).name
    shutil.copytree(init, moved)
    check(4, str(moved))
    with pytest.raises(checkpoint.CheckpointError, match=r"saved with lora_rank=4.*this stage has lora_rank=8"):
        check(8, init)
    with pytest.raises(checkpoint.CheckpointError, match="this stage has no LoRA"):
        check(0, init)
    other = write_init_checkpoint(tmp_path / "other", seed=8)
    with pytest.raises(checkpoint.CheckpointError, match="not the frozen base they were trained on"):
        check(4, str(other))
