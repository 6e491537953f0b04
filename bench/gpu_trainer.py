"""The trainer's CUDA path end to end on one GPU: bf16, distributed optimizer, dist checkpoints, recompute, resume.

    python bench/gpu_trainer.py --out bench/results/gpu_trainer.json      # needs a CUDA device

Everything goes through the real launch path (``trainer.launch.run_stage`` -> TorchX local_cwd -> torchrun ->
``trainer.train``) with NCCL and no CPU shim, on a synthetic LatentDataset (``bench/scaling.write_dataset``) and a
1B-width DiT (hidden 1152, 16 heads, ``--depth`` blocks) over (24, 4, 32, 32) latents (1,024 video tokens) and 64
T5-width text tokens. Three stages:

- ``full``: bf16 autocast + fp32 master weights, torch AdamW, full-weights checkpoints (the default path);
- ``distopt``: megatron DDP + DistributedOptimizer, ``checkpoint_format: dist``, activation recomputation;
- ``resume``: ``distopt`` again, SIGKILLed after step ``--kill-at`` (``$VGEN_TEST_KILL_AFTER_STEP``), then rerun: it
  must continue from its last checkpoint. CUDA kernels are not bitwise deterministic here, so the resumed losses are
  compared with ``distopt``'s within a tolerance and the difference is reported, not asserted bitwise.

Prints one line per check and ``ok`` / ``FAILED``; the JSON holds per-stage losses, median step time, tokens/s, MFU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from scaling import write_dataset  # noqa: E402

from common.config import LaunchConfig, StageConfig  # noqa: E402
from models.config import DiTConfig  # noqa: E402


def _stage(name: str, steps: int, **kw) -> StageConfig:
    base = dict(name=name, steps=steps, lr=1e-4, warmup_steps=2, micro_batch_size=2, tensor_parallel=1,
                data_parallel=1, checkpoint_interval=5, keep_checkpoints=2, seed=7)
    return StageConfig(**{**base, **kw})


def _run(tmp: Path, stage: StageConfig, dit: DiTConfig, latents: Path, out: Path | None = None, gpu: int = 1) -> dict:
    from trainer.job import StageJob
    from trainer.launch import run_stage

    out = out or tmp / stage.name
    job = StageJob(stage=stage, dit=dit, latents_dir=str(latents), output_dir=str(out), config_hash=stage.name)
    launch = LaunchConfig(scheduler="local_cwd", cpu=8 if gpu else 1, gpu=gpu, timeout_s=600)
    t0 = time.perf_counter()
    lines: list = []
    run_stage(job, job.write(tmp / f"{stage.name}.json"), launch, log_dir=tmp / f"{stage.name}-logs",
              progress=lines.append)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - t0, "rows": rows, "out": out, "log_tail": lines[-5:]}


def _summary(rows: list, warmup: int) -> dict:
    tail = rows[warmup:] or rows
    return {"losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
            "median_step_s": statistics.median(r["step_time_s"] for r in tail),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in tail),
            "median_mfu": statistics.median(r["mfu"] for r in tail)}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kill-at", type=int, default=12)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_trainer.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="check this script's logic on CPU with a tiny DiT")
    args = ap.parse_args(argv)
    gpu = 0 if args.cpu_smoke else 1
    if gpu and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_trainer.py: no CUDA device visible (--cpu-smoke checks the logic on CPU)")
    from trainer import checkpoint
    from trainer.train import KILL_ENV

    hidden, heads, caption, latent = (48, 2, 64, (24, 2, 8, 8)) if args.cpu_smoke else (1152, 16, 4096, (24, 4, 32, 32))
    dit = DiTConfig(hidden_size=hidden, num_heads=heads, depth=args.depth, caption_channels=caption, max_text_len=64,
                    caption_dropout_prob=0.0)
    result: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__,
                    "dit": {"hidden_size": hidden, "num_heads": heads, "depth": args.depth}, "latent": list(latent),
                    "steps": args.steps, "checks": {}}
    checks = result["checks"]

    def latest_step(out: Path) -> Path:
        step_dir = checkpoint.latest(out)
        assert step_dir is not None, f"{out}: no checkpoint saved"
        return step_dir

    out = Path(args.out)

    def save() -> None:   # after every check: a run cut short by its time limit keeps what it has
        result["all_ok"] = all(c["ok"] for c in checks.values())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    def check(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"ok": bool(ok), "detail": detail}
        print(f"{'ok' if ok else 'FAILED'}  {name}: {detail}", flush=True)
        save()

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        latents = write_dataset(tmp / "latents", 8, latent, (64, caption), structured=True)
        runs = {}
        for stage in (_stage("full", args.steps),
                      _stage("distopt", args.steps, distributed_optimizer=True, checkpoint_format="dist",
                             recompute=True)):
            r = _run(tmp, stage, dit, latents, gpu=gpu)
            runs[stage.name] = r
            s = result[stage.name] = {**_summary(r["rows"], args.warmup), "wall_s": r["wall_s"]}
            finite = all(math.isfinite(v) for v in s["losses"] + s["grad_norms"])
            k = max(3, len(s["losses"]) // 3)   # a step's loss swings ~3x with its random t and clip: average
            first, last = statistics.mean(s["losses"][:k]), statistics.mean(s["losses"][-k:])
            check(f"{stage.name}_learns", finite and last < first,
                  f"loss {first:.4f} -> {last:.4f} (mean of first/last {k}), step {s['median_step_s'] * 1e3:.1f} ms, "
                  f"{s['median_tokens_per_s']:.0f} tokens/s, MFU {s['median_mfu']:.3f}")
        meta = checkpoint.read_meta(latest_step(runs["distopt"]["out"]))
        check("distopt_checkpoint", bool(meta.get("checkpoint_format") == "dist" and meta.get("distributed_optimizer")),
              f"meta {json.dumps({k: meta.get(k) for k in ('step', 'checkpoint_format', 'distributed_optimizer')})}")
        a, b = result["full"]["losses"], result["distopt"]["losses"]
        diff = max(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a[:5], b[:5]))
        check("distopt_matches_torch_adamw", diff < 5e-2,
              f"first 5 losses, max relative difference {diff:.2e} (bf16; recompute and the optimizer differ)")

        stage = _stage("resume", args.steps, distributed_optimizer=True, checkpoint_format="dist", recompute=True)
        os.environ[KILL_ENV] = f"0:{args.kill_at}"
        try:
            _run(tmp, stage, dit, latents, gpu=gpu)
            killed = False
        except RuntimeError as e:
            killed = "SIGKILL" in str(e) or "-9" in str(e) or "FAILED" in str(e)
        finally:
            os.environ.pop(KILL_ENV, None)
        saved = checkpoint.read_meta(latest_step(tmp / "resume"))["step"]
        r = _run(tmp, stage, dit, latents, gpu=gpu)
        resumed = [row["step"] for row in r["rows"]]
        ref = {row["step"]: row["loss"] for row in runs["distopt"]["rows"]}
        after = [row for row in r["rows"] if row["step"] > saved][-(args.steps - saved):]
        rdiff = max(abs(row["loss"] - ref[row["step"]]) / max(abs(ref[row["step"]]), 1e-8) for row in after)
        result["resume"] = {"killed_after": args.kill_at, "resumed_from": saved, "steps_logged": resumed,
                            "max_rel_loss_diff_vs_uninterrupted": rdiff}
        check("resume_after_sigkill", killed and saved == (args.kill_at // 5) * 5 and after[0]["step"] == saved + 1
              and rdiff < 5e-2,
              f"killed after step {args.kill_at}, resumed from step {saved}, "
              f"steps {after[0]['step']}..{after[-1]['step']} "
              f"within {rdiff:.2e} (relative) of the uninterrupted run")
    save()
    print(f"wrote {out}; all_ok={result['all_ok']}", flush=True)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
