"""Curation that streams: peak memory vs the video's length, and throughput vs decoding alone (no VLM).

    .venv/bin/python bench/curation.py                    # 1- and 10-minute 1280x720 24 fps videos, ~4 min on 2 cores
    .venv/bin/python bench/curation.py --quick            # smoke run in seconds: 320x180, 0.1 and 0.3 minutes
    .venv/bin/python bench/curation.py --minutes 1 5      # other lengths (the ratio uses the first)

Inputs: synthetic videos (``tasks.curate.synthetic`` scenes of 3-7 s: texture, shaky, static, flat) encoded once with
x264 "veryfast" into ``$TMPDIR/bench-curation-<W>x<H>-<fps>fps/``; the N-minute video repeats the 1-minute one's
packets N times (a remux, no re-encode: every repeat starts on a key frame), so it costs seconds to make and is
cached between runs.

- ``memory_ratio`` = peak RSS (the child's ``ru_maxrss``) of curating the longest video ÷ that of the shortest, each
  the median of ``--memory-runs`` fresh subprocesses (``curate.curate_video``, sidecar captions, tiny aesthetic
  model; target <= 1.2): the peak of identical runs varies by up to ~20 % with thread timing and heap fragmentation
  (decoder, buffer and curating threads), so one run per video can land on either side; every run is printed. The
  decode-only child's peak RSS is printed beside it as the floor (interpreter, libraries, decoder), with PyAV (the
  default decoder) and with decord, the peer, whose reader holds up to the whole compressed file.
- ``ratio`` = curation throughput ÷ decode-only throughput on the shortest video, in one process, alternating, best
  of ``--repeat`` (target >= 0.8). decode-only = ``decode.scan_video`` with a sink that drops every frame (the
  streaming decoder's first pass); curation = ``curate_video``: the decoder's pass with scene analysis and, on a
  thread of its own, each settled scene's windows (every filter, crops, clip and thumbnail writing, pHash) from the
  frames it buffers; a second pass only for windows of scenes longer than ``curate.buffer_mb``. ``cpu_ratio``: the
  same with the process's CPU time (all threads) instead of wall time: steadier on a shared machine, and blind to
  the threads' overlap.
Writes bench/results/curation_cpu.json with the load averages before and after (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import CaptionConfig, CurateConfig  # noqa: E402

KINDS = ("texture", "shaky", "static", "flat")
SCENE_SECONDS = (4, 6, 3, 7, 5)   # cycled: shots of 3-7 s, so two 17-frame windows cover ~1/4 of each


def bench_cfg() -> CurateConfig:
    """The curation settings of the bench: defaults, a motion floor the synthetic drift passes, sidecar captions."""
    return CurateConfig(motion_min=0.02, motion_height=96, keyframes=1, caption=CaptionConfig(backend="sidecar"))


def make_minute(path: Path, width: int, height: int, fps: int, minutes: float) -> None:
    """Render and encode ``minutes`` of synthetic scenes, one scene in memory at a time."""
    from fractions import Fraction

    import av

    from tasks.curate.synthetic import SceneSpec, render_scene

    total, t, i = int(round(minutes * 60 * fps)), 0, 0
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        while t < total:
            n = min(total - t, SCENE_SECONDS[i % len(SCENE_SECONDS)] * fps)
            for frame_HWC in render_scene(SceneSpec(KINDS[i % len(KINDS)], n, seed=i), width, height, i):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")))
            t, i = t + n, i + 1
        container.mux(stream.encode())
    tmp.rename(path)


def repeat_video(src: Path, dst: Path, times: int) -> None:
    """Remux ``src`` ``times`` times back to back (timestamps shifted; no decoding)."""
    import av

    with av.open(str(src)) as probe:
        s = probe.streams.video[0]
        span = int(s.duration or 0) or max(int(p.pts or 0) + int(p.duration or 0) for p in probe.demux(s) if p.size)
    tmp = dst.with_suffix(".part.mp4")
    with av.open(str(tmp), mode="w") as out:
        for r in range(times):
            with av.open(str(src)) as inp:
                in_stream = inp.streams.video[0]
                if r == 0:
                    out_stream = out.add_stream_from_template(in_stream)
                for packet in inp.demux(in_stream):
                    if packet.dts is None or packet.pts is None:   # the demuxer's end-of-stream packet
                        continue
                    packet.pts, packet.dts = packet.pts + r * span, packet.dts + r * span
                    packet.stream = out_stream
                    out.mux(packet)
    tmp.rename(dst)


def inputs(width: int, height: int, fps: int, minutes: list[float]) -> list[Path]:
    """The cached videos: the base one is ``minutes[0]`` long, the others repeat it."""
    folder = Path(tempfile.gettempdir()) / f"bench-curation-{width}x{height}-{fps}fps"
    folder.mkdir(exist_ok=True)
    base = folder / f"{minutes[0]:g}min.mp4"
    if not base.exists():
        make_minute(base, width, height, fps, minutes[0])
    paths = [base]
    for m in minutes[1:]:
        times = round(m / minutes[0])
        if abs(times * minutes[0] - m) > 1e-9:
            raise ValueError(f"--minutes: every length must be a multiple of the first, got {minutes}")
        path = folder / f"{m:g}min.mp4"
        if not path.exists():
            repeat_video(base, path, times)
        paths.append(path)
    return paths


def decode_only(path: Path, backend: str = "pyav") -> int:
    from tasks.curate.decode import scan_video

    return scan_video(path, lambda fps: lambda frame_HWC: None, backend=backend).num_frames


def curate(path: Path, out_dir: Path) -> list:
    from tasks.curate.curate import Models, curate_video

    cfg = bench_cfg()
    return curate_video(path, "0" * 16, None, cfg, Models(cfg), out_dir)


def child(mode: str, path: Path) -> None:
    """One measured run in this (fresh) process; prints a JSON line with its peak RSS."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-curation-out-") as tmp:
        rows = curate(path, Path(tmp)) if mode == "curate" else []
        frames = decode_only(path, "decord" if mode == "decode-decord" else "pyav") if mode != "curate" else None
    print(json.dumps({"mode": mode, "video": path.name, "seconds": time.perf_counter() - t0, "frames": frames,
                      "rows": len(rows), "kept": sum(r["status"] == "kept" for r, _ in rows),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(mode: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(path: Path, repeat: int) -> dict:
    """Best-of-``repeat`` seconds of decode-only and of curation on ``path``, alternating, in this process."""
    frames = decode_only(path)   # warm-up + frame count
    t_decode, t_curate, cpu_decode, cpu_curate, t_decord, cpu_decord = (float("inf"),) * 6
    with tempfile.TemporaryDirectory(prefix="bench-curation-out-") as tmp:
        curate(path, Path(tmp) / "warm")
        for r in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            decode_only(path)
            t_decode, cpu_decode = min(t_decode, time.perf_counter() - t0), min(cpu_decode, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            decode_only(path, "decord")
            t_decord, cpu_decord = min(t_decord, time.perf_counter() - t0), min(cpu_decord, time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            curate(path, Path(tmp) / f"run{r}")
            t_curate, cpu_curate = min(t_curate, time.perf_counter() - t0), min(cpu_curate, time.process_time() - c0)
    return {"frames": frames, "decode_s": t_decode, "curate_s": t_curate, "decode_fps": frames / t_decode,
            "curate_fps": frames / t_curate, "ratio": t_decode / t_curate, "decode_cpu_s": cpu_decode,
            "curate_cpu_s": cpu_curate, "cpu_ratio": cpu_decode / cpu_curate, "decord_decode_s": t_decord,
            "decord_decode_cpu_s": cpu_decord, "ratio_vs_decord_decode": t_decord / t_curate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1280x720", help="WxH of the synthetic videos")
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0],
                    help="video lengths; the first is the base (and the ratio's input), the others multiples of it")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--memory-runs", type=int, default=3, help="fresh children per video for the peak RSS (median)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 320x180, 0.1 and 0.3 minutes, one repeat")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "curation_cpu.json"))
    ap.add_argument("--child", nargs=2, metavar=("MODE", "VIDEO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    if args.quick:
        args.size, args.minutes, args.repeat, args.memory_runs = "320x180", [0.1, 0.3], 1, 1
    width, height = map(int, args.size.split("x"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    paths = inputs(width, height, args.fps, args.minutes)
    make_s = time.perf_counter() - t0
    runs = []
    for p in paths:
        for mode in ("decode", "decode-decord", "curate"):
            for _ in range(args.memory_runs if mode == "curate" else 1):
                runs.append(run_child(mode, p))
                print(json.dumps(runs[-1]), flush=True)
    curate_rss = {p.name: statistics.median(r["peak_rss_mb"] for r in runs if r["mode"] == "curate"
                                            and r["video"] == p.name) for p in paths}
    decode_rss = {mode: {r["video"]: r["peak_rss_mb"] for r in runs if r["mode"] == mode}
                  for mode in ("decode", "decode-decord")}
    speed = throughput(paths[0], args.repeat)
    result = {
        "size": args.size, "fps": args.fps, "minutes": args.minutes,
        "videos": {p.name: {"bytes": p.stat().st_size} for p in paths},
        "frames_shortest": speed["frames"],
        "memory_ratio": curate_rss[paths[-1].name] / curate_rss[paths[0].name], "curate_peak_rss_mb": curate_rss,
        "decode_only_peak_rss_mb": decode_rss,
        "decode_only_memory_ratio": {m: v[paths[-1].name] / v[paths[0].name] for m, v in decode_rss.items()},
        "memory_runs": args.memory_runs,
        "children": runs, **speed, "make_inputs_s": make_s,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=1))
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"memory_ratio {result['memory_ratio']:.3f}  (decode-only, PyAV: {decode_rss['decode'][paths[-1].name]:.0f} "
          f"/ {decode_rss['decode'][paths[0].name]:.0f} MB; decord: {decode_rss['decode-decord'][paths[-1].name]:.0f} "
          f"/ {decode_rss['decode-decord'][paths[0].name]:.0f} MB)")
    print(f"ratio {result['ratio']:.3f}  cpu_ratio {result['cpu_ratio']:.3f}  (decode-only {result['decode_s']:.2f} s; "
          f"decord's {result['decord_decode_s']:.2f} s: ratio against it {result['ratio_vs_decord_decode']:.3f})")


if __name__ == "__main__":
    main()
