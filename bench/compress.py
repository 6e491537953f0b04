"""Compress throughput vs VAE encode-only throughput on the same clips (target: ratio >= 0.8).

    .venv/bin/python bench/compress.py                  # 16 clips x 4 variants, the tiny config's VAE, ~1 min
    .venv/bin/python bench/compress.py --clips 32 --size 128 --batch 8

The clips are synthetic 17-frame videos of ``--size``², each with the tiny curriculum's variants (two resolutions,
the full length and the first 9 frames; 4 samples per clip). compress = ``run_compress`` with the configured
``compress.encode_batch_size`` (default 8) from a VAE folder into an empty latent store: decoding, resizing, the VAE,
the T5 captions, store writes, the dataset files. encode-only = ``encode_batch`` (the same batches) on pixels decoded
and resized beforehand, with the same VAE: the VAE's own time. Also printed: both one sample at a time
(``encode_batch_size`` 1, the former loop). Best of ``--repeat`` (5) after a warm-up; throughput in samples/s.
Prints the load first, then the four side by side and ``ratio`` = compress / encode-only throughput (best times;
the ratio of each repeat too, since neighbours on shared cores swing single runs by 2x) and the same ratio on
process CPU time (``--threads 1`` makes that one the work done, with no spinning threads); writes
bench/results/compress_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_compress import write_clip  # noqa: E402

from common.config import load_config  # noqa: E402
from common.hashing import sha256_bytes  # noqa: E402
from tasks.compress.clips import deterministic, read_clip, read_kept, resize_pixels  # noqa: E402
from tasks.compress.encode import encode_batch, plan_samples, run_compress  # noqa: E402
from tasks.compress.vae_fit import ensure_vae, load_vae_dir  # noqa: E402


def make_manifest(root: Path, clips: int, size: int) -> Path:
    (root / "clips").mkdir(parents=True)
    half = size // 2
    variants = [["big", size, size, 17], ["big", size, size, 9], ["small", half, half, 17], ["small", half, half, 9]]
    rows = []
    for i in range(clips):
        cid = sha256_bytes(f"bench{i}".encode(), n=16)
        write_clip(root / "clips" / f"{cid}.mp4", i, frames=17, hw=size)
        rows.append(dict(clip_id=cid, source_hash=f"{i:016x}", status="kept", num_frames=17, height=size, width=size,
                         score=1.0, caption=f"a square moving right, clip {i}", path=f"clips/{cid}.mp4", kind="clip",
                         parent_clip="", variants=json.dumps(variants)))
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=0, help="encode_batch_size (default: the config's)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} on {os.cpu_count()} cpus, "
          f"torch threads {torch.get_num_threads()}")
    base = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").compress
    cfg = base.__class__(**{**base.__dict__, "vae_train_steps": 0,
                            "encode_batch_size": args.batch or base.encode_batch_size})
    one = cfg.__class__(**{**cfg.__dict__, "encode_batch_size": 1})
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        root = Path(tmp)
        manifest = make_manifest(root / "manifest", args.clips, args.size)
        ensure_vae(cfg, root / "vae", manifest, progress=lambda m: None)
        vae, _ = load_vae_dir(root / "vae", cfg)
        vae.eval()
        kept = read_kept(manifest)
        samples = plan_samples(kept)
        groups: Dict[tuple, List[torch.Tensor]] = {}
        for s in samples:   # pixels decoded and resized beforehand: encode-only times the VAE alone
            x = read_clip(manifest / str(kept["path"][s.row]), 17)[:, :s.frames]
            x = resize_pixels(x, s.height, s.width).contiguous()
            groups.setdefault(tuple(x.shape), []).append(x)
        dev = torch.device("cpu")

        def encode_only(batch: int) -> None:
            with deterministic():
                for xs in groups.values():
                    for i in range(0, len(xs), batch):
                        encode_batch(vae, xs[i:i + batch], dev)

        times: Dict[str, float] = {"encode_only": float("inf"), "compress": float("inf"),
                                   "encode_only_one_by_one": float("inf"), "compress_one_by_one": float("inf")}
        runs = [("encode_only", lambda r: encode_only(cfg.encode_batch_size)),
                ("encode_only_one_by_one", lambda r: encode_only(1)),
                ("compress", lambda r: run_compress(cfg, manifest, root / f"c{r}", lambda m: None,
                                                    store_dir=root / f"s{r}", vae_dir=root / "vae")),
                ("compress_one_by_one", lambda r: run_compress(one, manifest, root / f"o{r}", lambda m: None,
                                                               store_dir=root / f"so{r}", vae_dir=root / "vae"))]
        for _, fn in runs:   # warm-up
            fn(-1)
        paired: List[float] = []
        cpu = {name: float("inf") for name in times}
        for r in range(args.repeat):   # interleaved, so a busy neighbour slows all three alike
            this: Dict[str, float] = {}
            for name, fn in runs:
                t0, c0 = time.perf_counter(), time.process_time()
                fn(r)
                this[name] = time.perf_counter() - t0
                times[name] = min(times[name], this[name])
                cpu[name] = min(cpu[name], time.process_time() - c0)
            paired.append(this["encode_only"] / this["compress"])
    n = len(samples)
    load_after = os.getloadavg()
    result = {"clips": args.clips, "samples": n, "size": args.size, "encode_batch_size": cfg.encode_batch_size,
              **{f"{k}_s": v for k, v in times.items()}, **{f"{k}_samples_per_s": n / v for k, v in times.items()},
              "ratio": times["encode_only"] / times["compress"],
              "ratio_one_by_one": times["encode_only_one_by_one"] / times["compress_one_by_one"],
              "ratio_cpu_time": cpu["encode_only"] / cpu["compress"],
              "ratio_cpu_time_one_by_one": cpu["encode_only_one_by_one"] / cpu["compress_one_by_one"],
              **{f"{k}_cpu_s": v for k, v in cpu.items()}, "torch_threads": torch.get_num_threads(),
              "ratio_per_repeat": paired, "ratio_median_of_repeats": float(sorted(paired)[len(paired) // 2]),
              "load_avg_before": load_before[0], "load_avg_after": load_after[0], "cpus": os.cpu_count()}
    b = cfg.encode_batch_size
    print(f"{'':>22} {'encode-only':>12} {'compress':>9} {'ratio':>6} {'CPU s':>6} {'CPU s':>6} {'ratio':>6}")
    print(f"{f'B={b}, samples/s':>22} {n / times['encode_only']:>12.1f} {n / times['compress']:>9.1f} "
          f"{result['ratio']:>6.3f} {cpu['encode_only']:>6.2f} {cpu['compress']:>6.2f} "
          f"{result['ratio_cpu_time']:>6.3f}")
    print(f"{'B=1, samples/s':>22} {n / times['encode_only_one_by_one']:>12.1f} "
          f"{n / times['compress_one_by_one']:>9.1f} {result['ratio_one_by_one']:>6.3f} "
          f"{cpu['encode_only_one_by_one']:>6.2f} {cpu['compress_one_by_one']:>6.2f} "
          f"{result['ratio_cpu_time_one_by_one']:>6.3f}")
    print("(the last three: the same on process CPU time, which neighbours disturb less)")
    print(f"encode_batch_size {cfg.encode_batch_size}; ratio per repeat {' '.join(f'{r:.3f}' for r in paired)}; "
          f"load average after {load_after[0]:.2f}")
    out = Path(__file__).resolve().parent / "results" / "compress_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ratio {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
