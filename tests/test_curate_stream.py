"""Curation streams: the same results as the whole-array path, and memory that does not grow with the video.

- golden rows: tests/golden/curate_rows.json holds the rows and output-file hashes that the whole-array path (before
  streaming) produced on synthetic inputs with hard cuts, fades, dissolves, a long scene, burnt-in text, a
  variable-rate stream and a PyAV-only width; the streaming path must reproduce them;
- scenes: the streaming analysis of a file (decoder first pass) equals ``analyse`` on the decoded array, and finds
  the known cuts; also on a real video (the demo's MUG-V sample); the score shared by both cut detectors is the one
  PySceneDetect's own detectors compute, and they find the same cuts with it;
- decoder: ``read_frames``/``read_windows`` give the frames of ``read_video`` (PyAV, decord, variable rate; later
  passes seeking by key frame), and PyAV gives decord's frames and times;
- memory: traced peak allocation of ``curate_video`` on a video 6x longer stays that of the short one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import threading
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.config import CaptionConfig, CurateConfig
from common.hashing import sha256_bytes
from common.storage import InputFile
from tasks.curate.curate import Models, curate_input, curate_video
from tasks.curate.decode import (
    CHUNK_FRAMES,
    PREFETCH_DEPTH,
    DecodeError,
    prefetched,
    read_frames,
    read_video,
    read_windows,
    scan_video,
    write_clip,
)
from tasks.curate.scenes import SceneStream, analyse, content_score, scan_scenes
from tasks.curate.synthetic import SceneSpec, make_scenes_video, make_vfr_video, render_scene, render_video

GOLDEN = Path(__file__).parent / "golden" / "curate_rows.json"
REAL_VIDEO = Path(__file__).resolve().parents[1] / "data" / "demo" / "mugv_i2v_sample.mp4"   # MUG-V's I2V sample
FOUR = [SceneSpec("texture", 30), SceneSpec("texture", 30, seed=1), SceneSpec("texture", 30, seed=2),
        SceneSpec("shaky", 30, seed=3)]



def _inputs(folder: Path) -> dict:
    """The golden file's inputs, made exactly as when it was recorded."""
    folder.mkdir(exist_ok=True)
    frames_THWC, _, _ = render_video(FOUR, transitions=[("dissolve", 12), ("fade", 6), None])
    write_clip(folder / "trans.mp4", frames_THWC, 8)
    frames_THWC, _, _ = render_video(FOUR, width=112, height=80, transitions=[None, ("fade", 6), ("dissolve", 10)])
    write_clip(folder / "trans112.mp4", frames_THWC, 8)
    make_vfr_video(folder / "vfr.mp4")
    make_scenes_video(folder / "long.mp4", [SceneSpec("texture", 150, seed=5), SceneSpec("static", 25, seed=6),
                                            SceneSpec("texture", 60, seed=7, text="HELLO")], fps=24)
    make_scenes_video(folder / "missed.mp4", [SceneSpec("texture", 12), SceneSpec("texture", 12, seed=1)])
    sidecar = CaptionConfig(backend="sidecar")
    return {
        "a": CurateConfig(motion_min=0.02, motion_height=96, keyframes=1, caption=sidecar),
        "b": CurateConfig(motion_min=0.02, motion_height=96, keyframes=2, frame_stride=2, bucket_frames=[9],
                          max_clips_per_scene=3, caption=sidecar),
        "c": CurateConfig(scene_threshold=255.0, adaptive_threshold=0.0, gradual_min_change=1e9, motion_min=0.0,
                          caption=sidecar),
    }


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)
    return a == b


