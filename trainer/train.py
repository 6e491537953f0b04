"""The SPMD training program for one stage: every process torchrun starts runs this file on the same job.json.

One process (a job whose stage has tensor_parallel=1, data_parallel=1)::

    python -m trainer.train --job job.json

Two processes on this machine (data_parallel=2, or tensor_parallel=2)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer.train --job job.json

Several nodes (run on each of the N nodes; HEAD is node 0's address; output_dir must be on a shared filesystem)::

    python -m torch.distributed.run --nnodes N --nproc_per_node P --rdzv_backend c10d \\
        --rdzv_endpoint HEAD:29500 --rdzv_id stage1 -m trainer.train --job job.json

(the platform launches it through TorchX: ``trainer.launch.run_stage`` / ``trainer.component.train_stage``).

The loop: resolve the runtime, join the process groups (TP from the stage), build MUGDiT with one seed on every rank,
shard it over TP (and wrap every block in activation checkpointing when ``stage.recompute``), AdamW; resume from
``output_dir/latest`` if present, else load ``init_checkpoint`` weights; then per step: this DP rank's micro-batch
(``trainer.data.StepSampler``: one bucket per micro-batch, token counts balanced across DP ranks), rectified-flow
inputs from a generator seeded by (seed, step, dp_rank) (identical on the TP ranks that share a batch), loss,
backward, gradient sync (TP partial sums, DP average), TP-aware global-norm clip, AdamW step at ``lr_at(step)``
(warmup, then constant / cosine / linear to ``min_lr``), EMA, metrics from rank 0 and a checkpoint every
``checkpoint_interval`` steps and at the end. Bad input (missing latents, empty split, TP not dividing the heads)
exits with status 2 and one message.

Metrics per step (stdout, ``metrics.jsonl``, MLflow): loss (DP mean), grad_norm, lr, step_time_s, samples_per_s,
tokens_per_s (video tokens of all DP ranks) and mfu = spec §6.5 model FLOPs (``models.flops``, E = 12, so
recomputation is not counted) / step time / (world size x per-process peak, ``trainer.device.peak_flops_per_s``:
``stage.peak_tflops``, else ``$VGEN_PEAK_TFLOPS``, else 989 TFLOP/s bf16 on H100/H200, 95 GFLOP/s per thread on CPU).

Precision: bf16 autocast on GPU with fp32 parameters, gradients and AdamW state (fp32 master weights); fp32 on CPU.
Exact resume: every input of a step is a function of (seed, step) and the checkpoint holds the weights, EMA, the
AdamW state of every rank and the RNG state, so on CPU (deterministic algorithms) a run killed and rerun ends
bitwise equal to an uninterrupted one (tests/test_trainer_dist.py kills rank 1 with ``$VGEN_TEST_KILL_AFTER_STEP``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist

from common.config import to_dict
from trainer import checkpoint, device, parallel
from trainer.data import Batch, LatentDataset, StepSampler
from trainer.job import StageJob

EMA_DECAY = 0.999                  # tiny runs are a few hundred steps; MUG-V's flag value is 0.9999 (spec §4.6)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-10   # spec §5.2


def train(job: StageJob) -> None:
    stage = job.stage
    data = _check_inputs(job)
    rt = device.resolve_runtime()
    layout = device.init_distributed(stage.tensor_parallel, seed=stage.seed, runtime=rt)
    try:
        if layout.world_size != stage.world_size:
            raise ValueError(f"stage '{stage.name}' needs tensor_parallel*data_parallel = {stage.world_size} "
                             f"processes but {layout.world_size} were launched (nnodes*nproc_per_node)")
        sampler = StepSampler(data.shapes, stage.micro_batch_size, layout.dp, stage.seed,
                              patch_size=job.dit.patch_size, tokens_per_micro_batch=stage.tokens_per_micro_batch)
        model, opt = _build(job, layout, rt)
        start, ema = _restore(job, layout, model, opt)
        log = _MetricsLog(job, layout, start, _param_count(model, layout),
                          device.peak_flops_per_s(rt, stage.peak_tflops) * layout.world_size)
        kill_at = _test_kill_step(layout)
        for step in range(start, stage.steps):
            t0 = time.perf_counter()
            batch = data.batch(sampler.indices(step, layout.dp_rank)).to(rt.device)
            loss, grad_norm, lr = _train_step(job, model, opt, batch, step, layout, rt, data.meta)
            _ema_update(ema, model, EMA_DECAY)
            totals = _dp_sum([loss, len(batch.clip_ids), *_work(job, batch)])   # loss, samples, tokens, FLOPs
            log.write(step + 1, totals[0] / layout.dp, grad_norm, lr, totals[1:], time.perf_counter() - t0)
            if (step + 1) % stage.checkpoint_interval == 0 or step + 1 == stage.steps:
                _save(job, layout, model, opt, ema, step + 1, totals[0] / layout.dp)
            if step + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        device.destroy()


KILL_ENV = "VGEN_TEST_KILL_AFTER_STEP"   # tests: "RANK:STEP" makes that rank SIGKILL itself after that step


def lr_at(step: int, base_lr: float, warmup_steps: int, schedule: str = "constant", min_lr: float = 0.0,
          total_steps: int = 0) -> float:
    """The LR of 0-based ``step``: linear warmup over ``warmup_steps``, then ``schedule`` from ``base_lr`` down to
    ``min_lr`` at the last step (``total_steps - 1``): "constant" (MUG-V fine-tune: min-lr = lr), "cosine", "linear".
    A pure function of the step, so a resumed run uses the same LRs."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if schedule == "constant" or decay_steps <= 0:
        return base_lr
    frac = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return base_lr + (min_lr - base_lr) * frac
    raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")


