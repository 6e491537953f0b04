"""Video decoding as a stream (PyAV; decord selectable) and H.264 clip writing.

A video is read in two kinds of pass, neither of which holds more than ``CHUNK_FRAMES`` decoded frames:

    info = scan_video(path, lambda fps: analyser.push, max_pixels, max_frames)   # pass 1: every frame, once
    for frames_THWC in read_windows(info, [[3, 4, 5], [40, 42]]):              # later passes: windows
        ...
    frames_THWC, fps, meta = read_video(path)   # the whole video as one array (short files: tests, previews)

``scan_video`` probes the file with PyAV (container, stream, width), indexes its packets (a demux-only read: every
frame's presentation time and the key frames, before any frame is decoded), then decodes every frame with the
chosen backend (``backend``; ``curate.decoder``):

- ``"pyav"`` (default): PyAV, frame-threaded, on a background thread ``PREFETCH_DEPTH`` chunks ahead. Memory does
  not depend on the file: demuxing and decoding go in lockstep.
- ``"decord"``: decord 0.6, as before PyAV became the default. Its reader queues packets while its decoding thread
  has no frame ready, without a bound, so it holds up to the whole compressed file (measured: +84 MB for a
  10-minute 720p file, whose size is 86 MB; bench/README.md) and busy-reads (1.5 cores for one core of decoding).
  decord 0.6 returns 4/6 channels for widths that are not a multiple of 32 (dmlc/decord#93), so those files go
  straight to PyAV; when decord fails part-way, PyAV starts over (``start`` is called again, so the consumer starts
  afresh).

Both give the same pixels and timestamps on MP4 (the same ffmpeg conversion to rgb24; tested); on an MPEG-TS file
decord's frames were seen shifted against PyAV's, so the decoder is part of the curation store's key. Any problem that
makes the file unusable raises ``DecodeError`` whose ``kind`` is a short, stable category (used to count reasons)
and whose message adds the detail. Frames larger than ``max_pixels`` are refused before decoding ("resolution too
large"); at most ``max_frames`` frames are decoded. Truncation ("decoded n of m declared frames") is known only once
every frame has been decoded, so the pass that finds it is the first one.

Timestamps: every frame's presentation time in seconds since the stream's start, from the packet index, as decord
computes it (``(pts - start_time) * time_base`` rounded to float32, so results recorded with decord keep their
values), is in ``meta["timestamps"]``. When the decoder drops packets (a stream starting on non-key frames,
discarded or hidden frames), the frames are numbered as decoded and each keeps the time of its own pts; later passes
then decode from the start instead of seeking. A variable-frame-rate stream (frame intervals varying by more than
``VFR_TOLERANCE`` of their median) is resampled to constant frame rate at its average rate, each output frame being
the source frame nearest to ``t0 + k / fps``; the timestamps then are those of the chosen source frames
(``meta["vfr"]`` is True). The first pass sees the source frames (the rate is known only at its end); later passes
(``read_windows``, ``read_frames``) yield output frames. A later pass with PyAV seeks to the key frame before each
window that starts past the next key frame (decoding resumes there, as decord does), when the first pass's frames
were the index's packets one for one, each with its own pts.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Sequence, Tuple, TypeVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter

# A file is "truncated" when fewer than this fraction of the frames its stream declares can be decoded.
MIN_DECODED_FRACTION = 0.9
VFR_TOLERANCE = 0.1
# frames handed on together (a decord get_batch call, a PyAV chunk): few enough that a 4K chunk is ~200 MB, enough
# to amortise the call and the hand-over
CHUNK_FRAMES = 8
# chunks (first pass) or windows (later passes) decoded ahead of their consumer, in a background thread
PREFETCH_DEPTH = 2
BACKENDS = ("pyav", "decord")
# packets read past ``max_frames`` by the packet index of a limited pass: more than any decoder's reordering (H.264
# holds at most 16 frames back), so the first ``max_frames`` presentation times are all in it
REORDER_MARGIN = 64
# x264 settings of every clip written: one thread, and x264's canonical algorithms instead of the ones it picks for
# the CPU. Without them the same frames give different bytes on another machine (seen: an AMD EPYC against a Xeon),
# so clip files, their hashes and anything decoded from them would not reproduce across the laptop and the cluster.
# With them the bytes agree across x86-64 hosts with the same PyAV build (swscale's rgb <-> yuv SIMD rounds unlike
# its C code, so an ARM host may differ). Cost: within the noise (bench/README.md).
X264_OPTIONS = {"preset": "medium", "threads": "1", "x264-params": "cpu-independent=1"}


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


FrameSink = Callable[[np.ndarray], None]   # receives one uint8 RGB frame [H,W,3]


@dataclass
class VideoInfo:
    """What the first pass learnt about a decodable video: ``fps`` (of the output frames), ``meta`` (codec, width,
    height, num_frames, declared_frames, backend, fallback, timestamps, vfr) and ``source_index`` [num_frames]: the
    source frame shown as each output frame (``arange`` unless the stream was variable-rate)."""
    path: Path
    fps: float
    meta: Dict[str, Any]
    source_index: np.ndarray
    index: Optional["PacketIndex"] = None   # the packet index, when it matches the decoded frames (PyAV seeks by it)

    @property
    def num_frames(self) -> int:
        return len(self.source_index)


def _decord_reader(path: Path) -> Any:
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)


def _chunks_decord(reader: Any, indices: Sequence[int]) -> Generator[Tuple[List[int], np.ndarray], None, None]:
    """(source indices, frames [T,H,W,3]) of ``indices`` (ascending), ``CHUNK_FRAMES`` per decord call."""
    for i in range(0, len(indices), CHUNK_FRAMES):
        batch = list(indices[i:i + CHUNK_FRAMES])
        yield batch, _batch_decord(reader, batch)


def _batch_decord(reader: Any, indices: List[int]) -> np.ndarray:
    frames_THWC = reader.get_batch(indices).asnumpy()
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise _DecordShape(f"decord returned shape {tuple(frames_THWC.shape)}")
    return frames_THWC


T = TypeVar("T")


def prefetched(items: Iterator[T], depth: int = PREFETCH_DEPTH) -> Generator[T, None, None]:
    """The items of ``items``, produced by a background thread at most ``depth`` ahead of the consumer: PyAV's and
    decord's decoding and OpenCV release the GIL, so decoding overlaps the consumer's work. The producer's exceptions
    are raised here; closing this generator stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: Tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer, which raises it
            put(("error", e))
        finally:   # the decoder behind a generator (its reader, file, buffers) closes now, not at garbage collection
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="decode-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


