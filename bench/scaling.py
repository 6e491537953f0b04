"""Weak scaling and overhead of the trainer on this machine: 1 vs 2 data-parallel processes (gloo), same
per-process batch, and the trainer's step against the bare model step.

    python bench/scaling.py                 # CPU -> bench/results/scaling_cpu.json, prints `overhead`, `efficiency`
    python bench/scaling.py --quick         # smoke run: 6 steps, no switches-off run (~1.5 min)
    python bench/scaling.py --cuda          # 1 GPU, 10B layer shapes, bf16 -> bench/results/scaling_cuda.json

Both modes run the real launch path (``trainer.launch.run_stage`` -> TorchX local_cwd -> torchrun ->
``trainer.train``) on a synthetic LatentDataset written in the documented format, and read the per-step times
and MFU the trainer logs to ``metrics.jsonl`` over the steps after ``--warmup``: the best step (the figure used for
``efficiency``, since on shared cores a busy neighbour can only slow a step down) and the median.

CPU: each process gets one thread (``LaunchConfig.cpu`` = processes, so ``OMP_NUM_THREADS`` = 1) and the same micro-
batch, so perfect weak scaling keeps the step time: ``efficiency = t(1 process) / t(2 processes)`` (= throughput(2)
/ (2 x throughput(1))), printed beside the machine's own limit (``hardware_ceiling``: the bare step in two processes
at once vs one alone, no communication). ``overhead = t(trainer, 1 process) / t(bare)`` on the median steps: t(bare)
is forward + backward + AdamW step of the same model (same seed, micro-batch, inputs from
``trainer.train.micro_batch``, the same AdamW kernel) timed in this process on one thread, before and after each
1-process trainer run, so the trainer's data, gradient sync, EMA, metrics and checkpoints are what the ratio adds
(target <= 1.1; ``overhead_best`` on the best steps). A third trainer run with every
overhead-hiding switch off (``StageConfig.overlap_grad_reduce``, ``prefetch``, ``async_checkpoint``,
``optimizer_impl`` "for_loop") gives ``overhead_switches_off``. Each figure is stored with the load average around
it: on shared cores the ratios measured side by side in one run are what count. The DiT (hidden 288, 4 heads, depth
4, latent (24, 5, 32, 32) = 1,280 video tokens, 2 clips per process) keeps the gradient all-reduce (4.6 M fp32
parameters) small next to the compute, as at scale.

``--cuda`` (not run on the development machine, which has no GPU): one process, the 10B layer (hidden 3456,
48 heads) with ``--depth`` blocks over a (24, 4, 90, 160) latent (14,400 tokens) and 300 T5-width text tokens,
bf16 autocast on bf16 copies of the weights with fp32 masters (the trainer's GPU path, ``stage.bf16_weights``
"auto"), and prints the trainer's per-step MFU (docs/mugv.md §6.5 FLOPs over the device peak,
``trainer.device.PEAK_FLOPS_GPU_BF16``) and against the bf16 matmul peak measured in the same run, once eager and
once with ``compile: blocks`` (``--no-compile``: eager only). The ``PROFILED_STEPS`` steps after the warm-up are
profiled (``trainer.profiling``; rank 0's op table by device time goes into the JSON) and left out of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

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


SWITCHES_OFF = dict(overlap_grad_reduce=False, prefetch=False, async_checkpoint=False, optimizer_impl="for_loop")


def _stage(name: str, dp: int, steps: int, mbs: int, **kw) -> StageConfig:
    return StageConfig(name=name, steps=steps, lr=1e-4, warmup_steps=0, micro_batch_size=mbs, data_parallel=dp,
                       tensor_parallel=1, checkpoint_interval=max(1, steps // 2), keep_checkpoints=1, **kw)


def run(tmp: Path, name: str, dit: DiTConfig, latents: Path, dp: int, steps: int, mbs: int, cpu: int,
        gpu: int = 0, **switches) -> list:
    from trainer.job import StageJob
    from trainer.launch import run_stage

    stage = _stage(name, dp, steps, mbs, **switches)   # a checkpoint mid-run and at the end: the trainer's cost
    job = StageJob(stage=stage, dit=dit, latents_dir=str(latents), output_dir=str(tmp / name), config_hash=name)
    launch = LaunchConfig(scheduler="local_cwd", cpu=cpu, gpu=gpu, timeout_s=1200)
    run_stage(job, job.write(tmp / f"{name}.json"), launch, log_dir=tmp / f"{name}-logs", progress=lambda m: None)
    return [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]


def _median(rows: list, key: str, warmup: int) -> float:
    return statistics.median(r[key] for r in rows[warmup:])


def bare_step_times(dit: DiTConfig, latents: Path, mbs: int, steps: int,
                    ready: Optional[Callable[[], None]] = None) -> list:
    """Seconds of forward + backward + AdamW step of the trainer's model on one thread in this process: the same
    seeded MUGDiT, a micro-batch built by ``trainer.train.micro_batch`` from the dataset (outside the timing), the
    trainer's AdamW kernel and deterministic algorithms; no data loading, sync, EMA, metrics or checkpoints.
    ``ready``: called once the model and micro-batch are built, before the first timed step."""
    import time

    import torch

    from models.dit import MUGDiT
    from trainer import device, optim
    from trainer.data import LatentSplit
    from trainer.job import StageJob
    from trainer.train import _forward, _loss, micro_batch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rt = device.Runtime(torch.device("cpu"), "gloo", torch.float32)
    stage = _stage("bare", 1, steps, mbs)
    job = StageJob(stage=stage, dit=dit, latents_dir=str(latents), output_dir="unused")
    torch.manual_seed(stage.seed)
    model = MUGDiT(dit)
    model.y_embedder.dropout_prob = 0.0
    model.train()
    opt, _ = optim.build_optimizer(stage, dit, model, None)
    m = micro_batch(job, LatentSplit(latents).batch(list(range(mbs))), 0, 0, vae_factor=8)
    if ready is not None:   # everything is built: wait for the go (hardware_ceiling starts its children together)
        ready()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _loss(_forward(model, m, rt), m).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def cpu_dit() -> DiTConfig:
    """The CPU bench's DiT (module docstring)."""
    return DiTConfig(hidden_size=288, num_heads=4, depth=4, caption_channels=64, max_text_len=32,
                     caption_dropout_prob=0.0)


