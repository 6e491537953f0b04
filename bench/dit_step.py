"""One MUGDiT training step (forward + backward), timed against this machine's measured matmul peak.

    python bench/dit_step.py                 # CPU: fp32 and bf16 autocast, eager and compiled -> dit_step_cpu.json
    python bench/dit_step.py --cuda          # GPU: 10B layer shapes in bf16, eager and compiled -> dit_step_cuda.json
    python bench/dit_step.py --no-compile    # eager only (the fast path is models/compile.py's compile_blocks)
    python bench/dit_step.py --cuda --profile   # + self-attention per SDPA backend, kernel time by kind (after)

CPU config (``cpu_config``): the 1B variant's layer shape (hidden 1152 = 16 heads x 72, docs/mugv.md §3.1), depth 2, a
(1, 24, 4, 32, 32) latent = 1,024 video tokens, and 300 T5-width (4096) text tokens, the formula's fixed C. At this
size >90% of the work is [1026 x 1152]-class GEMMs, so the step can approach the GEMM peak; attention (L/h = 0.89 of
the 8.4 per-token terms) is ~10% of the FLOPs and elementwise ops (norms, modulation, RoPE) are the overhead to beat.

Reported: the achieved FLOP/s counted two ways, the docs/mugv.md §6.5 formula (``models.flops``, the MFU convention: DiT
layer GEMMs only, E=12) and ``FlopCounterMode`` on the real step (embedders, head and the attention-backward
recompute included); and ``fraction_of_peak`` = formula FLOP/s over the best large square matmul of the same dtype
measured in the same run (``fraction_of_peak_counted`` uses the counted FLOPs). The optimizer step is not timed.

``--cuda`` builds hidden 3456 / 48 heads (the 10B layer) with ``--depth`` blocks (default 4) over a 720p-like
latent (1, 24, 4, 90, 160) = 14,400 tokens, all in bf16 (parameters too, as the reference runs), flash-attn for
self-attention when installed (models/attention.py), and prints MFU against both the measured bf16 matmul peak and
the H100/H200 SXM datasheet dense bf16 peak (989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.compile import compile_blocks  # noqa: E402
from models.config import DiTConfig  # noqa: E402
from models.dit import MUGDiT  # noqa: E402
from models.flops import dit_train_flops, flop_counter  # noqa: E402

DATASHEET_BF16_DENSE = {"H100": 989e12, "H200": 989e12}   # SXM, dense (no sparsity), TFLOP/s * 1e12


def cpu_config() -> tuple[DiTConfig, tuple, int]:
    cfg = DiTConfig(hidden_size=1152, num_heads=16, depth=2, caption_channels=4096, max_text_len=300,
                    caption_dropout_prob=0.0)
    return cfg, (1, 24, 4, 32, 32), 300


def cuda_config(depth: int) -> tuple[DiTConfig, tuple, int]:
    cfg = DiTConfig(hidden_size=3456, num_heads=48, depth=depth, caption_channels=4096, max_text_len=300,
                    caption_dropout_prob=0.0)
    return cfg, (1, 24, 4, 90, 160), 300


def lscpu() -> Dict[str, object]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
    return {"model_name": fields.get("Model name", platform.processor()), "vendor": fields.get("Vendor ID"),
            "family_model_stepping": [fields.get("CPU family"), fields.get("Model"), fields.get("Stepping")],
            "hypervisor": fields.get("Hypervisor vendor"), "cpus": os.cpu_count(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads_per_core": fields.get("Thread(s) per core"), "l2": fields.get("L2 cache"),
            "l3": fields.get("L3 cache"), "flags": {f: f in flags for f in wanted}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> List[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int, repeats: int) -> Dict[str, float]:
    """Best FLOP/s of an n x n x n matmul (2n^3 FLOPs) over ``repeats`` runs."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = timed(lambda: torch.mm(a, b, out=out), device, repeats)
    return {"n": n, "best_s": min(times), "flops_per_s": 2 * n ** 3 / min(times)}


def make_step(model: MUGDiT, inputs, autocast_dtype):
    x, t, text, mask, target = inputs
    device = x.device

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x, t, text, mask)
        ((out - target) ** 2).mean().backward()
    return step