class _DecordShape(Exception):
    pass


def _frames_pyav(path: Path, max_frames: int = 0, times: Optional[List[float]] = None,
                 pts: Optional[List[Optional[int]]] = None) -> Iterator[np.ndarray]:
    """Every decoded frame (uint8 RGB [H,W,3]), appending each frame's time (seconds, as PyAV gives it) to
    ``times`` and its pts to ``pts``."""
    count, rgb = 0, VideoReformatter()   # one converter for the stream: to_ndarray(format=) sets one up per frame
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if times is not None:
                    times.append(float(frame.time) if frame.time is not None else float("nan"))
                if pts is not None:
                    pts.append(frame.pts)
                yield rgb.reformat(frame, format="rgb24").to_ndarray()
                count += 1
                if max_frames and count >= max_frames:
                    break
    except av.error.FFmpegError as e:
        if not count:
            raise DecodeError(DecodeError.CORRUPT, f"ffmpeg: {e}") from None
        raise DecodeError(DecodeError.CORRUPT, f"decoding stopped after {count} frames: {e}") from None


def _decode_pyav(path: Path, max_frames: int = 0, times: list | None = None) -> np.ndarray:
    """Every frame decoded by PyAV as one array [T,H,W,3] (the reference for the decord path's pixels)."""
    frames = list(_frames_pyav(Path(path), max_frames, times))
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


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


@dataclass
class PacketIndex:
    """What a demux-only read of a video stream learns, in presentation order: ``pts`` [N] (stream time base),
    ``times`` [N] (seconds since the stream's start, as decord gives them: float32 values), ``keyframes`` [K] (the
    frame indices of key packets) and ``start_s`` (the stream's start time, seconds). ``seekable``: every packet has
    a distinct pts, so a decoded frame's pts names its index (``frame_of``)."""
    pts: np.ndarray
    times: np.ndarray
    keyframes: np.ndarray
    start_s: float
    seekable: bool

    def frame_of(self, pts: Optional[int]) -> int:
        """The frame index of a decoded frame's pts; -1 when the index does not hold it."""
        if pts is None:
            return -1
        i = int(np.searchsorted(self.pts, pts))
        return i if i < len(self.pts) and self.pts[i] == pts else -1

    def key_before(self, frame: int) -> int:
        """The last key frame at or before ``frame`` (0 when none is)."""
        i = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return int(self.keyframes[i]) if i >= 0 else 0


