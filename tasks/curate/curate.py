"""Curation of one input: fetched file -> manifest rows + clips (docs/artifacts.md), without Flyte.

``curate_video`` decodes the video once and never holds it: the decoder's first pass (PyAV, or decord with
``curate.decoder``; constant frame rate) feeds ``firstpass.FirstPass``, which analyses scenes
(``scenes.SceneStream``: hard cuts + fades/dissolves on small frames) and, as soon as a scene's bounds are final
(``SceneStream.settled``, a dozen frames after its end), curates its windows on a thread of its own from the frames
it still buffers (``curate.buffer_mb``): for each scene, the size bucket (closest aspect), the longest length bucket
that fits (``buckets``) and up to ``max_clips_per_scene`` windows spread evenly over the scene. Windows whose frames
left the buffer (a scene longer than it) are decoded again by a second pass (``decode.read_windows``), as is
everything of a variable-rate input (its first pass sees the source frames: when the packet index gives the
timestamps before decoding, that pass only decodes; otherwise what it curated is discarded). Each window's
source-resolution frames are scored by every filter (``filters.assess``: brightness, sharpness, motion, text area,
aesthetic); windows that still contain a cut (max frame change > ``cut_check_threshold``) are dropped; kept clips
are center-cropped + resized to the bucket and written at once, and captioned with their key frames
``caption.batch_size`` per captioner call as the batches fill (``captioner``: sidecar or Qwen2-VL, aesthetic score
appended). Every candidate gets a pHash (for the run-wide near-duplicate check at merge) and a thumbnail. Memory is
bounded by the buffer, the windows being curated and, per clip of a caption batch, the frames the captioner reads
(``caption.num_frames``, none with sidecar captions), whatever the video's length. Rows are the same whichever pass
curated a window; when the first pass's results are void (PyAV starting over after decord failed part-way, a
truncation found at the end, an error) the files it wrote are removed.

Settings reach every step the same way: each helper that applies a curation setting takes the whole ``cfg`` (the
CurateConfig) and reads its fields itself (``scenes.SceneStream``, ``buckets.*``, ``window_starts``,
``filters.assess``, ``Models``); the decoder (``decode.scan_video``/``read_windows``, shared with the benchmarks) and
the pixel helpers take plain values.

Rows (``manifest.manifest_row``), one of:
- a candidate clip window: status "kept" (clip written) or "rejected" (first failing check, e.g. "sharpness 12.3 <
  200", "cut inside clip: change 40.1 > 25");
- a scene shorter than the shortest allowed window: "rejected", "scene too short: <n> < <span> frames", clip_id "";
- an input that cannot be decoded or processed: one "failed" row with the reason, clip fields null/NaN.
``fps`` is the clip's frame rate (source fps / frame_stride); ``start_s``/``end_s`` come from the decoded frames'
presentation timestamps. clip_id = sha256(output pixels, source hash, window)[:16]. The stage around it: ``shard.py``
(inputs -> per-input store), ``merge.py`` (store -> ClipManifest folder), ``driver.py`` (both, in-process).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from common.config import CurateConfig
from common.hashing import sha256_bytes
from common.storage import InputFile, read_text
from tasks.curate.decode import DecodeError, read_windows, write_clip
from tasks.curate.filters import assess
from tasks.curate.manifest import manifest_row

if TYPE_CHECKING:
    from tasks.curate.firstpass import Window


def window_starts(scene_start: int, scene_end: int, span: int, cfg: CurateConfig) -> List[int]:
    """Starts of up to ``cfg.max_clips_per_scene`` non-overlapping windows of ``span`` frames spread evenly over the
    scene [scene_start, scene_end)."""
    count = min(cfg.max_clips_per_scene, (scene_end - scene_start) // span)
    if count <= 0:
        return []
    gap = (scene_end - scene_start - count * span) / (count + 1)
    return [scene_start + int(round(gap * (i + 1))) + i * span for i in range(count)]


def center_crop_resize(frames_THWC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center-crop uint8 [T,H,W,3] frames to the aspect width/height, then resize to [T,height,width,3]."""
    _, h, w, _ = frames_THWC.shape
    crop_h, crop_w = (h, min(w, max(1, round(h * width / height)))) if w * height >= h * width else \
        (min(h, max(1, round(w * height / width))), w)
    y0, x0 = (h - crop_h) // 2, (w - crop_w) // 2
    cropped_THWC = frames_THWC[:, y0:y0 + crop_h, x0:x0 + crop_w]
    out = []
    for f in cropped_THWC:
        f = np.ascontiguousarray(f)
        while f.shape[0] >= 4 * height and f.shape[1] >= 4 * width:   # exact 2x2 box steps, then INTER_AREA
            f = cv2.pyrDown(f)
        out.append(cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def clip_id(pixels_THWC: np.ndarray, source_hash: str, start: int, end: int, stride: int) -> str:
    """Deterministic clip id: sha256[:16] of the output pixels, the source hash and the window."""
    return sha256_bytes(np.ascontiguousarray(pixels_THWC).tobytes(), source_hash.encode(),
                        f"{start}:{end}:{stride}".encode(), n=16)


class Models:
    """The learned scorers of one worker, built on first use (a shard builds them at most once)."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.cfg = cfg
        self._scorer: Any = None
        self._vlm: Any = None

    @property
    def scorer(self) -> Any:
        if self._scorer is None:
            from tasks.curate.aesthetic import AestheticScorer

            self._scorer = AestheticScorer(self.cfg.aesthetic)
        return self._scorer

    def captioner(self, sidecar: str | None) -> Any:
        from tasks.curate.captioner import QwenVLCaptioner, SidecarCaptioner

        if self.cfg.caption.backend == "sidecar" or (sidecar and self.cfg.caption.prefer_sidecar):
            return SidecarCaptioner(sidecar or self.cfg.default_caption)
        if self._vlm is None:
            self._vlm = QwenVLCaptioner(self.cfg.caption)
        return self._vlm

    def prepare(self) -> None:
        """Build the aesthetic scorer (it scores every window) and import the captioning model's libraries, so that
        neither happens while a decoder thread runs: importing torch/transformers then left the heap fragmented
        (bench/curation.py at 720p: peak RSS 3.6 GB instead of 1.3; measured). The captioning model itself is still
        built on the first kept clip."""
        _ = self.scorer
        if self.cfg.caption.backend != "sidecar":
            import transformers  # noqa: F401


def read_sidecar(item: InputFile, progress: Callable[[str], None]) -> str | None:
    """The sidecar caption (whitespace collapsed), or None when there is none or it cannot be read."""
    if not item.caption_uri:
        return None
    try:
        return " ".join(read_text(item.caption_uri).split()) or None
    except OSError as e:
        progress(f"  caption {item.caption_uri} unreadable ({e}); not used")
        return None


def thumbnail(frame_HWC: np.ndarray, height: int = 72) -> bytes:
    """PNG bytes of one RGB frame scaled to ``height`` rows (for the contact sheet)."""
    h, w = frame_HWC.shape[:2]
    small = cv2.resize(np.ascontiguousarray(frame_HWC), (max(2, round(w * height / h)), height),
                       interpolation=cv2.INTER_AREA)
    return cv2.imencode(".png", small[..., ::-1])[1].tobytes()


def curate_video(path: Path, source_hash: str, sidecar: str | None, cfg: CurateConfig, models: Models,
                 out_dir: Path) -> List[Tuple[Dict[str, Any], str]]:
    """(row, reason key) for every scene / window of one decodable input; clips go to ``out_dir/clips``, thumbnails
    to ``out_dir/thumbs``. One streamed pass analyses scenes and curates each scene's windows from the frames it
    still buffers (``firstpass.FirstPass``); the windows whose frames it no longer held (a scene longer than
    ``cfg.buffer_mb``), and every window of a variable-rate input, are read by a second pass
    (``decode.read_windows``). Raises DecodeError; on any error the files this call wrote are removed."""
    from tasks.curate.decode import scan_video
    from tasks.curate.firstpass import FirstPass
    from tasks.curate.scenes import rescan_scenes

    def make_curator(fps: float, height: int, width: int) -> _Curator:
        return _Curator(fps, height, width, source_hash, sidecar, cfg, models, out_dir)

    models.prepare()   # before the decoder's thread starts
    first = FirstPass(cfg, make_curator)
    try:
        info = scan_video(path, first.start, cfg.max_pixels, cfg.max_frames,   # 1. decodes every frame once
                          on_timestamps=first.timestamps, backend=cfg.decoder)
        first.close()
        curator = make_curator(info.fps, info.meta["height"], info.meta["width"])   # TOO_SMALL / NO_LENGTH
        if info.meta["vfr"] or first.curator is None or (first.curator.src_h, first.curator.src_w) != (
                curator.src_h, curator.src_w):   # 2a. nothing usable curated: the pass saw source frames (vfr)
            first.discard()                      # or frames of another size than its last ones
            first.curator = curator              # (so that an error below removes this curator's files)
            scenes = rescan_scenes(info, cfg)
            per_scene = [(i, s, e, curator.windows(i, s, e)) for i, (s, e) in enumerate(scenes.scenes)]
            curator.curate([((i, s, e), None) for i, s, e, windows in per_scene if not windows], scenes.changes)
            deferred = [w for *_, windows in per_scene for w in windows]
        else:   # 2b. the scenes still open when the pass ended, from the buffer
            curator, scenes = first.curator, first.stream.finish()
            done = first.settled
            if scenes.scenes[:len(done)] != done:   # SceneStream.settled is wrong: our bug, not the input's fault
                raise RuntimeError(f"{path.name}: the scenes settled during the pass {done} are not those found at "
                                   f"its end {scenes.scenes[:len(done)]} (tasks/curate/scenes.py SceneStream.settled)")
            items = first.items([(i, s, e) for i, (s, e) in enumerate(scenes.scenes) if i >= len(done)])
            first.release()   # the buffer is not needed any more: not held through the second pass
            curator.curate(items, scenes.changes)
            del items
            deferred = first.deferred
        if deferred:   # 3. second pass: only the windows that were not buffered
            windows = [list(range(start, start + span, cfg.frame_stride)) for _, _, start, span, _ in deferred]
            with contextlib.closing(read_windows(info, windows)) as frames:
                for w, src_THWC in zip(deferred, frames):
                    curator.curate([(w, src_THWC)], scenes.changes)
        return curator.rows(info.meta["timestamps"])
    except BaseException:
        first.discard()
        raise


class _Curator:
    """The rows and files of one video's scenes and windows, curated in any order (``curate``, ``window``) and
    returned in scene order (``rows``). Raises DecodeError TOO_SMALL / NO_LENGTH when no clip can be cut."""

    def __init__(self, src_fps: float, src_h: int, src_w: int, source_hash: str, sidecar: str | None,
                 cfg: CurateConfig, models: Models, out_dir: Path) -> None:
        from tasks.curate import buckets

        _, self.out_h, self.out_w = _top_resolution(src_h, src_w, cfg)
        self.fps = src_fps / cfg.frame_stride
        allowed = buckets.lengths(cfg, self.fps)
        if not allowed:
            raise DecodeError(DecodeError.NO_LENGTH, f"no clip length in {[cfg.clip_frames, *cfg.bucket_frames]} "
                              f"fits [{cfg.min_clip_s}, {cfg.max_clip_s}] s at {self.fps:g} fps")
        self.min_span = (allowed[-1] - 1) * cfg.frame_stride + 1
        self.src_fps, self.src_h, self.src_w = src_fps, src_h, src_w
        self.source_hash, self.sidecar, self.cfg, self.models, self.out_dir = source_hash, sidecar, cfg, models, out_dir
        self.fallback = sidecar or cfg.default_caption
        self.results: Dict[Tuple[int, int], List[Tuple[Dict[str, Any], str]]] = {}   # (scene, window) -> rows
        self.times: List[Tuple[Dict[str, Any], int, Optional[int]]] = []   # (row, first frame, last frame or None)
        self.written: List[Path] = []
        self.to_caption: List[Tuple[Dict[str, Any], np.ndarray, Optional[float]]] = []   # kept rows + frames, in order
        self.scorer = models.scorer
        self.captioner: Any = None   # built on the first kept clip

    def windows(self, scene_index: int, start: int, end: int) -> List[Window]:
        """The windows of the scene [start, end): (scene index, window index, start, span, length bucket); none
        when the scene is shorter than every length bucket."""
        from tasks.curate import buckets

        n = buckets.length_bucket(end - start, self.cfg, self.fps)
        if n is None:
            return []
        span = (n - 1) * self.cfg.frame_stride + 1
        return [(scene_index, k, s, span, n) for k, s in enumerate(window_starts(start, end, span, self.cfg))]

    def curate(self, items: Sequence[Tuple[Any, Any]], changes: np.ndarray) -> None:
        """Curate ``items``: ((scene index, start, end), None) for a scene without windows (a "scene too short"
        row), (window, its source frames [T,H,W,3] or a list of [H,W,3]) otherwise; ``changes`` [>= the last frame
        + 1]: the per-frame changes of the scene analysis (``SceneAnalysis.changes``)."""
        for what, frames in items:
            if frames is None:
                self._too_short(*what)
            else:
                scene_index, k, start, span, n = what
                self.window(scene_index, k, start, span, n, np.stack(frames) if isinstance(frames, list) else frames,
                            changes)

    def _too_short(self, scene_index: int, s: int, e: int) -> None:
        row = manifest_row(self.source_hash, self.fallback, "rejected",
                           f"scene too short: {e - s} < {self.min_span} frames", start_frame=s, end_frame=e,
                           scene_index=scene_index, duration_s=(e - s) / self.src_fps, **self._common())
        self.times.append((row, s, e - 1))
        self.results[scene_index, 0] = [(row, "scene too short")]

    def window(self, scene_index: int, k: int, start: int, span: int, n: int, src_THWC: np.ndarray,
               changes: np.ndarray) -> None:
        """Curate window ``k`` of a scene: its source frames ``src_THWC`` (``span`` source frames from ``start`` at
        the frame stride, length bucket ``n``), ``changes`` the per-frame changes of the scene analysis."""
        from tasks.curate import buckets
        from tasks.curate.dedup import clip_phash

        cfg, scorer = self.cfg, self.scorer
        report = assess(src_THWC, cfg, scorer)
        failure = report.first_failure
        change = float(changes[start + 1:start + span].max()) if span > 1 else 0.0
        reason, key = (failure.reason, failure.key) if failure else ("", "")
        if change > cfg.cut_check_threshold:   # a cut the detectors missed: drop the clip
            reason, key = f"cut inside clip: change {change:.1f} > {cfg.cut_check_threshold:g}", "cut inside clip"
        clip_THWC = center_crop_resize(src_THWC, self.out_h, self.out_w)
        cid = clip_id(clip_THWC, self.source_hash, start, start + span, cfg.frame_stride)
        self._write(self.out_dir / "thumbs" / f"{cid}.png", thumbnail(clip_THWC[len(clip_THWC) // 2]))
        rel = "" if reason else f"clips/{cid}.mp4"
        images, mark = [], len(self.to_caption)
        if rel:
            self.written.append(self.out_dir / rel)
            write_clip(self.out_dir / rel, clip_THWC, self.fps)
            for j in _keyframe_indices(len(src_THWC), cfg.keyframes):
                at = start + j * cfg.frame_stride   # the key frame's source frame
                image = _image_row(src_THWC[j:j + 1], self.out_h, self.out_w, self.source_hash, cid,
                                   (at, cfg.frame_stride), self.sidecar, self.fallback, cfg, self.models,
                                   self.out_dir, "keyframe", self.to_caption, self.written, scene_index=scene_index,
                                   src_height=self.src_h, src_width=self.src_w)
                self.times.append((image[0], at, None))
                images.append(image)
        row = manifest_row(self.source_hash, self.fallback, "rejected" if reason else "kept", reason, clip_id=cid,
                           start_frame=start, end_frame=start + span, height=self.out_h, width=self.out_w,
                           num_frames=len(clip_THWC), duration_s=len(clip_THWC) / self.fps, scene_index=scene_index,
                           sharpness=report.sharpness, brightness=report.brightness, score=report.score,
                           bucket=buckets.bucket_name(self.out_h, self.out_w, n), path=rel, motion=report.motion,
                           text_area=report.text_area, aesthetic=report.aesthetic, phash=clip_phash(clip_THWC),
                           scored_by=f"aesthetic {scorer.identity}", kind="clip",
                           variants="" if reason else json.dumps(buckets.variants(self.out_h, self.out_w, n, cfg,
                                                                                  self.fps)),
                           **self._common())
        self.times.append((row, start, start + span - 1))
        if not reason:   # hold only the frames the captioner reads (none for sidecar captions) until then
            self.captioner = self.models.captioner(self.sidecar) if self.captioner is None else self.captioner
            self.to_caption.insert(mark, (row, src_THWC, report.aesthetic))   # before its key frames
            self.to_caption[mark:] = [(r, self.captioner.frames_read(f), a) for r, f, a in self.to_caption[mark:]]
        self.results[scene_index, k] = [(row, key), *images]
        full = len(self.to_caption) // cfg.caption.batch_size * cfg.caption.batch_size
        if full:   # the same batches as captioning every row at the end, without holding their frames
            _caption_rows(self.to_caption[:full], self.captioner, cfg.caption.batch_size)
            del self.to_caption[:full]

    def rows(self, timestamps: np.ndarray) -> List[Tuple[Dict[str, Any], str]]:
        """Every row in scene and window order, captioned, with ``start_s``/``end_s`` from the frames' timestamps
        (seconds; known once the first pass has ended)."""
        if self.to_caption:
            _caption_rows(self.to_caption, self.captioner, self.cfg.caption.batch_size)
            self.to_caption = []
        for row, first, last in self.times:
            row["start_s"] = float(timestamps[first])
            if last is not None:
                row["end_s"] = float(timestamps[last]) + 1 / self.src_fps
        return [r for key in sorted(self.results) for r in self.results[key]]

    def discard(self) -> None:
        """Remove every file written so far and forget the rows."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written, self.results, self.times, self.to_caption = [], {}, [], []

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(path)
        path.write_bytes(data)

    def _common(self) -> Dict[str, Any]:
        return dict(fps=self.fps, src_height=self.src_h, src_width=self.src_w)


def _caption_rows(to_caption: List[Tuple[Dict[str, Any], np.ndarray, Optional[float]]], captioner: Any,
                  batch_size: int) -> None:
    """Set ``caption`` and ``caption_source`` of the kept rows in ``to_caption`` [(row, source frames, aesthetic)],
    ``batch_size`` rows per captioner call, in order (``Captioner.caption_batch``: the captions of one by one)."""
    for i in range(0, len(to_caption), batch_size):
        chunk = to_caption[i:i + batch_size]
        for (row, _, _), text in zip(chunk, captioner.caption_batch([(f, a) for _, f, a in chunk])):
            row.update(caption=text, caption_source=captioner.source)


def _top_resolution(src_h: int, src_w: int, cfg: CurateConfig) -> Tuple[str, int, int]:
    """(name, H, W) of the largest resolution the source covers; DecodeError TOO_SMALL when it covers none."""
    from tasks.curate import buckets

    found = buckets.covered(src_h, src_w, cfg)
    if not found:
        h, w = buckets.smallest_size(cfg)
        raise DecodeError(DecodeError.TOO_SMALL, f"{src_w}x{src_h} does not cover the smallest resolution bucket "
                          f"{w}x{h} (never upscaled): add a smaller curate.resolutions entry to keep it")
    return found[0]


def _keyframe_indices(num_frames: int, count: int) -> List[int]:
    """``count`` frame indices spread evenly inside a clip (1: the middle frame)."""
    return [int((i + 1) * num_frames / (count + 1)) for i in range(count)] if count else []


def _image_row(src_1HWC: np.ndarray, out_h: int, out_w: int, source_hash: str, parent: str, at: Tuple[int, int],
               sidecar: str | None, fallback: str, cfg: CurateConfig, models: Models, out_dir: Path, kind: str,
               to_caption: Optional[List[Tuple[Dict[str, Any], np.ndarray, Optional[float]]]] = None,
               written: Optional[List[Path]] = None, **fields: Any) -> Tuple[Dict[str, Any], str]:
    """(row, reason key) of one image sample: an image file (``kind`` "image") or a key frame of the kept clip
    ``parent`` ("keyframe"), scored by the image filters (all but motion), cropped and resized to out_h x out_w
    (written as PNG under images/ when kept) and captioned: now, or, with ``to_caption``, by the caller (a kept
    row is appended to it). The files written are appended to ``written``."""
    from tasks.curate import buckets
    from tasks.curate.dedup import clip_phash

    report = assess(src_1HWC, cfg, models.scorer, image=True)
    failure = report.first_failure
    image_1HWC = center_crop_resize(src_1HWC, out_h, out_w)
    iid = clip_id(image_1HWC, source_hash, at[0], at[0] + 1, at[1])
    (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    written = [] if written is None else written
    written.append(out_dir / "thumbs" / f"{iid}.png")
    (out_dir / "thumbs" / f"{iid}.png").write_bytes(thumbnail(image_1HWC[0]))
    rel = ""
    if failure is None:
        rel = f"images/{iid}.png"
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        written.append(out_dir / rel)
        cv2.imwrite(str(out_dir / rel), np.ascontiguousarray(image_1HWC[0][..., ::-1]))
    row = manifest_row(source_hash, fallback, "rejected" if failure else "kept", failure.reason if failure else "",
                       clip_id=iid, height=out_h, width=out_w, num_frames=1, sharpness=report.sharpness,
                       brightness=report.brightness, score=report.score, bucket=buckets.bucket_name(out_h, out_w, 1),
                       path=rel, text_area=report.text_area, aesthetic=report.aesthetic,
                       phash=clip_phash(image_1HWC),
                       scored_by=f"aesthetic {models.scorer.identity}", kind=kind,
                       parent_clip=parent if kind == "keyframe" else "",
                       variants="" if failure else json.dumps(buckets.variants(out_h, out_w, 1, cfg, 1.0)), **fields)
    if failure is None:
        if to_caption is None:
            _caption_rows([(row, src_1HWC, report.aesthetic)], models.captioner(sidecar), 1)
        else:
            to_caption.append((row, src_1HWC, report.aesthetic))
    return row, failure.key if failure else ""


def read_image(path: Path, max_pixels: int) -> np.ndarray:
    """An image file -> uint8 RGB [1,H,W,3]; DecodeError for an empty, undecodable or too large file."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise DecodeError(DecodeError.EMPTY, f"{path.name} has 0 bytes")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError(DecodeError.NOT_IMAGE, f"{path.name}: OpenCV cannot decode it as an image")
    if bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise DecodeError(DecodeError.TOO_LARGE, f"{bgr.shape[1]}x{bgr.shape[0]} > {max_pixels} pixels")
    return np.ascontiguousarray(bgr[None, ..., ::-1])


def curate_image(path: Path, source_hash: str, sidecar: str | None, cfg: CurateConfig, models: Models,
                 out_dir: Path) -> List[Tuple[Dict[str, Any], str]]:
    """The row of one image file (jpg, png, webp): cut at the largest resolution it covers, image filters,
    captioned (sidecar <stem>.txt or the model). Raises DecodeError."""
    image_1HWC = read_image(path, cfg.max_pixels)
    _, src_h, src_w, _ = image_1HWC.shape
    _, out_h, out_w = _top_resolution(src_h, src_w, cfg)
    return [_image_row(image_1HWC, out_h, out_w, source_hash, "", (0, 1), sidecar, sidecar or cfg.default_caption,
                       cfg, models, out_dir, "image", src_height=src_h, src_width=src_w)]


def curate_input(item: InputFile, cfg: CurateConfig, models: Models, out_dir: Path, path: Path, source_hash: str,
                 sidecar: str | None) -> List[Tuple[Dict[str, Any], str]]:
    """Rows with reason keys of one fetched input. A content failure (``DecodeError``: empty, not a video,
    undecodable, too short, too large) becomes one "failed" row, which is data: stored and cached like any result.
    Anything else (storage unreachable, a model that fails to load, out of memory, a bug) is transient or ours, not
    the input's: it propagates, so the shard fails (Flyte retries it), nothing is stored, and a later run processes
    the input again."""
    from common.storage import IMAGE_EXTENSIONS

    fallback = sidecar or cfg.default_caption
    try:
        if Path(item.name).suffix.lower() in IMAGE_EXTENSIONS:
            return curate_image(path, source_hash, sidecar, cfg, models, out_dir)
        return curate_video(path, source_hash, sidecar, cfg, models, out_dir)
    except DecodeError as e:
        return [(manifest_row(source_hash, fallback, "failed", str(e)), e.kind)]