def _test_kill_step(layout: device.Layout) -> int:
    """The step after which this rank kills itself (``$VGEN_TEST_KILL_AFTER_STEP=rank:step``), else -1."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return -1
    rank, step = (int(v) for v in spec.split(":"))
    return step if rank == layout.rank else -1


def _check_inputs(job: StageJob) -> LatentDataset:
    """Fail before any process group exists on inputs that cannot work."""
    tp, heads = job.stage.tensor_parallel, job.dit.num_heads
    if heads % tp or job.dit.hidden_size % tp:
        raise ValueError(f"stage '{job.stage.name}': tensor_parallel={tp} must divide dit.num_heads={heads} "
                         f"and dit.hidden_size={job.dit.hidden_size}")
    if job.init_checkpoint and not Path(job.init_checkpoint).is_dir():
        raise FileNotFoundError(f"init_checkpoint not found: {job.init_checkpoint} (expected a step_XXXXXXXX folder)")
    return LatentDataset(job.latents_dir, split="train", top_fraction=job.stage.top_fraction)


def _build(job: StageJob, layout: device.Layout, rt: device.Runtime):
    from models.dit import MUGDiT

    torch.manual_seed(job.stage.seed)              # the same full weights on every rank, then each keeps its shard
    model = MUGDiT(job.dit)
    model.y_embedder.dropout_prob = 0.0   # CFG drop is drawn here (force_drop_B): seeded per step, same on TP ranks
    model = parallel.parallelize(model.to(rt.device), layout.tp).train()
    if job.stage.recompute:
        parallel.apply_activation_checkpointing(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.stage.lr, betas=ADAM_BETAS,
                            eps=ADAM_EPS, weight_decay=job.stage.weight_decay)
    return model, opt


def _restore(job: StageJob, layout: device.Layout, model, opt) -> Tuple[int, Dict[str, torch.Tensor]]:
    """Exact resume from output_dir/latest, else weights from init_checkpoint, else scratch. Returns (step, ema)."""
    last, start = checkpoint.latest(job.output_dir), 0
    if last is not None:
        state = checkpoint.load_rank_state(last, layout.rank, layout.tp, layout.dp)
        parallel.load_full_state_dict(model, checkpoint.load_weights(last))
        ema_full = checkpoint.load_weights(last, ema=True)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
    elif job.init_checkpoint:
        parallel.load_full_state_dict(model, checkpoint.load_weights(job.init_checkpoint))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if last is not None:
        for k, v in parallel.shard_full_state_dict(model, ema_full).items():
            ema[k].copy_(v)
    return start, ema


def _step_generator(seed: int, step: int, dp_rank: int) -> torch.Generator:
    mixed = np.random.SeedSequence([seed, step, dp_rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)


def flow_inputs(job: StageJob, latents_BCTHW: torch.Tensor, step: int, dp_rank: int, vae_downsample: int = 8):
    """(noise, t_B, x_t, drop_B) for a step: CPU generator, so identical on all TP ranks and on any device."""
    from models import rectified_flow as rf

    b, _, frames, h, w = latents_BCTHW.shape
    g = _step_generator(job.stage.seed, step, dp_rank)
    noise = torch.randn(latents_BCTHW.shape, generator=g).to(latents_BCTHW.device)
    t_B = rf.sample_t(b, g, job.flow.t_loc, job.flow.t_scale)
    if job.flow.use_shift:   # spec §4.2: pixel H/W (latent x VAE factor), F = latent frames
        t_B = rf.shift_t(t_B, h * vae_downsample, w * vae_downsample, frames)
    drop_B = torch.rand(b, generator=g) < job.dit.caption_dropout_prob
    t_B = t_B.to(latents_BCTHW.device)
    return noise, t_B, rf.interpolate(latents_BCTHW, noise, t_B), drop_B.to(latents_BCTHW.device)


def _train_step(job: StageJob, model, opt, batch: Batch, step: int, layout: device.Layout, rt: device.Runtime,
                data_meta: dict) -> Tuple[float, float, float]:
    from models import rectified_flow as rf

    factor = int(data_meta.get("vae", {}).get("config", {}).get("spatial_downsample", 8))
    x0 = batch.latents_BCTHW
    noise, t_B, x_t, drop_B = flow_inputs(job, x0, step, layout.dp_rank, factor)
    with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.autocast):
        v_BCTHW = model(x_t, t_B, batch.text_BLD, batch.text_mask_BL, force_drop_B=drop_B)
    loss = rf.flow_loss(v_BCTHW.float(), x0, noise).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    parallel.sync_gradients(params)
    grad_norm = parallel.clip_grad_norm_tp(params, job.stage.grad_clip)
    st = job.stage
    lr = lr_at(step, st.lr, st.warmup_steps, st.lr_schedule, st.min_lr, st.steps)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return float(loss.detach()), grad_norm, lr


def _work(job: StageJob, batch: Batch) -> Tuple[int, float]:
    """(video tokens, model FLOPs of forward + backward) of this rank's micro-batch (spec §6.5, E = 12: the
    recomputation, when on, is not counted, so the MFU stays a model-FLOPs utilisation)."""
    from models.flops import _tokens, dit_train_flops

    shape = tuple(batch.latents_BCTHW.shape)
    b, per_sample = _tokens(job.dit, shape)
    return b * per_sample, dit_train_flops(job.dit, shape)


def _dp_sum(values) -> list:
    """Sum a few numbers over the data-parallel group (float64, one all_reduce)."""
    from megatron.core import parallel_state

    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
    return x.tolist()


@torch.no_grad()
def _ema_update(ema: Dict[str, torch.Tensor], model, decay: float) -> None:
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v, 1.0 - decay)
        else:
            ema[k].copy_(v)


def _save(job: StageJob, layout: device.Layout, model, opt, ema, step: int, loss: float) -> None:
    full, full_ema = parallel.gather_full_state_dict(model), parallel.gather_full_state_dict(model, ema)
    meta = {"stage": job.stage.name, "config_hash": job.config_hash, "tensor_parallel": layout.tp,
            "data_parallel": layout.dp, "dit": to_dict(job.dit), "loss": loss}
    rank_state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    root = layout.rank == 0
    checkpoint.save(job.output_dir, step, rank=layout.rank, model_sd=full if root else None,
                    ema_sd=full_ema if root else None, rank_state=rank_state, meta=meta,
                    keep=job.stage.keep_checkpoints)
    if root:
        print(f"saved {Path(job.output_dir) / checkpoint.step_name(step)}", flush=True)


def _param_count(model, layout: device.Layout) -> int:
    return sum(p.numel() * (layout.tp if getattr(p, "_tp_sharded", False) else 1) for p in model.parameters())


class _MetricsLog:
    """Rank 0 only: a stdout line, a metrics.jsonl line and (when configured) MLflow metrics per step."""

    def __init__(self, job: StageJob, layout: device.Layout, start: int, n_params: int, peak_flops_per_s: float):
        self.on, self.peak = layout.rank == 0, peak_flops_per_s   # peak of all processes together
        self.path = Path(job.output_dir) / "metrics.jsonl"
        self.client, self.run_id = None, job.mlflow_run_id
        if not self.on:
            return
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)
        if self.path.is_file():   # drop lines of steps after the checkpoint we resume from (they will be redone)
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if job.mlflow_tracking_uri:
            from mlflow.tracking import MlflowClient
            self.client = MlflowClient(job.mlflow_tracking_uri)
        print(f"stage={job.stage.name} world={layout.world_size} tp={layout.tp} dp={layout.dp} params={n_params} "
              f"start_step={start} steps={job.stage.steps} recompute={job.stage.recompute} "
              f"peak_tflops={self.peak / 1e12:.3f}", flush=True)

    def write(self, step: int, loss: float, grad_norm: float, lr: float, work, seconds: float) -> None:
        """``work`` = (samples, video tokens, model FLOPs) of the whole step, summed over DP ranks."""
        if not self.on:
            return
        samples, tokens, flops = work
        mfu = flops / seconds / self.peak if self.peak > 0 else float("nan")
        rec = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "step_time_s": seconds,
               "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "mfu": mfu}
        print(f"step={step} loss={loss:.6f} grad_norm={grad_norm:.4f} lr={lr:.3e} step_time={seconds:.3f}s "
              f"samples_per_s={samples / seconds:.2f} tokens_per_s={tokens / seconds:.1f} mfu={mfu:.4f}", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.client is not None:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            try:
                self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in rec.items()
                                                            if k != "step" and math.isfinite(v)])
            except Exception as e:   # tracking must not kill training; metrics.jsonl still has every step
                print(f"warning: MLflow logging disabled after an error: {e}", file=sys.stderr, flush=True)
                self.client = None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True, help="path of a StageJob JSON file (trainer/job.py)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="When using async grad allreduce")  # the component sets it on GPU
    try:
        train(StageJob.read(args.job))
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"trainer.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
