"""Megatron dist_checkpointing and the distributed optimizer (stage.checkpoint_format "dist",
stage.distributed_optimizer), through the real launch path (run_stage -> TorchX -> torchrun -> trainer.train).

Checked: a TP=2 "dist" stage stopped after step 2 resumes from dist/ and ends bitwise equal to an uninterrupted
run; its dist/ checkpoint loads into a TP=1 model (resharding) with
the gathered TP=2 weights bitwise; with megatron's DistributedOptimizer (DP=2) and bf16 weights (bf16 parameters,
fp32 main params; the saved weights are those fp32 masters), a stage whose rank 1 SIGKILLs
itself after step 3 (checkpoints every
2) resumes and ends bitwise equal to an uninterrupted run
(needs the Adam-step fix in trainer/train.py), the rerun with the overlapped reduce-scatter, the foreach AdamW,
prefetch and background checkpoints off, the uninterrupted run with them on; a corrupted dist/ file is detected by
its checksum.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from common.hashing import sha256_file
from helpers import NO_OVERLAP, write_latent_dataset
from helpers import assert_equal_step_folders as _equal_step_folders
from helpers import killed_and_rerun as _killed_and_rerun
from helpers import run_stage_job as _run
from helpers import stage_config as _stage
from helpers import stage_metrics as _metrics
from trainer import checkpoint


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    return tmp, write_latent_dataset(tmp / "latents")


@pytest.mark.timeout(300)
def test_dist_tp2_resume_bitwise_and_reshard_to_tp1(latents, monkeypatch):
    tmp, lat = latents
    stage = _stage(name="dtp2", steps=4, checkpoint_interval=2, tensor_parallel=2, data_parallel=1,
                   checkpoint_format="dist")
    straight, _ = _run(tmp, "dtp2", stage, lat)
    last = checkpoint.latest(straight)
    meta = checkpoint.verify(last)
    assert (meta["checkpoint_format"], meta["tensor_parallel"]) == ("dist", 2)
    assert {"dist/.metadata", "dist/common.pt"} <= set(meta["checksums"])
    assert any(f.startswith("dist/__1_") for f in meta["checksums"])   # rank 1 wrote its own shards

    # stopped after step 2 (a copy of the run rolled back to step 2: same files a stop there leaves), rerun
    resumed = tmp / "dtp2-resume"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "step_00000004")
    (resumed / "latest").write_text("step_00000002\n")
    _, lines = _run(tmp, "dtp2-resume", stage, lat, out=resumed)
    assert any("start_step=2 steps=4" in line for line in lines)
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in _metrics(straight)]
    _equal_step_folders(resumed / "step_00000004", last)

    # TP2 -> TP1: a copy of the TP=2 step folder without the full safetensors, so only dist/ can be read; lr=0
    # makes the one TP=1 step leave the weights unchanged, so its model.safetensors is what was loaded.
    init = tmp / "tp2-dist-only" / last.name
    shutil.copytree(last, init)
    (init / "model.safetensors").unlink()
    (init / "ema.safetensors").unlink()
    tp1, _ = _run(tmp, "dtp1", _stage(name="dtp1", steps=1, lr=0.0, warmup_steps=0, checkpoint_interval=1,
                                      tensor_parallel=1, data_parallel=1, checkpoint_format="dist"), lat,
                  init=str(init))
    from safetensors.torch import load_file

    loaded, gathered = load_file(str(checkpoint.latest(tp1) / "model.safetensors")), \
        load_file(str(last / "model.safetensors"))
    assert loaded.keys() == gathered.keys() and all(torch.equal(loaded[k], gathered[k]) for k in gathered)

    shard = init / "dist" / "__1_0.distcp"                   # a real dist/ file of rank 1, one byte flipped
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch for dist/__1_0.distcp"):
        checkpoint.verify(init)


@pytest.mark.timeout(300)
def test_distributed_optimizer_resume_bitwise(latents, monkeypatch):
    """With bf16 weights (the forward on bf16 parameters, megatron's fp32 main params sharded over DP, the path
    ``bf16_weights: auto`` takes on CUDA): it learns; model.safetensors holds the fp32 masters (values no bf16 can
    hold), each one of the optimizer's main params in dist/; the EMA is of the masters; resume is bitwise."""
    tmp, lat = latents
    stage = _stage(name="dopt", steps=4, checkpoint_interval=2, tensor_parallel=1, data_parallel=2,
                   checkpoint_format="dist", distributed_optimizer=True, bf16_weights="on")
    straight, lines = _run(tmp, "dopt", stage, lat)
    assert any("bf16_weights: the forward runs on bf16 weights" in line and "distributed optimizer" in line
               for line in lines)
    rows = _metrics(straight)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert all(r["grad_norm"] > 0 for r in rows) and last < first
    meta = checkpoint.verify(checkpoint.latest(straight))
    assert meta["distributed_optimizer"] is True
    _assert_fp32_masters_saved(checkpoint.latest(straight), straight / "step_00000002", tmp / "dopt-main.pt")
    resumed = _killed_and_rerun(tmp, "dopt-resume", stage, lat, monkeypatch,   # rerun: every other switch off
                                rerun_stage=dataclasses.replace(stage, **{**NO_OVERLAP, "bf16_weights": "on"}))
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in rows]
    assert [r["grad_norm"] for r in _metrics(resumed)] == [r["grad_norm"] for r in rows]
    _equal_step_folders(resumed / "step_00000004", checkpoint.latest(straight))