def index_packets(path: Path, max_packets: int = 0) -> Optional[PacketIndex]:
    """The packet index of ``path``'s first video stream (its first ``max_packets``; 0 = all), or None when it cannot
    be read (a packet without a pts, no time base, a demuxer error): the decoded frames then give the times, and
    later passes decode from the start."""
    pts: List[int] = []
    keys: List[bool] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if not stream.time_base:
                return None
            for packet in container.demux(stream):
                if packet.size == 0:   # the demuxer's end-of-stream flush packet
                    continue
                if packet.pts is None:
                    return None
                pts.append(int(packet.pts))
                keys.append(bool(packet.is_keyframe))
                if max_packets and len(pts) >= max_packets:
                    break
            start, time_base = int(stream.start_time or 0), float(stream.time_base)
    except av.error.FFmpegError:
        return None
    if not pts:
        return None
    order = np.argsort(np.asarray(pts, np.int64), kind="stable")
    pts_N = np.asarray(pts, np.int64)[order]
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    times_N = ((pts_N - start) * time_base).astype(np.float32).astype(np.float64)
    return PacketIndex(pts_N, times_N, np.sort(rank[np.asarray(keys, bool)]), start * time_base,
                       seekable=bool(np.all(np.diff(pts_N) > 0)))


def _chunks_pyav(path: Path, max_frames: int, times: List[float], pts: List[Optional[int]],
                 ) -> Iterator[List[np.ndarray]]:
    """The frames of ``path`` in lists of up to ``CHUNK_FRAMES`` (their times and pts appended to ``times``/``pts``)."""
    chunk: List[np.ndarray] = []
    for frame_HWC in _frames_pyav(path, max_frames, times, pts):
        chunk.append(frame_HWC)
        if len(chunk) == CHUNK_FRAMES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _scan_pyav(path: Path, start: Callable[[float], FrameSink], max_frames: int, fps: float,
               on_timestamps: Optional[Callable[[np.ndarray, float], None]] = None,
               ) -> Tuple[int, np.ndarray, Tuple[int, int], Optional[PacketIndex]]:
    """(frames passed to the sink, timestamps, (H, W), the packet index when the decoded frames are its frames in
    order) of a PyAV pass, decoded on a background thread. When the decoder drops packets (a stream starting on a
    non-key frame, discarded or hidden frames), the frames are numbered as decoded and timed by their own pts."""
    index = index_packets(path, max_frames + REORDER_MARGIN if max_frames else 0)
    if on_timestamps is not None and index is not None:
        on_timestamps(index.times[:max_frames] if max_frames else index.times, fps)
    sink = start(fps)
    n, shape = 0, (0, 0)
    frame_times: List[float] = []
    frame_pts: List[Optional[int]] = []
    with contextlib.closing(prefetched(_chunks_pyav(path, max_frames, frame_times, frame_pts))) as chunks:
        for chunk in chunks:
            for frame_HWC in chunk:
                sink(frame_HWC)
            n, shape = n + len(chunk), (int(chunk[0].shape[0]), int(chunk[0].shape[1]))
    if index is None:
        return n, np.asarray(frame_times, np.float64), shape, None
    if len(index.pts) >= n and frame_pts == index.pts[:n].tolist():   # one frame per packet, in presentation order
        return n, index.times[:n], shape, index
    at = np.asarray([index.frame_of(p) for p in frame_pts], np.int64)
    if len(at) and at.min() >= 0:
        return n, index.times[at], shape, None
    return n, np.asarray(frame_times, np.float64) - index.start_s, shape, None


def _scan_decord(path: Path, start: Callable[[float], FrameSink], max_frames: int,
                 on_timestamps: Optional[Callable[[np.ndarray, float], None]] = None,
                 ) -> Tuple[int, float, np.ndarray, Tuple[int, int], str]:
    """(frames passed to the sink, fps, timestamps, (H, W), fallback reason) of a decord pass; 0 frames and the
    reason when decord cannot be used (errors of the sink propagate: they are not decord's)."""
    fps, times, n, shape = 0.0, np.zeros(0), 0, (0, 0)
    try:
        reader = _decord_reader(path)
        total = min(len(reader), max_frames) if max_frames else len(reader)
        if not total:
            return 0, fps, times, shape, "decord returned no frames"
        fps = float(reader.get_avg_fps())
        times = np.asarray(reader.get_frame_timestamp(list(range(total))), np.float64)[:, 0]
        chunks = prefetched(_chunks_decord(reader, range(total)))
    except Exception as e:  # decord raises its own DECORDError / RuntimeError types
        return 0, fps, times, shape, f"decord failed: {str(e).splitlines()[0][:200]}"
    if on_timestamps is not None:
        on_timestamps(times, fps)
    sink = start(fps)
    with contextlib.closing(chunks):
        while True:
            try:
                _, frames_THWC = next(chunks)
            except StopIteration:
                return n, fps, times, shape, ""
            except _DecordShape as e:
                return 0, fps, times, shape, str(e)
            except Exception as e:
                return 0, fps, times, shape, f"decord failed: {str(e).splitlines()[0][:200]}"
            for frame_HWC in frames_THWC:
                sink(frame_HWC)
            n, shape = n + len(frames_THWC), frames_THWC.shape[1:3]


