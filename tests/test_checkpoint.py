"""The checkpoint folder (trainer/checkpoint.py), one process: atomic layout, keep-N, checksums, stale tmp folders,
asynchronous writes (trainer state copied before save returns; a failed write never looks complete) and the status
barriers of a save (a rank whose part fails stops every rank; peers simulated). The multi-process saves and
SIGKILL + resume runs are in test_trainer_dist.py and test_trainer_ckpt*.py.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from trainer import checkpoint, device


def _save(out: Path, step: int, keep: int = 2):
    sd = {"w": torch.full((2, 3), float(step))}
    return checkpoint.save(out, step, rank=0, model_sd=sd, ema_sd={"w": sd["w"] * 0.5},
                           rank_state={"optimizer": {"state": {}, "param_groups": []}, "rng": torch.get_rng_state()},
                           meta={"stage": "s", "tensor_parallel": 1, "data_parallel": 1, "loss": 1.0}, keep=keep,
                           barrier=lambda ok: ok)


def test_checkpoint_atomic_layout_keep_n_and_resume_state(tmp_path):
    out = tmp_path / "ckpt"
    for step in (3, 6, 9):
        _save(out, step)
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_00000006", "step_00000009"]
    last = checkpoint.latest(out)
    assert last.name == "step_00000009" and not list(out.glob(".tmp-*"))
    meta = checkpoint.verify(last)
    assert set(meta["checksums"]) == {"model.safetensors", "ema.safetensors", "optim/rank00000.pt"}
    assert meta["step"] == 9 and meta["tensor_parallel"] == 1
    assert torch.equal(checkpoint.load_weights(last)["w"], torch.full((2, 3), 9.0))
    assert torch.equal(checkpoint.load_weights(last, ema=True)["w"], torch.full((2, 3), 4.5))
    one = device.Layout(rank=0, world_size=1, local_rank=0, tp=1, tp_rank=0, dp=1, dp_rank=0)
    assert checkpoint.load_rank_state(last, one)["step"] == 9
    with pytest.raises(checkpoint.CheckpointError, match="saved with tensor_parallel=1, context_parallel=1, "
                       "data_parallel=1.*requests tensor_parallel=2.*init_checkpoint"):
        checkpoint.load_rank_state(last, dataclasses.replace(one, tp=2, world_size=2))


def test_checkpoint_checksum_mismatch_and_stale_tmp(tmp_path):
    out = tmp_path / "ckpt"
    (out / ".tmp-step_00000002").mkdir(parents=True)                    # a crash mid-save left this behind
    step_dir = _save(out, 3)
    assert not (out / ".tmp-step_00000002").exists()
    with open(step_dir / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch for model.safetensors"):
        checkpoint.load_weights(step_dir)
    (out / "latest").write_text("step_00000099\n")
    with pytest.raises(checkpoint.CheckpointError, match="missing or incomplete"):
        checkpoint.latest(out)
    assert checkpoint.latest(tmp_path / "never") is None


def test_async_checkpoint_writes_in_the_background_and_a_failed_write_never_looks_complete(tmp_path, monkeypatch):
    """checkpoint.Writer: save returns after copying the state (later changes to the tensors do not reach the
    files); the folder appears by wait(). A write that dies midway (the safetensors writer raises after the
    per-rank file) leaves only .tmp-step_*: latest still names the previous folder, and wait() raises."""
    import safetensors.torch

    out, writer = tmp_path / "ckpt", checkpoint.Writer()
    w = torch.full((2, 3), 3.0)
    rank_state = {"optimizer": {"state": {0: {"exp_avg": w.clone()}}, "param_groups": []}, "rng": torch.get_rng_state()}
    meta = {"stage": "s", "tensor_parallel": 1, "data_parallel": 1, "loss": 1.0}
    checkpoint.save(out, 3, rank=0, model_sd={"w": w}, ema_sd={"w": w * 0.5}, rank_state=rank_state, meta=meta,
                    keep=2, barrier=lambda ok: ok, writer=writer)
    w.add_(100.0)                                                       # the training thread goes on
    rank_state["optimizer"]["state"][0]["exp_avg"].add_(100.0)
    writer.wait()
    last = checkpoint.latest(out)
    assert last.name == "step_00000003" and checkpoint.verify(last)["step"] == 3
    assert torch.equal(checkpoint.load_weights(last)["w"], torch.full((2, 3), 3.0))
    one = device.Layout.single()
    assert torch.equal(checkpoint.load_rank_state(last, one)["optimizer"]["state"][0]["exp_avg"],
                       torch.full((2, 3), 3.0))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    checkpoint.save(out, 6, rank=0, model_sd={"w": w}, ema_sd={"w": w}, rank_state=rank_state, meta=meta, keep=2,
                    barrier=lambda ok: ok, writer=writer)
    with pytest.raises(checkpoint.CheckpointError, match="writing a checkpoint failed.*No space left on device"):
        writer.wait()
    assert checkpoint.latest(out).name == "step_00000003" and (out / ".tmp-step_00000006" / "optim").is_dir()
    assert not (out / "step_00000006").exists()
    writer.wait()                                                       # the error was reported once


def test_a_rank_that_fails_its_part_of_a_save_stops_every_rank_at_the_next_barrier(tmp_path, monkeypatch):
    """The save's barriers carry each rank's status (checkpoint._all_ok): a rank whose write fails still reaches the
    barrier (with False) and raises its own error; the others learn of it there and raise a CheckpointError, instead
    of waiting in the barrier for the collective timeout; no folder looks complete either way."""
    import safetensors.torch

    out, seen = tmp_path / "ckpt", []
    rank_state = {"optimizer": {"state": {}, "param_groups": []}, "rng": torch.get_rng_state()}
    meta = {"stage": "s", "tensor_parallel": 1, "data_parallel": 2, "loss": 1.0}

    def peers_fail_at_write(ok: bool) -> bool:   # the other rank's file write failed (the second barrier)
        seen.append(ok)
        return ok and len(seen) != 2

    (out / ".tmp-step_00000004" / "optim").mkdir(parents=True)      # as rank 0 made it
    with pytest.raises(checkpoint.CheckpointError, match="another rank failed while writing its files"):
        checkpoint.save(out, 4, rank=1, model_sd=None, ema_sd=None, rank_state=rank_state, meta=meta, keep=2,
                        barrier=peers_fail_at_write)
    assert seen == [True, True] and checkpoint.latest(out) is None

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    seen.clear()
    with pytest.raises(OSError, match="No space left on device"):   # this rank's own error, after the barrier
        checkpoint.save(out, 4, rank=0, model_sd={"w": torch.ones(2)}, ema_sd={"w": torch.ones(2)},
                        rank_state=rank_state, meta=meta, keep=2, barrier=lambda ok: seen.append(ok) or ok)
    assert seen == [True, False] and checkpoint.latest(out) is None and not (out / "step_00000004").exists()