@pytest.mark.parametrize("buffer_mb", [None, 1, 0])   # default: one pass; 1 MB (~34 frames): some windows later; 0
def test_streaming_reproduces_the_whole_array_rows_and_files(tmp_path, monkeypatch, buffer_mb):
    """The rows and files of the former whole-array path, however many windows the first pass could curate from
    its buffer (the rest read by a second pass)."""
    import tasks.curate.curate as curate_module

    later: list = []   # windows read by a second pass

    def counted(info, windows):
        later.extend(windows)
        return read_windows(info, windows)

    monkeypatch.setattr(curate_module, "read_windows", counted)
    golden = json.loads(GOLDEN.read_text())
    cfgs = _inputs(tmp_path / "in")
    total = 0
    for case, want in golden["cases"].items():
        name, video = case.split("/")
        path, out = tmp_path / "in" / video, tmp_path / case
        out.mkdir(parents=True)
        cfg = cfgs[name] if buffer_mb is None else dataclasses.replace(cfgs[name], buffer_mb=buffer_mb)
        before = len(later)
        rows = curate_input(InputFile(uri=str(path), size=path.stat().st_size, name=video), cfg,
                            Models(cfg), out, path, "0" * 16, None)
        windows = sum(r["kind"] == "clip" for r, _ in rows)
        total += windows
        if buffer_mb is None:   # one pass, but for the variable-rate input (its first pass saw source frames)
            assert len(later) - before == (windows if video == "vfr.mp4" else 0), case
        got = [[r.get(f) for f in golden["fields"]] + [key] for r, key in rows]
        assert len(got) == len(want["rows"]), case
        for g, w in zip(got, want["rows"]):
            assert all(_same(a, b) for a, b in zip(g, w)), (case, g, w)
        files = {str(f.relative_to(out)): sha256_bytes(f.read_bytes(), n=16) for f in sorted(out.rglob("*"))
                 if f.is_file()}
        assert files == want["files"], case
    if buffer_mb == 0:
        assert len(later) == total
    elif buffer_mb == 1:
        assert 0 < len(later) < total, (len(later), total)


@pytest.mark.parametrize("width,decoder", [(128, "pyav"), (128, "decord"), (112, "decord")])   # 112: decord -> PyAV
def test_streamed_scene_analysis_equals_the_array_one_and_finds_the_cuts(tmp_path, width, decoder):
    scenes = [SceneSpec("texture", 30, seed=i) for i in range(4)] + [SceneSpec("flat", 20, seed=4)]
    frames_THWC, cuts, ranges = render_video(scenes, width=width, height=80, transitions=[None, ("fade", 6)])
    write_clip(tmp_path / "v.mp4", frames_THWC, 8)
    cfg = CurateConfig(decoder=decoder)
    info, streamed = scan_scenes(tmp_path / "v.mp4", cfg)
    decoded_THWC, fps, meta = read_video(tmp_path / "v.mp4", backend=decoder)
    whole = analyse(decoded_THWC, fps, cfg)
    assert info.meta["backend"] == ("decord" if decoder == "decord" and width % 32 == 0 else "pyav") == meta["backend"]
    assert (streamed.cuts, streamed.transitions, streamed.scenes) == (whole.cuts, whole.transitions, whole.scenes)
    assert np.array_equal(streamed.changes, whole.changes)
    assert len(streamed.cuts) == len(cuts) and all(abs(a - b) <= 1 for a, b in zip(streamed.cuts, cuts))
    (ts, te), = streamed.transitions
    assert ts <= ranges[0][0] + 1 and te >= ranges[0][1] - 1


