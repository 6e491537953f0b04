"""Video decoding (decord first, PyAV fallback) and H.264 clip writing.

``read_video`` probes the file with PyAV (container, stream, width), then decodes every frame with decord when the
width is a multiple of 32 and decord returns 3-channel frames; otherwise with PyAV. decord 0.6 returns 4/6 channels
for widths that are not a multiple of 32 (dmlc/decord#93), so those files go straight to PyAV. Any problem that
makes the file unusable raises ``DecodeError`` whose ``kind`` is a short, stable category (used to count reasons)
and whose message adds the detail. Frames larger than ``max_pixels`` are refused before decoding ("resolution too
large"); at most ``max_frames`` frames are decoded.

Timestamps: every frame's presentation time in seconds (decord ``get_frame_timestamp``, PyAV ``frame.time``) is in
``meta["timestamps"]``. A variable-frame-rate stream (frame intervals varying by more than ``VFR_TOLERANCE`` of
their median) is resampled to constant frame rate at its average rate, each output frame being the source frame
nearest to ``t0 + k / fps``; the timestamps then are those of the chosen source frames (``meta["vfr"]`` is True).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Tuple

import av
import numpy as np

# A file is "truncated" when fewer than this fraction of the frames its stream declares can be decoded.
MIN_DECODED_FRACTION = 0.9
VFR_TOLERANCE = 0.1


class DecodeError(Exception):
    """A video that cannot be used; ``kind`` is one of the category strings below."""

    EMPTY = "empty file"
    MISSING = "file not found"
    NOT_VIDEO = "not a video"
    NO_STREAM = "no video stream"
    CORRUPT = "truncated or corrupt"
    NO_FRAMES = "no decodable frames"
    TOO_LARGE = "resolution too large"
    NO_LENGTH = "no clip length fits"
    NOT_IMAGE = "not an image"
    TOO_SMALL = "resolution too small"

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}" if detail else kind)


def _probe(path: Path, max_pixels: int = 0) -> Dict[str, Any]:
    """Open the container with PyAV and read the first video stream's header."""
    if not path.is_file():
        raise DecodeError(DecodeError.MISSING, str(path))
    if path.stat().st_size == 0:
        raise DecodeError(DecodeError.EMPTY, "0 bytes")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError(DecodeError.NO_STREAM, f"streams: {[s.type for s in container.streams]}")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            if max_pixels and width * height > max_pixels:
                raise DecodeError(DecodeError.TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
            return {
                "codec": stream.codec_context.name,
                "width": int(stream.codec_context.width),
                "height": int(stream.codec_context.height),
                "declared_frames": int(stream.frames or 0),
                "fps": float(rate) if rate else 0.0,
            }
    except av.error.InvalidDataError as e:
        head = path.read_bytes()[:12]
        kind = DecodeError.CORRUPT if b"ftyp" in head else DecodeError.NOT_VIDEO
        detail = "container header found but unreadable (moov atom missing?)" if kind == DecodeError.CORRUPT else ""
        raise DecodeError(kind, detail or f"ffmpeg: {e.strerror or e}") from None
    except av.error.FFmpegError as e:
        raise DecodeError(DecodeError.CORRUPT, f"ffmpeg: {e}") from None


def _decode_decord(path: Path, max_frames: int = 0) -> Tuple[np.ndarray, float, np.ndarray]:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    n = min(len(reader), max_frames) if max_frames else len(reader)
    if n == 0:
        return np.zeros((0, 0, 0, 3), np.uint8), float(reader.get_avg_fps()), np.zeros(0)
    frames_THWC = reader.get_batch(list(range(n))).asnumpy()
    times = np.asarray(reader.get_frame_timestamp(list(range(n))), np.float64)[:, 0]
    return frames_THWC, float(reader.get_avg_fps()), times


def _decode_pyav(path: Path, max_frames: int = 0, times: list | None = None) -> np.ndarray:
    frames = []
    times = [] if times is None else times
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else float("nan"))
                if max_frames and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as e:
        if not frames:
            raise DecodeError(DecodeError.CORRUPT, f"ffmpeg: {e}") from None
        raise DecodeError(DecodeError.CORRUPT, f"decoding stopped after {len(frames)} frames: {e}") from None
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack(frames)