def scan_video(path: str | Path, start: Callable[[float], FrameSink], max_pixels: int = 0,
               max_frames: int = 0, on_timestamps: Optional[Callable[[np.ndarray, float], None]] = None,
               backend: str = "pyav") -> VideoInfo:
    """First pass: decode every frame of ``path`` once (at most ``max_frames``; 0 = all) with ``backend`` ("pyav" |
    "decord", module docstring) and pass each, in order, to the sink that ``start(fps)`` returns (called again if
    PyAV starts over after decord failed part-way). The sink sees source frames: when ``info.meta["vfr"]``, the
    constant-rate frames are those of ``read_frames(info)``. ``on_timestamps(times, fps)``: called before a pass
    decodes, with every frame's presentation time (a consumer can tell a variable-rate stream before its frames
    arrive), when the file's packets could be indexed. Raises DecodeError for missing, empty, non-video,
    truncated/corrupt, frameless or too large (``max_pixels``; 0 = no limit) files; ValueError for another backend."""
    if backend not in BACKENDS:
        raise ValueError(f"scan_video: backend must be one of {BACKENDS} (curate.decoder), got {backend!r}")
    path = Path(path)
    meta = _probe(path, max_pixels)
    fallback, times, n, shape, fps = "", np.zeros(0), 0, (0, 0), meta["fps"]
    index: Optional[PacketIndex] = None
    if backend == "decord":
        if meta["width"] % 32:
            fallback = f"width {meta['width']} % 32 != 0 (decord bug)"
        else:
            n, fps, times, shape, fallback = _scan_decord(path, start, max_frames, on_timestamps)
        if n == 0:
            fallback = fallback or "decord returned no frames"
            fps = meta["fps"]
    if n == 0:
        n, times, shape, index = _scan_pyav(path, start, max_frames, fps, on_timestamps)
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
    meta.update(timestamps=times[idx], vfr=vfr, num_frames=len(idx), backend="pyav" if fallback else backend,
                fallback=fallback, height=int(shape[0]), width=int(shape[1]))
    return VideoInfo(path, float(fps), meta, idx, index)


def read_windows(info: VideoInfo, windows: Sequence[Sequence[int]]) -> Generator[np.ndarray, None, None]:
    """The frames uint8 RGB [T,H,W,3] of each window of constant-rate output indices (ascending within and across
    windows) of a scanned video, in order: a later pass, with the first pass's backend, that decodes from the start,
    skips to the key frame before a window that lies past the next key frame (decord always; PyAV when the first
    pass's frames were the packet index's, ``VideoInfo.index``) and stops after the last window. At most
    ``PREFETCH_DEPTH`` + 1 windows are held."""
    flat = np.asarray([i for w in windows for i in w], np.int64)
    if len(flat) and (np.any(np.diff(flat) < 0) or flat[0] < 0 or flat[-1] >= info.num_frames):
        raise ValueError(f"read_windows: windows must hold ascending output indices in [0, {info.num_frames})")
    yield from prefetched(_windows(info, [info.source_index[np.asarray(w, np.int64)].tolist() for w in windows]))


def _windows(info: VideoInfo, sources: List[List[int]]) -> Iterator[np.ndarray]:
    """The frames of each window of source indices (decord: one call per window, its array is the window)."""
    if info.meta["backend"] == "decord":
        reader = _decord_reader(info.path)
        for w in sources:
            yield _batch_decord(reader, w)
        return
    yield from _windows_pyav(info, sources)


