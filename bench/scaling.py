"""Weak scaling of the trainer on this machine: 1 vs 2 data-parallel processes (gloo), same per-process batch.

    python bench/scaling.py                 # CPU -> bench/results/scaling_cpu.json, prints `efficiency <x>`
    python bench/scaling.py --cuda          # 1 GPU, 10B layer shapes, bf16 -> bench/results/scaling_cuda.json

Both modes run the real launch path (``trainer.launch.run_stage`` -> TorchX local_cwd -> torchrun ->
``trainer.train``) on a synthetic LatentDataset written in the documented format, and read the per-step times
and MFU the trainer logs to ``metrics.jsonl`` over the steps after ``--warmup``: the best step (the figure used for
``efficiency``, since on shared cores a busy neighbour can only slow a step down) and the median.

CPU: each process gets one thread (``LaunchConfig.cpu`` = processes, so ``OMP_NUM_THREADS`` = 1) and the same
micro-batch, so perfect weak scaling keeps the step time: ``efficiency = t(1 process) / t(2 processes)`` (=
throughput(2) / (2 x throughput(1))). The DiT (hidden 288, 4 heads, depth 4, latent (24, 5, 32, 32) = 1,280 video
tokens, 2 clips per process) keeps the gradient all-reduce (4.6 M fp32 parameters) small next to the compute, as
at scale.

``--cuda`` (not run on the development machine, which has no GPU): one process, the 10B layer (hidden 3456,
48 heads) with ``--depth`` blocks over a (24, 4, 90, 160) latent (14,400 tokens) and 300 T5-width text tokens,
bf16 autocast with fp32 master weights (the trainer's GPU path), and prints the trainer's per-step MFU
(docs/mugv.md §6.5 FLOPs over the device peak, ``trainer.device.PEAK_FLOPS_GPU_BF16``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.config import LaunchConfig, StageConfig  # noqa: E402
from models.config import DiTConfig  # noqa: E402


def write_dataset(root: Path, n: int, latent_shape: tuple, text_shape: tuple, seed: int = 0,
                  structured: bool = False) -> Path:
    """A LatentDataset folder (``common.latents.LatentWriter``) of ``n`` random clips of one shape; ``structured``
    adds a smooth per-clip pattern to the latents, so that a short run has something to learn."""
    import torch

    from common.latents import LatentWriter

    g = torch.Generator().manual_seed(seed)
    writer = LatentWriter(root)
    for i in range(n):
        latent = torch.randn(latent_shape, generator=g)
        if structured:
            base = torch.linspace(-1, 1, latent_shape[-1]).expand(*latent_shape)
            latent = (base * (1 + i % 3) + 0.1 * latent).contiguous()
        text = torch.randn(text_shape, generator=g)
        writer.add(f"clip{i:04d}", latent, text, torch.ones(text_shape[0], dtype=torch.uint8), score=0.0)
    writer.finish({"vae": {"config": {"spatial_downsample": 8}}, "latent_mean": [0.0] * latent_shape[0],
                   "latent_std": [1.0] * latent_shape[0]})
    return root


def run(tmp: Path, name: str, dit: DiTConfig, latents: Path, dp: int, steps: int, mbs: int, cpu: int,
        gpu: int = 0) -> list:
    from trainer.job import StageJob
    from trainer.launch import run_stage

    stage = StageConfig(name=name, steps=steps, lr=1e-4, warmup_steps=0, micro_batch_size=mbs, data_parallel=dp,
                        tensor_parallel=1, checkpoint_interval=steps, keep_checkpoints=1)
    job = StageJob(stage=stage, dit=dit, latents_dir=str(latents), output_dir=str(tmp / name), config_hash=name)
    launch = LaunchConfig(scheduler="local_cwd", cpu=cpu, gpu=gpu, timeout_s=1200)
    run_stage(job, job.write(tmp / f"{name}.json"), launch, log_dir=tmp / f"{name}-logs", progress=lambda m: None)
    return [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]


def _median(rows: list, key: str, warmup: int) -> float:
    return statistics.median(r[key] for r in rows[warmup:])


def cpu_main(args) -> dict:
    dit = DiTConfig(hidden_size=288, num_heads=4, depth=4, caption_channels=64, max_text_len=32,
                    caption_dropout_prob=0.0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        latents = write_dataset(tmp / "latents", 8, (24, 5, 32, 32), (32, 64))
        times, best = {}, {}
        for dp in (1, 2):
            rows = run(tmp, f"weak-dp{dp}", dit, latents, dp, args.steps, args.mbs, cpu=dp)
            times[dp] = _median(rows, "step_time_s", args.warmup)
            best[dp] = min(r["step_time_s"] for r in rows[args.warmup:])
            print(f"dp={dp} processes={dp} threads_per_process=1 best_step_s={best[dp]:.4f} "
                  f"median_step_s={times[dp]:.4f} samples_per_s={dp * args.mbs / best[dp]:.2f}", flush=True)
    eff = best[1] / best[2]
    return {"mode": "cpu", "dit": {"hidden_size": 288, "num_heads": 4, "depth": 4}, "latent": [24, 5, 32, 32],
            "micro_batch_per_process": args.mbs, "steps": args.steps, "warmup_steps_dropped": args.warmup,
            "best_step_s": {str(k): v for k, v in best.items()},
            "median_step_s": {str(k): v for k, v in times.items()}, "efficiency": eff,
            "efficiency_median": times[1] / times[2], "target": 0.85,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine()}


def cuda_main(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/scaling.py --cuda: no CUDA device visible")
    dit = DiTConfig(hidden_size=3456, num_heads=48, depth=args.depth, caption_channels=4096, max_text_len=300,
                    caption_dropout_prob=0.0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        latents = write_dataset(tmp / "latents", 2, (24, 4, 90, 160), (300, 4096))
        rows = run(tmp, "mfu-1gpu", dit, latents, 1, args.steps, 1, cpu=8, gpu=1)
    out = {"mode": "cuda", "device": torch.cuda.get_device_name(0), "depth": args.depth, "latent": [24, 4, 90, 160],
           "median_step_s": _median(rows, "step_time_s", args.warmup), "median_mfu": _median(rows, "mfu", args.warmup),
           "median_tokens_per_s": _median(rows, "tokens_per_s", args.warmup)}
    print(f"mfu {out['median_mfu']:.3f} step_s {out['median_step_s']:.3f} device {out['device']}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="single-GPU MFU at the 10B layer shapes")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians")
    parser.add_argument("--mbs", type=int, default=2, help="micro-batch per process (CPU)")
    parser.add_argument("--depth", type=int, default=4, help="DiT blocks (--cuda)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    result = cuda_main(args) if args.cuda else cpu_main(args)
    out = Path(args.out or REPO / "bench" / "results" / f"scaling_{result['mode']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.cuda:
        print(f"efficiency {result['efficiency']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