def to_constant_rate(times: np.ndarray, fps: float) -> Tuple[np.ndarray, bool]:
    """Source frame index for each constant-rate output frame, and whether the stream was variable-rate."""
    n = len(times)
    if n < 3 or not np.isfinite(times).all():
        return np.arange(n), False
    steps = np.diff(times)
    med = float(np.median(steps))
    if med <= 0 or np.abs(steps - med).max() <= VFR_TOLERANCE * med:
        return np.arange(n), False
    grid = times[0] + np.arange(int(round((times[-1] - times[0]) * fps)) + 1) / fps
    idx = np.clip(np.searchsorted(times, grid), 1, n - 1)
    idx = np.where(np.abs(times[idx - 1] - grid) <= np.abs(times[idx] - grid), idx - 1, idx)
    return idx, True


def read_video(path: str | Path, max_pixels: int = 0, max_frames: int = 0) -> Tuple[np.ndarray, float, Dict[str, Any]]:
    """Decode the frames of ``path`` (at most ``max_frames``; 0 = all), constant frame rate.

    Returns ``(frames_THWC uint8 RGB, fps, meta)``; meta has codec, width, height, num_frames, backend
    ("decord" | "pyav"), fallback (why PyAV was used, "" when decord was), timestamps (seconds, one per returned
    frame) and vfr. Raises DecodeError for missing, empty, non-video, truncated/corrupt, frameless or too large
    (``max_pixels``; 0 = no limit) files.
    """
    path = Path(path)
    meta = _probe(path, max_pixels)
    frames_THWC, fps, fallback, times = None, meta["fps"], "", np.zeros(0)
    if meta["width"] % 32:
        fallback = f"width {meta['width']} % 32 != 0 (decord bug)"
    else:
        try:
            frames_THWC, fps, times = _decode_decord(path, max_frames)
            if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
                fallback, frames_THWC = f"decord returned shape {tuple(frames_THWC.shape)}", None
        except Exception as e:  # decord raises its own DECORDError / RuntimeError types
            fallback, frames_THWC = f"decord failed: {str(e).splitlines()[0][:200]}", None
    if frames_THWC is None or len(frames_THWC) == 0:
        fallback = fallback or "decord returned no frames"
        pts: list = []
        frames_THWC = _decode_pyav(path, max_frames, pts)
        fps, times = meta["fps"], np.asarray(pts, np.float64)
    n = len(frames_THWC)
    if n == 0:
        raise DecodeError(DecodeError.NO_FRAMES, f"stream declares {meta['declared_frames']} frames")
    expected = min(meta["declared_frames"], max_frames) if max_frames else meta["declared_frames"]
    if expected and n < MIN_DECODED_FRACTION * expected:
        raise DecodeError(DecodeError.CORRUPT, f"decoded {n} of {expected} declared frames")
    if not fps or fps <= 0:
        raise DecodeError(DecodeError.CORRUPT, "stream has no frame rate")
    if len(times) != n or not np.isfinite(times).all():
        times = np.arange(n) / fps
    idx, vfr = to_constant_rate(times, fps)
    if vfr:
        frames_THWC, times, n = frames_THWC[idx], times[idx], len(idx)
    meta.update(timestamps=times, vfr=vfr, num_frames=n, backend="pyav" if fallback else "decord", fallback=fallback,
                height=int(frames_THWC.shape[1]), width=int(frames_THWC.shape[2]))
    return frames_THWC, float(fps), meta


def write_clip(path: str | Path, frames_THWC: np.ndarray, fps: float, crf: int = 18) -> None:
    """Encode uint8 RGB frames [T,H,W,3] as H.264 yuv420p MP4 (single-threaded x264, so bytes are reproducible)."""
    frames_THWC = np.asarray(frames_THWC)
    if frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"write_clip: need uint8 [T,H,W,3], got {frames_THWC.dtype} {frames_THWC.shape}")
    t, h, w, _ = frames_THWC.shape
    if t == 0 or h % 2 or w % 2:
        raise ValueError(f"write_clip: need T >= 1 and even H, W for yuv420p, got {frames_THWC.shape}")
    if fps <= 0:
        raise ValueError(f"write_clip: fps must be > 0, got {fps}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        for frame_HWC in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