def _windows_pyav(info: VideoInfo, sources: List[List[int]]) -> Iterator[np.ndarray]:
    """The frames of each window of source indices (ascending), decoded by PyAV and converted only when wanted:
    straight on from the last window, or from the key frame before a window that starts past the next key frame
    (``VideoInfo.index``, when its pts name the frames). A seek that fails or misses its key frame (its first frame
    past the key frame is another, or none comes) ends seeking for the pass: decoding starts over from the file's
    start."""
    index = info.index if info.index is not None and info.index.seekable else None
    seeking = index is not None and len(index.keyframes) > 1
    container: Any = None

    def decoded(key: int) -> Iterator[Tuple[int, Any]]:
        """(frame index, av.VideoFrame) from key frame ``key`` on; 0: from the start, the file opened afresh. The
        seek or the opening happens now, the decoding as the frames are asked for."""
        nonlocal container, seeking
        if key and index is not None:
            try:
                container.seek(int(index.pts[key]), stream=container.streams.video[0], backward=True)
            except av.error.FFmpegError:
                seeking, key = False, 0
        if not key:
            if container is not None:
                container.close()
            container = av.open(str(info.path))
            container.streams.video[0].thread_type = "AUTO"
        stream_frames = container.decode(container.streams.video[0])
        return ((index.frame_of(frame.pts) if index is not None else count, frame)
                for count, frame in enumerate(stream_frames, start=key))

    try:
        frames, at, seeked = decoded(0), -1, False   # seeked: no frame at or past the key frame yet
        rgb_at, converter = -1, VideoReformatter()
        rgb: np.ndarray = np.empty((0, 0, 3), np.uint8)
        frame: Any = None
        for w in sources:
            key = index.key_before(w[0]) if index is not None and seeking else 0
            if key > at + 1:
                frames, at, seeked = decoded(key), -1, True
            out = []
            for i in w:
                while at < i:
                    step = next(frames, None)
                    if seeked and (step is None or step[0] > min(i, key)):   # the seek missed its key frame (landed
                        seeking = False                                      # after it: MPEG-TS): from the start,
                        frames, at, seeked = decoded(0), -1, False           # without seeking
                        continue
                    if step is None:   # the first pass decoded further: the file changed, or the decoder disagrees
                        raise DecodeError(DecodeError.CORRUPT, f"a later pass ended before source frame {i} (at {at})")
                    seeked = seeked and step[0] < key
                    if step[0] > at:   # frames shown before the key frame (open GOP) are not the window's
                        at, frame = step
                if at != i:
                    raise DecodeError(DecodeError.CORRUPT, f"a later pass did not decode source frame {i} (next: {at})")
                if rgb_at != i:
                    rgb_at, rgb = i, converter.reformat(frame, format="rgb24").to_ndarray()
                out.append(rgb)
            yield np.stack(out)
    except av.error.FFmpegError as e:
        raise DecodeError(DecodeError.CORRUPT, f"a later pass failed: ffmpeg: {e}") from None
    finally:
        if container is not None:
            container.close()


def read_frames(info: VideoInfo) -> Iterator[Tuple[int, np.ndarray]]:
    """(output index, frame uint8 RGB [H,W,3]) of every constant-rate frame of a scanned video (a later pass; a
    repeated source frame of a variable-rate input is yielded once per output frame that shows it)."""
    chunks = [list(range(s, min(s + CHUNK_FRAMES, info.num_frames))) for s in range(0, info.num_frames, CHUNK_FRAMES)]
    with contextlib.closing(read_windows(info, chunks)) as windows:
        for idx, frames_THWC in zip(chunks, windows):
            yield from zip(idx, frames_THWC)


def read_video(path: str | Path, max_pixels: int = 0, max_frames: int = 0,
               backend: str = "pyav") -> Tuple[np.ndarray, float, Dict[str, Any]]:
    """Decode the frames of ``path`` (at most ``max_frames``; 0 = all), constant frame rate, into one array: for
    short files (tests, previews, preference pairs); curation streams (``scan_video``, ``read_frames``).

    Returns ``(frames_THWC uint8 RGB, fps, meta)``; meta has codec, width, height, num_frames, backend
    ("pyav" | "decord"), fallback (why PyAV was used when decord was asked for, else ""), timestamps (seconds, one
    per returned frame) and vfr. Raises DecodeError as ``scan_video`` does.
    """
    frames: List[np.ndarray] = []

    def start(_: float) -> FrameSink:
        frames.clear()
        return frames.append

    info = scan_video(path, start, max_pixels, max_frames, backend=backend)
    frames_THWC = np.stack(frames)
    if info.meta["vfr"]:
        frames_THWC = frames_THWC[info.source_index]
    return frames_THWC, info.fps, info.meta


def write_clip(path: str | Path, frames_THWC: np.ndarray, fps: float, crf: int = 18) -> None:
    """Encode uint8 RGB frames [T,H,W,3] as H.264 yuv420p MP4 (``X264_OPTIONS``: the same bytes on x86-64 hosts)."""
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
        stream.options = {"crf": str(crf), **X264_OPTIONS}
        for frame_HWC in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_HWC, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