def hardware_ceiling(latents: Path, mbs: int, steps: int, warmup: int) -> dict:
    """The machine's own weak-scaling limit: the bare step (``bare_step_times``, one thread) in one process alone,
    then in two processes at once (their timed steps start together), with no communication between them.
    ``ceiling`` = t(alone) / t(slower of the two), on the best steps: what ``efficiency`` could reach if the trainer
    added nothing (shared memory bandwidth, caches, or two vCPUs that are one core's hyperthreads show here, not in
    the trainer)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-child", str(latents), "--mbs", str(mbs),
           "--steps", str(steps), "--warmup", str(warmup)]

    def best_of(n: int) -> list:
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        pipes = [(p.stdin, p.stdout) for p in procs if p.stdin is not None and p.stdout is not None]
        for _, stdout in pipes:   # each child says "ready" once built and waits: the timed steps start together
            if not any(line.strip() == "ready" for line in iter(stdout.readline, "")):
                raise RuntimeError("bench/scaling.py --bare-child exited before it was ready: run it alone to see "
                                   f"its error: {' '.join(cmd)}")
        for stdin, _ in pipes:
            stdin.write("go\n")
            stdin.flush()
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"bench/scaling.py --bare-child failed (return codes {[p.returncode for p in procs]}): "
                               f"run it alone to see its error: {' '.join(cmd)}")
        return [float(o.split()[-1]) for o in outs]

    alone, together = best_of(1), best_of(2)
    res = {"bare_best_step_s_alone": alone[0], "bare_best_step_s_two_at_once": together,
           "ceiling": alone[0] / max(together), "load_after": os.getloadavg()}
    print(f"hardware ceiling: bare step alone {alone[0]:.4f} s, two processes at once {together[0]:.4f} / "
          f"{together[1]:.4f} s -> ceiling {res['ceiling']:.3f}", flush=True)
    return res


def cpu_main(args) -> dict:
    dit = cpu_dit()
    load_before = os.getloadavg()
    loads = {}

    def bare(tag: str) -> list:
        t = bare_step_times(dit, latents, args.mbs, args.steps)[args.warmup:]
        loads[f"bare_{tag}"] = os.getloadavg()
        print(f"bare fwd+bwd+adam (this process, 1 thread) median_step_s={statistics.median(t):.4f} "
              f"load={loads[f'bare_{tag}']}", flush=True)
        return t

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        latents = write_dataset(tmp / "latents", 8, (24, 5, 32, 32), (32, 64))
        bare_times = bare("0")
        times, best = {}, {}
        runs: list = [("dp1", 1, {})] + ([] if args.quick else [("dp1_switches_off", 1, SWITCHES_OFF)]) + \
            [("dp2", 2, {})] + ([] if args.quick else [("dp2_switches_off", 2, SWITCHES_OFF)])
        for name, dp, switches in runs:   # the bare step is timed between the runs (the load drifts)
            rows = run(tmp, f"weak-{name}", dit, latents, dp, args.steps, args.mbs, cpu=dp, **switches)
            times[name] = _median(rows, "step_time_s", args.warmup)
            best[name] = min(r["step_time_s"] for r in rows[args.warmup:])
            loads[name] = os.getloadavg()
            print(f"{name} processes={dp} threads_per_process=1 best_step_s={best[name]:.4f} "
                  f"median_step_s={times[name]:.4f} samples_per_s={dp * args.mbs / best[name]:.2f} "
                  f"load={loads[name]}", flush=True)
            if dp == 1:
                bare_times += bare(f"after_{name}")
        ceiling = hardware_ceiling(latents, args.mbs, args.steps, args.warmup)
    bare_median, bare_best = statistics.median(bare_times), min(bare_times)
    out = {"mode": "cpu", "quick": args.quick,
           "dit": {"hidden_size": dit.hidden_size, "num_heads": dit.num_heads, "depth": dit.depth},
           "latent": [24, 5, 32, 32], "micro_batch_per_process": args.mbs, "steps": args.steps,
           "warmup_steps_dropped": args.warmup, "checkpoint_interval": max(1, args.steps // 2),
           "best_step_s": best, "median_step_s": times, "bare_median_step_s": bare_median,
           "bare_best_step_s": bare_best, "overhead": times["dp1"] / bare_median, "overhead_target": 1.1,
           "overhead_best": best["dp1"] / bare_best,
           "efficiency": best["dp1"] / best["dp2"], "efficiency_median": times["dp1"] / times["dp2"],
           "efficiency_target": 0.95, "hardware_ceiling": ceiling,
           "efficiency_of_ceiling": best["dp1"] / best["dp2"] / ceiling["ceiling"],
           "loadavg_before": load_before, "loadavg_after_each": loads, "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine()}
    if "dp1_switches_off" in times:
        out["overhead_switches_off"] = times["dp1_switches_off"] / bare_median
        out["overhead_switches_off_best"] = best["dp1_switches_off"] / bare_best
    if "dp2_switches_off" in times:   # the same 1 -> 2 processes without the trainer's threads (prefetch, writer)
        out["efficiency_switches_off"] = best["dp1_switches_off"] / best["dp2_switches_off"]
        out["efficiency_switches_off_median"] = times["dp1_switches_off"] / times["dp2_switches_off"]
    return out


# --cuda: steps profiled in each trainer run (trainer.profiling; rank 0's op table goes into the JSON), the first ones
# after the warm-up: with the default 14 steps and 4 warm-up steps not a checkpoint step (7 and 14 are), so the table
# shows the training step itself
PROFILED_STEPS = 2


def cuda_main(args, save=lambda result: None) -> dict:
    """The ``--cuda`` mode (module docstring); ``save(result so far)`` is called after each trainer run."""
    import torch

    from trainer.device import PEAK_FLOPS_GPU_BF16
    from trainer.profiling import PROFILE_ENV

    if not torch.cuda.is_available():
        raise SystemExit("bench/scaling.py --cuda: no CUDA device visible")
    sys.path.insert(0, str(REPO / "bench"))
    from dit_step import matmul_peak  # the same 8192^3 bf16 matmul as dit_step.py --cuda, best of 20

    dev = torch.device("cuda", 0)
    measured = matmul_peak(torch.bfloat16, dev, 8192, 20)["flops_per_s"]
    gpu_name = torch.cuda.get_device_name(dev)
    sheet = next((v for k, v in PEAK_FLOPS_GPU_BF16.items() if k in gpu_name), 0.0)   # the trainer's default MFU peak
    dit = DiTConfig(hidden_size=3456, num_heads=48, depth=args.depth, caption_channels=4096, max_text_len=300,
                    caption_dropout_prob=0.0)
    out: dict = {"mode": "cuda", "device": gpu_name, "depth": args.depth,
                 "latent": [24, 4, 90, 160], "matmul_peak_bf16_measured": measured, "peak_datasheet": sheet,
                 "mfu_target_vs_measured_peak": 0.50, "runs": {}}
    print(f"bf16 matmul peak {measured / 1e12:.0f} TFLOP/s measured, {sheet / 1e12:.0f} datasheet", flush=True)
    runs: list = [("eager", {})] + ([] if args.no_compile else [("compiled", {"compile": "blocks"})])
    peak = {"peak_tflops": measured / 1e12}   # the trainer logs `mfu` against the measured peak (stage.peak_tflops)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        latents = write_dataset(tmp / "latents", 2, (24, 4, 90, 160), (300, 4096))
        for name, switches in runs:
            folder = tmp / f"mfu-1gpu-{name}"
            os.environ[PROFILE_ENV] = f"{args.warmup + 1}:{PROFILED_STEPS}"   # the first steps after the warm-up
            try:
                rows = run(tmp, folder.name, dit, latents, 1, args.steps, 1, cpu=8, gpu=1, **peak, **switches)
                table = folder / "profile" / "rank00000.txt"
                profile_table = table.read_text() if table.is_file() else "(not written)"
            except RuntimeError as e:   # the stage failed or timed out (run_stage): the error is the result. Not
                # Exception: TorchX turns this process's SIGTERM (the caller's time limit) into an Exception, which
                # must end the bench rather than start the next run
                out["runs"][name] = {"error": f"{type(e).__name__}: {e}"[-600:]}
                print(f"[{name}] failed: {out['runs'][name]['error']}", flush=True)
                save(out)
                continue
            finally:
                del os.environ[PROFILE_ENV]
                shutil.rmtree(folder, ignore_errors=True)   # ~14 GB of checkpoints per run
            timed = rows[:args.warmup] + rows[args.warmup + PROFILED_STEPS:]   # profiled steps are slower: left out
            mfu = _median(timed, "mfu", args.warmup)
            res = {"switches": switches, "median_step_s": _median(timed, "step_time_s", args.warmup),
                   "best_step_s": min(r["step_time_s"] for r in timed[args.warmup:]),
                   "median_mfu_vs_measured_peak": mfu,
                   "median_mfu_datasheet": mfu * measured / sheet if sheet else None,
                   "median_tokens_per_s": _median(timed, "tokens_per_s", args.warmup),
                   "profile_table": profile_table}
            out["runs"][name] = res
            save(out)
            print(f"[{name}] trainer mfu {mfu:.3f} of the measured peak "
                  f"({res['median_mfu_datasheet'] or 0:.3f} of the datasheet); "
                  f"step {res['median_step_s']:.3f} s median, "
                  f"{res['best_step_s']:.3f} s best; {res['median_tokens_per_s']:.0f} tokens/s", flush=True)
    done = [n for n, r in out["runs"].items() if "median_mfu_vs_measured_peak" in r]
    if not done:
        raise SystemExit("bench/scaling.py --cuda: no trainer run finished (errors above)")
    best_run = max(done, key=lambda n: out["runs"][n]["median_mfu_vs_measured_peak"])
    out.update(best_run=best_run, median_mfu_vs_measured_peak=out["runs"][best_run]["median_mfu_vs_measured_peak"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="single-GPU MFU at the 10B layer shapes")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 2 warm-up, no switches-off run")
    parser.add_argument("--mbs", type=int, default=2, help="micro-batch per process (CPU)")
    parser.add_argument("--depth", type=int, default=4, help="DiT blocks (--cuda)")
    parser.add_argument("--no-compile", action="store_true", help="--cuda: the eager trainer run only")
    parser.add_argument("--out", default="")
    parser.add_argument("--bare-child", default="", help=argparse.SUPPRESS)   # hardware_ceiling's worker
    args = parser.parse_args(argv)
    if args.bare_child:   # prints the best bare step time after the warm-up steps (last word of stdout)
        def ready() -> None:
            print("ready", flush=True)
            sys.stdin.readline()
        print(min(bare_step_times(cpu_dit(), Path(args.bare_child), args.mbs, args.steps, ready)[args.warmup:]))
        return 0
    if args.quick:
        args.steps, args.warmup = 6, 2
    out = Path(args.out or REPO / "bench" / "results" / f"scaling_{'cuda' if args.cuda else 'cpu'}.json")

    def save(result: dict) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    result = cuda_main(args, save) if args.cuda else cpu_main(args)
    save(result)
    if not args.cuda:
        print(f"overhead {result['overhead']:.3f}", flush=True)
        print(f"efficiency {result['efficiency']:.3f} (hardware ceiling {result['hardware_ceiling']['ceiling']:.3f}: "
              f"{result['efficiency_of_ceiling']:.3f} of it)", flush=True)
        if "efficiency_switches_off" in result:
            print(f"efficiency_switches_off {result['efficiency_switches_off']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