def test_shared_content_score_is_pyscenedetects_and_finds_the_same_cuts():
    """One HSV conversion and score per frame for both detectors: the same floats as ``ContentDetector`` computes
    from the BGR frame, and the same (unmerged) cuts as the stock ContentDetector + AdaptiveDetector."""
    from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode
    from scenedetect.detector import FlashFilter

    rng = np.random.default_rng(0)
    scenes = [SceneSpec(k, 14, seed=i) for i, k in enumerate(("texture", "shaky", "flat", "texture", "static"))]
    frames_THWC = np.concatenate([render_video(scenes, width=96, height=64)[0],
                                  rng.integers(0, 256, (6, 64, 96, 3), dtype=np.uint8)])   # noise: large scores
    cfg = CurateConfig(adaptive_threshold=2.0)
    stock = [ContentDetector(threshold=cfg.scene_threshold, min_scene_len=8, filter_mode=FlashFilter.Mode.SUPPRESS),
             AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=8)]
    stream, found = SceneStream(8.0, cfg, min_scene_len=8), []
    for i, frame_HWC in enumerate(frames_THWC):
        bgr_HWC = np.ascontiguousarray(frame_HWC[..., ::-1])
        if i:   # PySceneDetect's score of frame i after frame i - 1
            reference = ContentDetector()
            reference._calculate_frame_score(FrameTimecode(0, fps=8.0),
                                             np.ascontiguousarray(frames_THWC[i - 1, ..., ::-1]))
            want = reference._calculate_frame_score(FrameTimecode(1, fps=8.0), bgr_HWC)
            hsv_HWC, prev_HWC = (cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in (frame_HWC, frames_THWC[i - 1]))
            assert content_score(hsv_HWC, prev_HWC) == want, i
        found += [int(tc.frame_num) for det in stock for tc in det.process_frame(FrameTimecode(i, fps=8.0), bgr_HWC)]
        stream.push(frame_HWC)
    assert stream.found == found and len(set(found)) >= 4, (stream.found, found)


def test_streamed_scene_analysis_of_a_real_video():
    cfg = CurateConfig()
    _, streamed = scan_scenes(REAL_VIDEO, cfg)
    decoded_THWC, fps, _ = read_video(REAL_VIDEO)
    whole = analyse(decoded_THWC, fps, cfg)
    assert (streamed.cuts, streamed.transitions, streamed.scenes) == (whole.cuts, whole.transitions, whole.scenes)
    assert np.array_equal(streamed.changes, whole.changes)


def test_later_passes_give_the_frames_of_read_video(tmp_path):
    make_scenes_video(tmp_path / "d.mp4", [SceneSpec("texture", 30), SceneSpec("flat", 11)], width=128, height=96)
    make_scenes_video(tmp_path / "p.mp4", [SceneSpec("texture", 30), SceneSpec("flat", 11)], width=112, height=80)
    make_vfr_video(tmp_path / "vfr.mp4")
    for name, backend in (("d.mp4", "pyav"), ("d.mp4", "decord"), ("p.mp4", "pyav"), ("vfr.mp4", "decord"),
                          ("vfr.mp4", "pyav")):
        whole_THWC, _, meta = read_video(tmp_path / name)
        info = scan_video(tmp_path / name, lambda fps: lambda frame_HWC: None, backend=backend)
        assert info.meta["backend"] == backend and info.num_frames == len(whole_THWC)
        assert np.array_equal(np.stack([f for _, f in read_frames(info)]), whole_THWC)
        windows = [[0, 1, 2], [5, 7, 9], [len(whole_THWC) - 1]]
        for w, frames_THWC in zip(windows, read_windows(info, windows)):
            assert np.array_equal(frames_THWC, whole_THWC[w]), (name, w)
    assert info.meta["vfr"] and len(set(info.source_index.tolist())) < info.num_frames   # repeats came back
    with pytest.raises(ValueError, match="ascending"):
        next(read_windows(info, [[3, 2]]))
    # a later pass that finds fewer frames than the first (the file changed in between): a DecodeError, as any
    # unusable input, not the generator's StopIteration as a RuntimeError
    info = scan_video(tmp_path / "p.mp4", lambda fps: lambda frame_HWC: None)
    make_scenes_video(tmp_path / "p.mp4", [SceneSpec("texture", 12)], width=112, height=80)
    with pytest.raises(DecodeError, match="a later pass ended before source frame"):
        list(read_windows(info, [[0, 1], [info.num_frames - 1]]))


