"""Curation throughput vs decode-only throughput on the same files (target: ratio >= 0.5).

    .venv/bin/python bench/curation.py                 # 4 synthetic 1280x720 videos (480 frames), ~1 min on 2 cores
    .venv/bin/python bench/curation.py --size 640x360  # smaller inputs: decoding is cheaper, the ratio lower
    .venv/bin/python bench/curation.py --input DIR     # your own videos

decode-only = ``decode.read_video`` of every file; full = ``run_curation`` (scene analysis, every filter including
the tiny aesthetic model, clip cutting and H.264 writing, near-dup, manifest) with sidecar captions, i.e. without the
VLM, and with an empty per-input store (nothing reused). Both are best of ``--repeat`` runs after a warm-up;
throughput is source frames per second. Prints ``ratio <full/decode>`` and writes bench/results/curation_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import CaptionConfig, CurateConfig  # noqa: E402
from common.storage import list_inputs  # noqa: E402
from tasks.curate.decode import read_video  # noqa: E402
from tasks.curate.driver import run_curation  # noqa: E402
from tasks.curate.synthetic import SceneSpec, make_scenes_video  # noqa: E402


def make_inputs(folder: Path, width: int, height: int) -> None:
    kinds = ["texture", "shaky", "flat", "static"]
    for i in range(4):
        scenes = [SceneSpec(kinds[(i + j) % 4], 40, seed=10 * i + j) for j in range(3)]
        make_scenes_video(folder / f"bench_{i}.mp4", scenes, width=width, height=height, fps=24)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="", help="folder of videos (default: synthetic 640x360 set)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--size", default="1280x720", help="WxH of the synthetic inputs (the report's 720p inputs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-curation-") as tmp:
        folder = Path(args.input) if args.input else Path(tmp) / "in"
        if not args.input:
            folder.mkdir()
            make_inputs(folder, *map(int, args.size.split("x")))
        files = [Path(i.uri) for i in list_inputs(str(folder))]
        cfg = CurateConfig(input_uri=str(folder), motion_min=0.02, motion_height=96,
                           caption=CaptionConfig(backend="sidecar"))
        frames = sum(len(read_video(f)[0]) for f in files)   # warm-up + frame count
        run_curation(cfg, Path(tmp) / "warm", progress=lambda m: None)
        t_decode, t_full = float("inf"), float("inf")
        for r in range(args.repeat):
            t0 = time.perf_counter()
            for f in files:
                read_video(f)
            t_decode = min(t_decode, time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = run_curation(cfg, Path(tmp) / f"out{r}", progress=lambda m: None)
            t_full = min(t_full, time.perf_counter() - t0)
    result = {"files": len(files), "frames": frames, "decode_s": t_decode, "full_s": t_full,
              "decode_fps": frames / t_decode, "full_fps": frames / t_full, "ratio": t_decode / t_full,
              "size": args.size if not args.input else "", "clips_kept": summary["clips_kept"],
              "load_avg": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parent / "results" / "curation_cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ratio {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
