"""What several test files share: the tiny DiT, a LatentDataset folder with learnable latents, and running a
training stage through the real launch path (run_stage -> TorchX local_cwd -> torchrun -> trainer.train).

    from helpers import TINY_DIT, run_stage_job, stage_config, stage_metrics, write_latent_dataset
    latents = write_latent_dataset(tmp / "latents")
    out, lines = run_stage_job(tmp, "dp2", stage_config(steps=4), latents)
    losses = [r["loss"] for r in stage_metrics(out)]
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import torch

from common.config import LaunchConfig, StageConfig
from models.config import DiTConfig
from trainer.launch import free_port  # drawn below the ephemeral range: two test workers do not get the same port

# head_dim 24; typed Dict[str, Any], not the inferred dict[str, int]: it is splatted into DiTConfig (not all int)
TINY_DIT: Dict[str, Any] = dict(hidden_size=48, depth=1, num_heads=2, caption_channels=64, max_text_len=16)
LAUNCH = LaunchConfig(scheduler="local_cwd", cpu=2, timeout_s=150)
TOL = 1e-5
ODD_SHAPES = [(24, 3, 8, 8), (24, 3, 6, 10)] * 3   # 48 video tokens + 2 = 50 and 45 + 2 = 47 (odd)


def write_latent_dataset(root: Path, n_clips: int = 6, latent_shape=(24, 3, 8, 8), text_shape=(16, 64),
                         n_val: int = 0, shapes=None, seed: int = 0, samples=None) -> Path:
    """A LatentDataset folder (``common.latents.LatentWriter``, one shard) with learnable, seeded latents.
    ``samples``: per sample, what it is (``LatentWriter.add``'s resolution, num_frames, kind, ... keywords)."""
    from common.latents import LatentWriter

    g = torch.Generator().manual_seed(seed)
    writer = LatentWriter(root)
    for i in range(n_clips):
        shape = tuple(shapes[i]) if shapes else tuple(latent_shape)
        base = torch.linspace(-1, 1, shape[-1]).expand(*shape)        # smooth structure the DiT can fit
        latent = (base * (1 + i % 3) + 0.1 * torch.randn(shape, generator=g)).contiguous()
        text = torch.randn(text_shape, generator=g)
        mask = torch.zeros(text_shape[0], dtype=torch.uint8)
        mask[: 4 + i % 5] = 1
        writer.add(f"clip{i:04d}", latent, text, mask, split="val" if i < n_val else "train", caption=f"clip {i}",
                   score=float(i), bucket="x".join(map(str, shape)), source_hash=f"src{i}",
                   **(samples[i] if samples else {}))
    writer.finish({"vae": {"config": {"spatial_downsample": 8}}, "latent_mean": [0.0] * latent_shape[0],
                   "latent_std": [1.0] * latent_shape[0]})
    return root


def stage_config(**kw) -> StageConfig:
    """The tiny DP=2 stage the multi-process tests start from, with ``kw`` overriding its fields."""
    base = dict(name="dp2", steps=30, lr=3e-3, warmup_steps=2, micro_batch_size=2, tensor_parallel=1,
                data_parallel=2, checkpoint_interval=10, keep_checkpoints=3, seed=1234)
    return StageConfig(**{**base, **kw})


def run_stage_job(tmp: Path, name: str, stage: StageConfig, latents: Path, init: str = "", out: Path | None = None,
                  dit: dict | None = None, **job_kw) -> tuple[Path, list]:
    """Run ``stage`` on ``latents`` through the real launch path; returns (output dir, progress lines)."""
    from trainer.job import StageJob
    from trainer.launch import run_stage

    out = out or tmp / name
    job = StageJob(stage=stage, dit=DiTConfig(**(dit or TINY_DIT)), latents_dir=str(latents), init_checkpoint=init,
                   output_dir=str(out), config_hash=name, **job_kw)
    lines: list = []
    run_stage(job, job.write(tmp / f"{name}.job.json"), LAUNCH, log_dir=tmp / f"{name}-logs", progress=lines.append)
    return out, lines


# every switch of the trainer's overhead hiding off (StageConfig: they must not change a CPU result)
NO_OVERLAP: Dict[str, Any] = dict(overlap_grad_reduce=False, optimizer_impl="for_loop", prefetch=False,
                                  async_checkpoint=False, bf16_weights="off")


def stage_metrics(out: Path) -> list:
    """The rows of a stage's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_weights(step_dir: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file
    return load_file(str(step_dir / name))


def assert_equal_step_folders(a: Path, b: Path) -> None:
    """Model and EMA weights of two step folders are bitwise equal."""
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_weights(a, name), load_weights(b, name)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), name


def killed_and_rerun(tmp: Path, name: str, stage, latents: Path, monkeypatch, init: str = "",
                     dit: dict | None = None, rerun_stage=None) -> Path:
    """Run ``stage`` (4 steps, checkpoints every 2) with rank 1 SIGKILLed after step 3, then rerun it (both from
    ``init`` when given, with the DiT ``dit``, default TINY_DIT); ``rerun_stage``: rerun this one instead."""
    from trainer import checkpoint
    from trainer.train import KILL_ENV

    out = tmp / name
    monkeypatch.setenv(KILL_ENV, "1:3")
    with pytest.raises(RuntimeError, match="ended FAILED"):
        run_stage_job(tmp, f"{name}-a", stage, latents, out=out, init=init, dit=dit)
    monkeypatch.delenv(KILL_ENV)
    saved = checkpoint.latest(out)
    assert saved is not None and saved.name == "step_00000002"
    _, lines = run_stage_job(tmp, f"{name}-b", rerun_stage or stage, latents, out=out, init=init, dit=dit)
    assert any("start_step=2 steps=4" in line for line in lines)
    return out


def assert_odd_tokens_exact(res: dict, names) -> None:
    """The odd case of parallel_output_check (47 tokens, padded to 48) matches one process, plain and recomputed."""
    assert res["odd_token_multiple"] == 2
    for name in names:
        assert res[f"odd_{name}_out_max_abs"] < 1e-5, name
        assert res[f"odd_{name}_grad_max_rel"] < 1e-5 and res[f"odd_{name}_grads_nonzero"], name


def assert_steps_see_both_shapes(latents, steps: int = 3, seed: int = 1234) -> None:
    """The stage's first ``steps`` micro-batches (micro_batch_size 2, one DP rank) include both token counts."""
    from trainer.data import LatentSplit, StepSampler

    shapes = LatentSplit(latents, split="train").shapes
    sampler = StepSampler(shapes, 2, 1, seed, patch_size=tuple(DiTConfig(**TINY_DIT).patch_size))
    assert {shapes[i] for k in range(steps) for i in sampler.indices(k, 0)} == set(ODD_SHAPES)


@contextlib.contextmanager
def running_services(folder: Path, key_id: str, secret: str) -> Iterator[Dict[str, str]]:
    """``make services`` (common.services.start) in ``folder`` on free ports, with the given credentials in this
    process's environment (AWS_ENDPOINT_URL pointing at the S3 endpoint) while it runs; yields the state (s3_url,
    mlflow_url, folder); stops both services and restores the environment after."""
    from common import services as svc

    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    try:
        state = svc.start(folder, s3_port=free_port(), mlflow_port=free_port())
        os.environ["AWS_ENDPOINT_URL"] = state["s3_url"]
        yield state
    finally:
        svc.main(["stop", "--folder", str(folder)])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