def test_pyav_and_decord_give_the_same_frames_and_timestamps(tmp_path):
    """The default decoder (PyAV) reproduces decord's pixels, times, rate and resampling: results recorded with
    decord keep their values (on a real video, a variable-rate one and a synthetic one with B-frames)."""
    make_vfr_video(tmp_path / "vfr.mp4")
    make_scenes_video(tmp_path / "s.mp4", [SceneSpec("texture", 20), SceneSpec("shaky", 15, seed=1)], width=128,
                      height=96)
    for path in (REAL_VIDEO, tmp_path / "vfr.mp4", tmp_path / "s.mp4"):
        got, want = read_video(path), read_video(path, backend="decord")
        assert (got[2]["backend"], want[2]["backend"]) == ("pyav", "decord"), path
        assert np.array_equal(got[0], want[0]) and got[1] == want[1], path
        assert np.array_equal(got[2]["timestamps"], want[2]["timestamps"]) and got[2]["vfr"] == want[2]["vfr"], path
    with pytest.raises(ValueError, match="curate.decoder"):
        read_video(REAL_VIDEO, backend="opencv")
    with pytest.raises(ValueError, match="curate.decoder"):
        CurateConfig(decoder="opencv")


def _short_gop_video(path: Path, frames_THWC: np.ndarray, gop: int, pts: list | None = None,
                     open_gop: bool = False, drop_packets: int = 0) -> None:
    """An H.264 file with a key frame every ``gop`` frames and B-frames (what a later pass seeks through), at 8 fps or
    at ``pts`` (ticks of 1/24 s: variable rate), with open GOPs, or without its first ``drop_packets`` packets (a
    stream that starts on non-key frames: the decoder drops them)."""
    from fractions import Fraction

    import av

    opts: dict[str, object] = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "2", "threads": "1"}
    if open_gop:
        opts["x264-params"] = "open-gop=1"
    target = path.with_suffix(".full.mp4") if drop_packets else path
    with av.open(str(target), mode="w", format="mpegts" if path.suffix == ".ts" else "mp4") as container:
        stream = container.add_stream("libx264", rate=24 if pts else 8)
        stream.width, stream.height, stream.pix_fmt = frames_THWC.shape[2], frames_THWC.shape[1], "yuv420p"
        stream.options = opts
        if pts:
            stream.codec_context.time_base = Fraction(1, 24)
        for k, frame_HWC in enumerate(frames_THWC):
            frame = av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")
            if pts:
                frame.pts, frame.time_base = pts[k], Fraction(1, 24)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    if drop_packets:
        with av.open(str(target)) as src, av.open(str(path), mode="w", format="mp4") as dst:
            out = dst.add_stream_from_template(src.streams.video[0])
            for k, packet in enumerate(src.demux(src.streams.video[0])):
                if packet.size and k >= drop_packets:
                    packet.stream = out
                    dst.mux(packet)