def make_inputs(cfg: DiTConfig, shape, text_len: int, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    b = shape[0]
    x = torch.randn(*shape, generator=g).to(device, dtype)
    text = torch.randn(b, text_len, cfg.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(b, text_len, dtype=torch.bool, device=device)
    t = torch.full((b,), 500.0, device=device)
    target = torch.randn(*shape, generator=g).to(device)
    return x, t, text, mask, target


def counted_flops(step: Callable[[], None]) -> int:
    with flop_counter() as fc:
        step()
    return fc.get_total_flops()


def _mode_result(name: str, times: List[float], analytic: float, counted: int, peak: float) -> Dict[str, Any]:
    best, median = min(times), statistics.median(times)
    res: Dict[str, Any] = {
        "step_s_best": best, "step_s_median": median, "step_s_all": times,
        "analytic_flops": analytic, "counted_flops": counted,
        "achieved_flops_per_s_analytic": analytic / best, "achieved_flops_per_s_counted": counted / best,
        "peak_flops_per_s": peak, "fraction_of_peak": analytic / best / peak,
        "fraction_of_peak_counted": counted / best / peak}
    print(f"[{name}] step {best:.3f} s (median {median:.3f} s of {len(times)}); analytic {analytic / 1e9:.1f} GFLOP, "
          f"counted {counted / 1e9:.1f} GFLOP; achieved {res['achieved_flops_per_s_analytic'] / 1e9:.1f} GFLOP/s "
          f"(counted {res['achieved_flops_per_s_counted'] / 1e9:.1f})", flush=True)
    return res


def run_mode(name: str, model: MUGDiT, inputs, autocast_dtype, analytic: float, peak: float, repeats: int,
             device, fast_model: MUGDiT | None = None) -> Dict[str, Dict[str, Any]]:
    """{name: eager result} and, with ``fast_model``, {name + "_compiled": result with compile_s and speedup}:
    eager and compiled steps alternate, one of each per repeat."""
    step = make_step(model, inputs, autocast_dtype)
    counted = counted_flops(step)                       # also the eager warm-up step
    if fast_model is None:
        return {name: _mode_result(name, timed(step, device, repeats, warmup=0), analytic, counted, peak)}
    fast = make_step(fast_model, inputs, autocast_dtype)
    first = timed(fast, device, 1, warmup=0)[0]         # compiles (inductor's on-disk cache may shorten it)
    eager_t: List[float] = []
    fast_t: List[float] = []
    for _ in range(repeats):
        eager_t += timed(step, device, 1, warmup=0)
        fast_t += timed(fast, device, 1, warmup=0)
    out = {name: _mode_result(name, eager_t, analytic, counted, peak),
           f"{name}_compiled": _mode_result(f"{name}_compiled", fast_t, analytic, counted, peak)}
    res = out[f"{name}_compiled"]
    res.update(first_step_s=first, compile_s=first - min(fast_t), speedup=min(eager_t) / min(fast_t),
               speedup_median=statistics.median(eager_t) / statistics.median(fast_t))
    print(f"[{name}_compiled] compile {res['compile_s']:.1f} s (first step {first:.1f} s); speedup {name} "
          f"{res['speedup']:.3f} (medians {res['speedup_median']:.3f})", flush=True)
    return out


def compiled_copy(model: MUGDiT, mode: str | None) -> MUGDiT:
    """The same weights with every block compiled (models/compile.py): the fast path next to its eager reference."""
    fast = copy.deepcopy(model)
    compile_blocks(fast, mode=mode)
    return fast


def bench_cpu(args) -> Dict[str, object]:
    cpus = os.cpu_count()
    assert cpus is not None, "os.cpu_count() could not tell the number of CPUs"
    torch.set_num_threads(cpus)
    device = torch.device("cpu")
    load_before = os.getloadavg()
    cfg, shape, text_len = cpu_config()
    peaks: Dict[str, Dict[str, Any]] = {   # per dtype; "flops_per_s_before_after" (a list) is added below
        "fp32": matmul_peak(torch.float32, device, args.peak_n, args.peak_repeats),
        "bf16": matmul_peak(torch.bfloat16, device, args.peak_n, args.peak_repeats)}
    torch.manual_seed(0)
    model = MUGDiT(cfg).train()
    inputs = make_inputs(cfg, shape, text_len, device)
    analytic = dit_train_flops(cfg, shape, context_len=text_len)
    steps = {"fp32": (None, "fp32"), "bf16_autocast": (torch.bfloat16, "bf16")}
    fast_model = None if args.no_compile else compiled_copy(model, args.compile_mode)
    modes: Dict[str, Dict[str, Any]] = {}
    for name, (autocast_dtype, _peak_key) in steps.items():
        modes.update(run_mode(name, model, inputs, autocast_dtype, analytic, 1.0, args.repeats, device, fast_model))
    # peaks again after the steps (best of both): a busy neighbour on shared cores only ever lowers a measurement
    for key in peaks:
        again = matmul_peak(torch.float32 if key == "fp32" else torch.bfloat16, device, args.peak_n,
                            args.peak_repeats)
        peaks[key]["flops_per_s_before_after"] = [peaks[key]["flops_per_s"], again["flops_per_s"]]
        peaks[key]["flops_per_s"] = max(peaks[key]["flops_per_s"], again["flops_per_s"])
        peaks[key]["best_s"] = min(peaks[key]["best_s"], again["best_s"])
        print(f"matmul peak {key}: {peaks[key]['flops_per_s'] / 1e9:.1f} GFLOP/s ({args.peak_n}^3, best of "
              f"{2 * args.peak_repeats}, before and after the steps)")
    for name, m in modes.items():
        peak = peaks[steps[name.removesuffix("_compiled")][1]]["flops_per_s"]
        m.update(peak_flops_per_s=peak, fraction_of_peak=m["achieved_flops_per_s_analytic"] / peak,
                 fraction_of_peak_counted=m["achieved_flops_per_s_counted"] / peak)
    for name, m in modes.items():
        print(f"fraction_of_peak {name} {m['fraction_of_peak']:.3f} (counted {m['fraction_of_peak_counted']:.3f})")
    for name in steps:
        if f"{name}_compiled" in modes:
            print(f"speedup {name} {modes[f'{name}_compiled']['speedup']:.3f}")
    load_after = os.getloadavg()
    if max(load_before[0], load_after[0]) > cpus + 0.5:
        print(f"note: load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {cpus} CPUs: other "
              "processes shared the cores, numbers are noisy (best-of-N keeps the least disturbed runs)")
    return {"device": "cpu", "cpu": lscpu(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(), "loadavg_1min_before_after": [load_before[0],
                                                                                       load_after[0]],
            "config": {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads, "depth": cfg.depth,
                       "caption_channels": cfg.caption_channels, "latent_BCTHW": list(shape), "text_len": text_len,
                       "video_tokens": shape[2] * shape[3] * shape[4] // 4},
            "attention_backends": attention_backends(model, inputs),
            "matmul_peak": peaks, "modes": modes, "target_fraction_fp32": 0.40,
            "meets_target": modes["fp32"]["fraction_of_peak"] >= 0.40,
            "compile_mode": None if args.no_compile else (args.compile_mode or "default"),
            "target_speedup": 1.1, "speedup": {n: modes[f"{n}_compiled"]["speedup"] for n in steps
                                               if f"{n}_compiled" in modes}}


def attention_backends(model: MUGDiT, inputs) -> Dict[str, str]:
    """Which kernel models/attention.py runs for block 0's self- and cross-attention at these shapes (eager)."""
    from models.attention import attention_backend

    x, t, text, mask, _ = inputs
    hd = model.cfg.head_dim
    with torch.no_grad():
        ctx = model.condition(x, t, text, mask)
        l_tok, s_tok = ctx["cos_LK"].shape[0], text.shape[1]
        b, heads = x.shape[0], model.cfg.num_heads
        q = torch.empty(b, heads, l_tok, hd, device=x.device, dtype=ctx["dtype"])
        k = torch.empty(b, heads, s_tok, hd, device=x.device, dtype=ctx["dtype"])
        return {"self": attention_backend(q, q, q), "cross": attention_backend(q, k, k, mask[:, None, None, :])}


ATTENTION_BWD_PER_FWD = 2.5   # flash-attention convention: the backward's 5 matmuls (recompute included) vs 2 forward


def attention_kernels(device: torch.device, heads: int, tokens: int, head_dim: int, repeats: int = 5
                      ) -> Dict[str, Dict[str, Any]]:
    """Self-attention alone at the DiT's shape, per SDPA backend that accepts it (cuDNN, flash, memory-efficient):
    best forward and forward + backward time and TFLOP/s (4 B H L^2 D forward, x (1 + 2.5) with the backward).
    Tells how much of the step's gap to the matmul peak the attention kernel itself explains."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=g, device=device, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    grad = torch.randn_like(q)
    fwd_flops = 4.0 * heads * tokens ** 2 * head_dim
    out: Dict[str, Dict[str, Any]] = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def fwd(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        def fwd_bwd() -> None:
            torch.autograd.grad(fwd(), (q, k, v), grad)
        try:
            t_f = min(timed(fwd, device, repeats))
            t_fb = min(timed(fwd_bwd, device, repeats))
        except RuntimeError as e:   # this backend refuses the shape/dtype on this device
            out[backend.name] = {"error": str(e).splitlines()[0][:200]}
            print(f"attention {backend.name}: not available ({out[backend.name]['error']})", flush=True)
            continue
        total = fwd_flops * (1 + ATTENTION_BWD_PER_FWD)
        out[backend.name] = {"fwd_s": t_f, "fwd_bwd_s": t_fb, "fwd_tflops": fwd_flops / t_f / 1e12,
                             "fwd_bwd_tflops": total / t_fb / 1e12}
        print(f"attention {backend.name}: fwd {t_f * 1e3:.2f} ms ({fwd_flops / t_f / 1e12:.0f} TFLOP/s), fwd+bwd "
              f"{t_fb * 1e3:.2f} ms ({total / t_fb / 1e12:.0f} TFLOP/s)", flush=True)
    return out


# Kernel kinds by name. Inductor names its Triton kernels after the aten ops they fuse ("triton_poi_fused_addmm_gelu_0"
# is fc1's bias + GELU, not a GEMM), so its names are read by prefix first: "triton_tem_" is a GEMM template, any
# other "triton_" kernel is elementwise/reduction work. Library kernels (cuBLAS/cuBLASLt: gemm, xmma, nvjet, cutlass;
# SDPA's flash, memory-efficient and cuDNN attention: fmha, flash, sdpa, attention) are read by substring.
TRITON_PREFIXES = (("triton_tem_", "gemm"), ("triton_", "other"))
KERNEL_KINDS = (("attention", ("fmha", "flash", "attention", "sdpa")),
                ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "_mm", "addmm")))


def kernel_kind(name: str) -> str:
    """'attention', 'gemm' or 'other' (elementwise, norms, reductions, copies) from a kernel's name."""
    low = name.lower()
    prefix = next((kind for p, kind in TRITON_PREFIXES if low.startswith(p)), None)
    if prefix is not None:
        return prefix
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_kernels(step: Callable[[], None], device: torch.device, steps: int = 2, top: int = 25
                    ) -> Dict[str, object]:
    """Device time per kernel over ``steps`` steps (torch.profiler): the top kernels and the split into attention,
    GEMM and other, per step. On CPU (a dry run of this function) the CPU events stand in for kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    want = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    per_name: Dict[str, List[float]] = {}
    for e in prof.events():   # kernels only: GPU-side spans of record_function ranges are not kernels
        if e.device_type == want and not getattr(e, "is_user_annotation", False) and \
                (device.type == "cuda" or e.cpu_parent is None):
            per_name.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e6)
    if not per_name:
        raise RuntimeError("the profiler recorded no kernel: is CUPTI available to torch.profiler on this machine? "
                           "Time the step without --profile, or profile it with nsys")
    total = sum(sum(v) for v in per_name.values())
    rows: List[Dict[str, Any]] = sorted(
        ({"name": n[:120], "kind": kernel_kind(n), "calls_per_step": len(ts) / steps, "s_per_step": sum(ts) / steps,
          "share": sum(ts) / total} for n, ts in per_name.items()), key=lambda r: -r["s_per_step"])
    kinds: Dict[str, float] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["s_per_step"]
    print("kernel time per step: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({v * steps / total:.0%})"
                                               for k, v in sorted(kinds.items())), flush=True)
    for r in rows[:10]:
        print(f"  {r['s_per_step'] * 1e3:8.2f} ms {r['share']:6.1%} x{r['calls_per_step']:<5g} [{r['kind']}] "
              f"{r['name']}", flush=True)
    return {"steps": steps, "device_s_per_step": total / steps, "by_kind_s_per_step": kinds, "top": rows[:top]}


def bench_cuda(args, save: Callable[[Dict[str, object]], None]) -> Dict[str, object]:
    from models.attention import flash_attn_func

    if not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device visible")
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    cfg, shape, text_len = cuda_config(args.depth)
    peak = matmul_peak(torch.bfloat16, device, 8192, max(args.peak_repeats, 20))
    datasheet = next((v for k, v in DATASHEET_BF16_DENSE.items() if k in name), None)
    sheet = "n/a" if datasheet is None else f"{datasheet / 1e12:.0f}"
    print(f"{name}: measured bf16 matmul peak {peak['flops_per_s'] / 1e12:.0f} TFLOP/s (8192^3); datasheet "
          f"{sheet} TFLOP/s; flash-attn "
          f"{'installed' if flash_attn_func is not None else 'NOT installed (SDPA)'}")
    torch.manual_seed(0)
    with torch.device(device):
        model = MUGDiT(cfg).to(torch.bfloat16).train()
    inputs = make_inputs(cfg, shape, text_len, device, torch.bfloat16)
    analytic = dit_train_flops(cfg, shape, context_len=text_len)
    backends = attention_backends(model, inputs)
    print(f"attention backends: {backends}")
    fast_model = None if args.no_compile else compiled_copy(model, args.compile_mode)
    modes = run_mode("bf16", model, inputs, None, analytic, peak["flops_per_s"], args.repeats, device, fast_model)
    for mode_name, res in modes.items():
        res["mfu_vs_measured_peak"] = res["fraction_of_peak"]
        res["mfu_vs_datasheet"] = None if datasheet is None else analytic / res["step_s_best"] / datasheet
        vs_sheet = "n/a" if datasheet is None else f"{res['mfu_vs_datasheet']:.3f}"
        print(f"[{mode_name}] MFU vs measured bf16 peak {res['mfu_vs_measured_peak']:.3f}; vs datasheet {vs_sheet}",
              flush=True)
    result = {"device": name, "torch": torch.__version__, "flash_attn": flash_attn_func is not None,
              "attention_backends": backends,
              "compile_mode": None if args.no_compile else (args.compile_mode or "default"),
              "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30,
              "config": {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_heads, "depth": cfg.depth,
                         "latent_BCTHW": list(shape), "text_len": text_len,
                         "video_tokens": shape[2] * shape[3] * shape[4] // 4},
              "matmul_peak_bf16": peak, "datasheet_bf16_dense": datasheet, "modes": modes}
    if args.profile:   # after the timings (saved first), so they are not disturbed; a failure keeps the figures
        save(result)
        extras = (("attention_kernels", lambda: attention_kernels(device, cfg.num_heads,
                                                                  shape[2] * shape[3] * shape[4] // 4, cfg.head_dim)),
                  ("profile_eager", lambda: profile_kernels(make_step(model, inputs, None), device)),
                  ("profile_compiled", lambda: None if fast_model is None else
                   profile_kernels(make_step(fast_model, inputs, None), device)))
        for key, fn in extras:
            try:
                result[key] = fn()
            except Exception as e:  # noqa: BLE001 - diagnostics only: report and go on
                result[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{key}: failed: {result[key]}", flush=True)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda", action="store_true", help="10B layer shapes on the GPU in bf16")
    ap.add_argument("--depth", type=int, default=4, help="--cuda: number of 10B-shaped blocks")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per mode (after one warm-up step)")
    ap.add_argument("--peak-n", type=int, default=4096, help="CPU: square matmul size for the peak")
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only: skip the compiled fast path")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the fast path (default: inductor's default; e.g. "
                         "max-autotune-no-cudagraphs)")
    ap.add_argument("--profile", action="store_true",
                    help="--cuda: also time self-attention per SDPA backend and profile the kernels of 2 steps")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/dit_step_{cpu,cuda}.json)")
    args = ap.parse_args(argv)
    if args.profile and not args.cuda:
        ap.error("--profile profiles the CUDA step: add --cuda (on CPU, use torch.profiler around make_step)")
    out = Path(args.out or REPO / "bench" / "results" / f"dit_step_{'cuda' if args.cuda else 'cpu'}.json")

    def save(result: Dict[str, object]) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", flush=True)
    save(bench_cuda(args, save) if args.cuda else bench_cpu(args))


if __name__ == "__main__":
    main()