def _assert_fp32_masters_saved(step_dir: Path, before: Path, scratch: Path) -> None:
    """model/ema.safetensors are fp32; every trained parameter is not bf16-rounded and each of its values is among
    the fp32 main params of dist/'s optimizer state (megatron's bucket layout, so compared as a set); the EMA moved
    since the ``before`` step folder wherever the weights did, up to fp32 resolution (each rank updates its own
    shard of it: the save gathered both ranks' shards)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from helpers import TINY_DIT, load_weights
    from models.config import DiTConfig
    from models.dit import MUGDiT

    params = {n for n, _ in MUGDiT(DiTConfig(**TINY_DIT)).named_parameters()}
    model, ema = load_weights(step_dir), load_weights(step_dir, "ema.safetensors")
    model0, ema0 = load_weights(before), load_weights(before, "ema.safetensors")
    assert {v.dtype for v in model.values()} == {v.dtype for v in ema.values()} == {torch.float32}
    dcp_to_torch_save(str(step_dir / "dist"), str(scratch))
    main = torch.cat([v.reshape(-1) for k, v in torch.load(scratch).items()
                      if k.startswith("optimizer.") and k.endswith(".param")])
    assert main.dtype == torch.float32
    trained = [k for k in params if not torch.equal(model[k], model0[k])]
    assert len(trained) > len(params) // 2, trained
    for k in trained:
        moved = model[k] != model0[k]
        assert (ema[k] != ema0[k])[moved].float().mean() > 0.99, k   # a stale rank's shard would be ~half
        assert torch.isin(model[k], main).all(), k
        if model[k].numel() >= 16:
            assert not torch.equal(model[k], model[k].bfloat16().float()), k   # not bf16 roundings


@pytest.mark.timeout(60)
def test_corrupt_dist_file_is_detected(tmp_path):
    """checkpoint.save with a dist_state (one process, world size 1) lists every dist/ file in meta.json; flipping
    a byte in one makes verify and load_dist raise CheckpointError naming it (before megatron reads anything)."""
    step_dir = tmp_path / "step_00000001"
    (step_dir / "dist").mkdir(parents=True)
    (step_dir / "dist" / "__0_0.distcp").write_bytes(b"shard-bytes")
    (step_dir / "dist" / ".metadata").write_bytes(b"meta")
    sums = {f"dist/{p.name}": sha256_file(p) for p in (step_dir / "dist").iterdir()}
    (step_dir / "meta.json").write_text(json.dumps({"step": 1, "checksums": sums}))
    assert checkpoint.verify(step_dir, under="dist")["step"] == 1
    (step_dir / "dist" / "__0_0.distcp").write_bytes(b"shard-bytez")
    with pytest.raises(checkpoint.CheckpointError, match=r"checksum mismatch for dist/__0_0.distcp"):
        checkpoint.load_dist(step_dir, {})
    with pytest.raises(checkpoint.CheckpointError, match="no dist/ files"):
        checkpoint.verify(_full_only(tmp_path), under="dist")


def _full_only(tmp: Path) -> Path:
    d = tmp / "step_full"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x")
    (d / "meta.json").write_text(json.dumps({"step": 1, "checksums": {"model.safetensors": sha256_file(
        d / "model.safetensors")}}))
    return d