def test_later_passes_seek_to_the_key_frame_before_each_window(tmp_path, monkeypatch):
    import av

    from tasks.curate.decode import PacketIndex

    frames_THWC, _, _ = render_video([SceneSpec("texture", 40), SceneSpec("shaky", 40, seed=1)], width=64, height=48)
    _short_gop_video(tmp_path / "g.mp4", frames_THWC, gop=10)
    whole_THWC, _, _ = read_video(tmp_path / "g.mp4")
    info = scan_video(tmp_path / "g.mp4", lambda fps: lambda frame_HWC: None)
    assert info.index is not None and info.index.seekable and info.index.keyframes.tolist() == list(range(0, 80, 10))
    seeks: list = []
    real_seek = av.container.InputContainer.seek
    monkeypatch.setattr(av.container.InputContainer, "seek",
                        lambda self, offset, **kw: (seeks.append(offset), real_seek(self, offset, **kw))[1])
    windows = [[1, 2], [3, 5], [25, 26, 27], [27, 29], [52], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79]]
    assert [f.tolist() for f in read_windows(info, windows)] == [whole_THWC[w].tolist() for w in windows]
    assert [info.index.frame_of(p) for p in seeks] == [20, 50, 70]   # [3, 5] and [27, 29] go straight on
    # a seek that lands past the window (an index the container does not honour) decodes from the start instead,
    # and the pass seeks no more
    monkeypatch.setattr(PacketIndex, "key_before", lambda self, frame: 70 if frame == 52 else frame // 10 * 10)
    seeks.clear()
    assert [f.tolist() for f in read_windows(info, [[52], [60], [75]])] == [whole_THWC[[i]].tolist()
                                                                           for i in (52, 60, 75)]
    assert [info.index.frame_of(p) for p in seeks] == [70]
    # a seek that fails: the same

    def refused(self, offset, **kw):
        seeks.append(offset)
        raise av.error.FFmpegError(22, "seek refused")

    monkeypatch.setattr(av.container.InputContainer, "seek", refused)
    seeks.clear()
    assert [f.tolist() for f in read_windows(info, [[5], [52], [75]])] == [whole_THWC[[i]].tolist()
                                                                          for i in (5, 52, 75)]
    assert [info.index.frame_of(p) for p in seeks] == [70]   # tried once (key_before as patched above)


def test_later_passes_through_open_gops_variable_rate_and_dropped_packets(tmp_path):
    """Seeking later passes give the first pass's frames with open GOPs (frames shown before a key frame need the
    GOP before it) and in a variable-rate stream (output frames repeat source frames after a seek); a stream whose
    first packets the decoder drops numbers its frames as decoded, times them by their own pts from the stream's
    start, and is read without seeking, with or without ``max_frames``; on MPEG-TS, where a seek can land after its
    key frame (the decoder then drops frames up to the next one), the pass decodes from the start."""
    frames_THWC, _, _ = render_video([SceneSpec("texture", 40), SceneSpec("shaky", 40, seed=1)], width=64, height=48)
    _short_gop_video(tmp_path / "open.mp4", frames_THWC, gop=10, open_gop=True)
    _short_gop_video(tmp_path / "vfr.mp4", frames_THWC, gop=10, pts=np.cumsum([0] + [2, 3, 4] * 27)[:80].tolist())
    _short_gop_video(tmp_path / "cut.mp4", frames_THWC, gop=5, drop_packets=1)
    _short_gop_video(tmp_path / "ts.ts", frames_THWC, gop=10)   # MPEG-TS: a seek lands after its key frame
    for name in ("open.mp4", "vfr.mp4", "cut.mp4", "ts.ts"):
        for max_frames in (0, 20000):
            whole_THWC, _, meta = read_video(tmp_path / name, max_frames=max_frames)
            info = scan_video(tmp_path / name, lambda fps: lambda frame_HWC: None, max_frames=max_frames)
            assert np.array_equal(info.meta["timestamps"], meta["timestamps"]), name
            n = len(whole_THWC)
            windows = [[1, 2], [n // 3, n // 3 + 1, n // 3 + 1], [n // 2 + 7], [n - 3, n - 2, n - 1]]
            assert [f.tolist() for f in read_windows(info, windows)] == [whole_THWC[w].tolist() for w in windows], \
                (name, max_frames)
            # a pass whose first window is in the last GOP: a seek to its key frame (on MPEG-TS one that lands after it)
            assert np.array_equal(next(read_windows(info, [[n - 3]])), whole_THWC[[n - 3]]), (name, max_frames)
            if name == "open.mp4":
                assert info.index is not None and len(info.index.keyframes) == 8 and not meta["vfr"]
            if name == "vfr.mp4":   # an output frame repeated (a longer source interval), read after a seek
                k = next(k for k in range(n // 3, n - 1) if info.source_index[k] == info.source_index[k + 1])
                assert meta["vfr"] and info.index is not None and info.index.key_before(k) > 0
                assert np.array_equal(next(read_windows(info, [[k, k + 1]])), whole_THWC[[k, k + 1]])
            if name == "cut.mp4":   # frames 1-4 need the dropped key frame: decoding starts at the next one
                assert info.index is None and n == 75 and meta["timestamps"][0] == 0.5   # 0.625 s - start 0.125 s


def test_prefetched_passes_errors_and_stops_its_thread_when_closed():
    def items():
        yield 1
        yield 2
        raise RuntimeError("decoder broke")

    got = []
    with pytest.raises(RuntimeError, match="decoder broke"):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]
    before = threading.active_count()
    closed = threading.Event()

    def decoder():   # stands for a decoder generator holding a reader: closed when the consumer stops early
        try:
            yield from range(10 ** 9)
        finally:
            closed.set()

    dec = decoder()   # referenced here too: only an explicit close ends it, not garbage collection
    gen = prefetched(dec, depth=2)
    assert next(gen) == 0
    gen.close()
    assert threading.active_count() == before and closed.is_set()


def _traced_peak(path: Path, cfg: CurateConfig, models: Models, out: Path) -> tuple:
    tracemalloc.start()
    try:
        rows = curate_video(path, "0" * 16, None, cfg, models, out)
        return tracemalloc.get_traced_memory()[1], rows
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_video_length(tmp_path):
    """Curating a video 12x longer (the same scenes repeated) allocates no more at its peak than a few decoded
    chunks' worth of timing slack: the stream holds a scene's frames (the first pass's buffer), the windows being
    curated and a few chunks, not the video (traced numpy/Python allocations)."""
    w, h = 256, 192
    scene_THWC = np.concatenate([render_scene(SceneSpec(k, 24, seed=i), w, h, i)
                                 for i, k in enumerate(("texture", "shaky", "texture"))])
    write_clip(tmp_path / "short.mp4", scene_THWC, 24, crf=30)
    write_clip(tmp_path / "long.mp4", np.concatenate([scene_THWC] * 12), 24, crf=30)
    # the default caption batch: until captioned, a batch holds only the frames its captioner reads (sidecar: none)
    cfg = CurateConfig(motion_min=0.02, motion_height=96, caption=CaptionConfig(backend="sidecar"))
    models = Models(cfg)
    _ = models.scorer   # built before tracing: the model is the same for both videos
    peak_short, rows_short = _traced_peak(tmp_path / "short.mp4", cfg, models, tmp_path / "o1")
    peak_long, rows_long = _traced_peak(tmp_path / "long.mp4", cfg, models, tmp_path / "o2")
    long_bytes = 12 * scene_THWC.nbytes   # what holding the decoded long video would take (~127 MB)
    assert len(rows_long) == 12 * len(rows_short) and sum(r["status"] == "kept" for r, _ in rows_long) >= 6
    # the first pass's decoder may run up to PREFETCH_DEPTH chunks ahead (+ one being handed over, one analysed):
    # how far it gets depends on thread timing, so that much may differ between the runs, and no more
    in_flight = (PREFETCH_DEPTH + 2) * CHUNK_FRAMES * scene_THWC[0].nbytes
    assert peak_long <= peak_short + in_flight + 2 ** 20, (peak_short, peak_long, in_flight)
    assert peak_long < long_bytes / 4, (peak_long, long_bytes)
    assert not math.isnan(float(rows_long[0][0]["sharpness"]))


def test_settled_scenes_are_final_as_frames_arrive():
    """At every frame, ``SceneStream.settled`` is a prefix of the scenes found at the end (what the first pass curates
    early can no longer change): hard cuts, fades, dissolves, a flash, noise (many close cuts, merged), and cuts the
    adaptive detector alone finds two frames late."""
    rng = np.random.default_rng(1)
    kinds = ("texture", "shaky", "flat", "texture", "static", "texture", "shaky", "texture")
    scenes = [SceneSpec(k, int(n), seed=i) for i, (k, n) in enumerate(zip(kinds, rng.integers(9, 30, len(kinds))))]
    frames_THWC, _, _ = render_video(scenes, width=96, height=64, transitions=[
        ("dissolve", 6), None, ("fade", 3), None, ("dissolve", 12), None, ("fade", 8)])
    flash_THWC = frames_THWC[40:41].copy()
    flash_THWC[:] = 255
    noise_THWC = rng.integers(0, 256, (20, 64, 96, 3), dtype=np.uint8)
    # two still shots joined by a 2-frame dissolve: the content detector cuts at once, the blend test removes that
    # cut a few frames later (still frames fit the blend too), so a scene ending there settles only after the lag
    a = render_scene(SceneSpec("static", 1, seed=10), 96, 64, 0)[0].astype(np.float32) / 4
    b = 255 - render_scene(SceneSpec("static", 1, seed=11), 96, 64, 1)[0].astype(np.float32) / 4
    still_THWC = np.stack([a] * 20 + [(2 * a + b) / 3, (a + 2 * b) / 3] + [b] * 20).round().astype(np.uint8)
    frames_THWC = np.concatenate([frames_THWC[:41], flash_THWC, frames_THWC[41:], noise_THWC, frames_THWC[:30],
                                  still_THWC])
    for cfg in (CurateConfig(), CurateConfig(adaptive_threshold=1.5, scene_threshold=40.0, gradual_window=5)):
        stream, seen = SceneStream(8.0, cfg), []
        for frame_HWC in frames_THWC:
            stream.push(frame_HWC)
            seen.append(stream.settled())
        final = stream.finish().scenes
        assert len(final) >= 8 and len(seen[-1]) >= len(final) - 2, (final, seen[-1])
        for n, settled in enumerate(seen):
            assert settled == final[:len(settled)], (n, settled, final)
        assert all(len(a) <= len(b) for a, b in zip(seen, seen[1:]))


def test_what_a_void_first_pass_curated_is_removed(tmp_path, monkeypatch):
    """The first pass curates windows while it decodes; when its results turn out void, their files go: the decoder
    finds the file truncated only at its end (one failed row, no file), decord fails part-way (PyAV starts over:
    the rows and files of an undisturbed run), a variable-rate input's second pass fails, the curating thread fails
    (its error is raised, no file)."""
    import tasks.curate.curate as curate_module
    import tasks.curate.decode as decode

    path = tmp_path / "v.mp4"
    make_scenes_video(path, [SceneSpec("texture", 30, seed=i) for i in range(4)], width=128, height=96)
    cfg = CurateConfig(motion_min=0.02, motion_height=96, keyframes=1, caption=CaptionConfig(backend="sidecar"))
    item = InputFile(uri=str(path), size=path.stat().st_size, name="v.mp4")
    calls: list = []
    window = curate_module._Curator.window
    monkeypatch.setattr(curate_module._Curator, "window", lambda self, *a: (calls.append(a[2]), window(self, *a)))

    def run(out: Path, cfg: CurateConfig = cfg) -> tuple:
        calls.clear()
        rows = curate_input(item, cfg, Models(cfg), out, path, "0" * 16, None)
        return rows, {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}

    rows, files = run(tmp_path / "plain")
    assert len(calls) == 4 and sum(r["status"] == "kept" for r, _ in rows) >= 2 and len(files) > 4
    # 1. truncation found at the end: the windows curated during the pass leave nothing behind
    probe = decode._probe
    with monkeypatch.context() as m:
        m.setattr(decode, "_probe", lambda p, max_pixels=0: {**probe(p, max_pixels), "declared_frames": 10 ** 4})
        (row, key), = run(tmp_path / "cut")[0]
    assert key == DecodeError.CORRUPT and row["status"] == "failed" and "decoded 120 of" in row["reason"]
    assert calls and calls == [6, 36, 66][:len(calls)]   # curated during the pass (not-started jobs: cancelled)
    assert not [f for f in (tmp_path / "cut").rglob("*") if f.is_file()]
    # 2. decord (curate.decoder) fails after 6 chunks (48 frames: the first scene was curated): PyAV starts over
    batch, n = decode._batch_decord, [0]

    def flaky(reader, indices):
        n[0] += 1
        if n[0] == 7:
            raise RuntimeError("decord: corrupt packet")
        return batch(reader, indices)

    with monkeypatch.context() as m:
        m.setattr(decode, "_batch_decord", flaky)
        again, again_files = run(tmp_path / "restart", dataclasses.replace(cfg, decoder="decord"))
    assert calls == [6, 6, 36, 66, 96], calls   # the first window curated twice: by decord's pass, then PyAV's
    assert [[r[f] for f in ("clip_id", "status", "reason", "start_s")] for r, _ in again] == \
        [[r[f] for f in ("clip_id", "status", "reason", "start_s")] for r, _ in rows]
    assert again_files == files
    # 3. a variable-rate input (its windows curated after a second analysis) that fails after its windows
    scenes_THWC = render_video([SceneSpec("texture", 40, seed=i) for i in range(3)], width=64, height=64)[0]
    make_vfr_video(tmp_path / "vfr.mp4", pts=np.cumsum([0] + [1, 1, 2] * 40)[:120].tolist(), frames_THWC=scenes_THWC)
    vfr = InputFile(uri=str(tmp_path / "vfr.mp4"), size=(tmp_path / "vfr.mp4").stat().st_size, name="vfr.mp4")
    calls.clear()   # decord gives the timestamps before decoding: the first pass curates nothing, each window once
    vfr_rows = curate_input(vfr, cfg, Models(cfg), tmp_path / "vfr_ok", tmp_path / "vfr.mp4", "0" * 16, None)
    assert len(calls) == sum(r["kind"] == "clip" for r, _ in vfr_rows) > 0, calls
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(curate_module._Curator, "rows", lambda self, times: (_ for _ in ()).throw(OSError("lost")))
        with pytest.raises(OSError, match="lost"):
            curate_input(vfr, cfg, Models(cfg), tmp_path / "vfr", tmp_path / "vfr.mp4", "0" * 16, None)
    assert calls and not [f for f in (tmp_path / "vfr").rglob("*") if f.is_file()]
    # 4. the curating thread fails (a full disk): the error is raised, the thumbnails written before it are removed
    with monkeypatch.context() as m:
        m.setattr(curate_module, "write_clip", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
        with pytest.raises(OSError, match="No space left"):
            run(tmp_path / "full")
    assert not [f for f in (tmp_path / "full").rglob("*") if f.is_file()]


def test_the_buffer_size_is_checked_and_not_part_of_the_store_key():
    """Rows do not depend on how many frames the first pass buffers (golden test above), so a stored result stays
    valid when ``buffer_mb`` changes; the decoder is part of the key (decord's frames differ on some containers)."""
    from tasks.curate.store import processing_hash

    assert processing_hash(CurateConfig(buffer_mb=0)) == processing_hash(CurateConfig()) != \
        processing_hash(CurateConfig(max_frames=10))
    assert processing_hash(CurateConfig(decoder="decord")) != processing_hash(CurateConfig())
    with pytest.raises(ValueError, match=r"curate.buffer_mb must be >= 0"):
        CurateConfig(buffer_mb=-1)


def test_scene_split_equals_the_range_by_range_reference():
    """split_scenes (bisect over the transitions' union, run every few frames by the settled check) gives the scenes
    of the plain reference: each range between cuts minus every transition, on random cuts and overlapping
    transitions; a cut inside a transition is removed by _bounds as by the reference."""
    from tasks.curate.scenes import split_scenes

    def reference(cuts, transitions, n):
        bounds = sorted({0, n, *[c for c in cuts if 0 < c < n]})
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            pieces = [(a, b)]
            for ts, te in transitions:
                pieces = [p for s, e in pieces for p in ((s, min(e, ts)), (max(s, te), e)) if p[1] > p[0]] \
                    if any(s < te and ts < e for s, e in pieces) else pieces
            out.extend(pieces)
        return out

    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(1, 300))
        cuts = sorted(set(rng.integers(-5, n + 5, int(rng.integers(0, 20))).tolist()))
        starts = rng.integers(0, n + 10, int(rng.integers(0, 8)))
        transitions = [(int(s), int(s + rng.integers(1, 30))) for s in starts]
        assert split_scenes(cuts, transitions, n) == reference(cuts, transitions, n), (cuts, transitions, n)
        stream = SceneStream(8.0, CurateConfig(), min_scene_len=int(rng.integers(1, 10)))
        stream.num_frames, stream.found, stream.flagged = n, cuts, sorted(transitions)
        merged = []
        for c in sorted(c for c in cuts if 0 < c < n):
            if not merged or c - merged[-1] >= stream.min_scene_len:
                merged.append(c)
        assert stream._bounds()[0] == [c for c in merged if not any(s <= c < e for s, e in transitions)]
