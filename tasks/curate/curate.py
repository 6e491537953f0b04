"""Curation of one input: fetched file -> manifest rows + clips (docs/artifacts.md), without Flyte.

``curate_video`` streams the video twice and never holds it: the first pass decodes every frame once (decord,
PyAV fallback, constant frame rate) and analyses scenes on it (``scenes.scan_scenes``: hard cuts + fades/dissolves
on small frames); then, for each scene, it picks the size bucket (closest aspect) and the longest length bucket that
fits (``buckets``) and up to ``max_clips_per_scene`` windows spread evenly over the scene, and the second pass
(``decode.read_windows``) decodes up to the last window, one window's frames at a time. Each window's source-resolution
frames are scored by every filter (``filters.assess``: brightness, sharpness, motion, text area, aesthetic); windows
that still contain a cut (max frame change > ``cut_check_threshold``) are dropped; kept clips are center-cropped +
resized to the bucket and written at once, and captioned with their key frames ``caption.batch_size`` per captioner
call as the batches fill (``captioner``: sidecar or Qwen2-VL, aesthetic score appended). Every candidate gets a
pHash (for the run-wide near-duplicate check at merge) and a thumbnail. Memory is bounded by one window of source
frames (plus, per clip of a caption batch, the frames the captioner reads: ``caption.num_frames``, none with sidecar
captions), whatever the video's length.

Settings reach every step the same way: each helper that applies a curation setting takes the whole ``cfg`` (the
CurateConfig) and reads its fields itself (``scenes.scan_scenes``, ``buckets.*``, ``window_starts``,
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
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np

from common.config import CurateConfig
from common.hashing import sha256_bytes
from common.storage import InputFile, read_text
from tasks.curate.decode import DecodeError, read_windows, write_clip
from tasks.curate.filters import assess
from tasks.curate.manifest import manifest_row

if TYPE_CHECKING:
    from tasks.curate.decode import VideoInfo
    from tasks.curate.scenes import SceneAnalysis


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
    to ``out_dir/thumbs``. Two passes over the video, neither holding it: scene analysis while decoding every frame
    once (``scenes.scan_scenes``), then the windows' frames only, one window at a time (``decode.read_windows``).
    Raises DecodeError."""
    from tasks.curate import buckets
    from tasks.curate.scenes import scan_scenes

    # 1. first pass: decode every frame once, analyse scenes
    info, scenes = scan_scenes(path, cfg, cfg.max_pixels, cfg.max_frames)
    src_h, src_w = info.meta["height"], info.meta["width"]
    fps = info.fps / cfg.frame_stride
    _, out_h, out_w = _top_resolution(src_h, src_w, cfg)
    allowed = buckets.lengths(cfg, fps)
    if not allowed:
        raise DecodeError(DecodeError.NO_LENGTH, f"no clip length in {[cfg.clip_frames, *cfg.bucket_frames]} fits "
                         f"[{cfg.min_clip_s}, {cfg.max_clip_s}] s at {fps:g} fps")
    min_span = (allowed[-1] - 1) * cfg.frame_stride + 1
    # 2. the windows of every scene: (scene index, scene, length bucket or None, span, starts)
    plan: List[Tuple[int, int, int, Optional[int], int, List[int]]] = []
    for scene_index, (s, e) in enumerate(scenes.scenes):
        n = buckets.length_bucket(e - s, cfg, fps)
        span = (n - 1) * cfg.frame_stride + 1 if n is not None else 0
        plan.append((scene_index, s, e, n, span, window_starts(s, e, span, cfg) if n is not None else []))
    windows = [list(range(start, start + span, cfg.frame_stride)) for *_, span, starts in plan for start in starts]
    with contextlib.closing(read_windows(info, windows)) as frames:   # second pass: a window at a time
        return _curate_windows(frames, plan, info, scenes, min_span, out_h, out_w, source_hash, sidecar, cfg,
                               models, out_dir)


def _curate_windows(frames: Iterator[np.ndarray], plan: List[Tuple[int, int, int, Optional[int], int, List[int]]],
                    info: VideoInfo, scenes: SceneAnalysis, min_span: int, out_h: int, out_w: int, source_hash: str,
                    sidecar: str | None, cfg: CurateConfig, models: Models,
                    out_dir: Path) -> List[Tuple[Dict[str, Any], str]]:
    """The rows of ``curate_video``'s plan [(scene index, start, end, length bucket or None, span, window starts)],
    taking each window's frames from ``frames``."""
    from tasks.curate import buckets
    from tasks.curate.dedup import clip_phash

    src_fps, times = info.fps, info.meta["timestamps"]
    src_h, src_w = info.meta["height"], info.meta["width"]
    fps = src_fps / cfg.frame_stride
    # 3. each window: filters, cut check, crop + resize, thumbnail, clip, key frames; captions in batches
    common = dict(fps=fps, src_height=src_h, src_width=src_w)
    fallback = sidecar or cfg.default_caption
    scorer = models.scorer
    out: List[Tuple[Dict[str, Any], str]] = []
    to_caption: List[Tuple[Dict[str, Any], np.ndarray, Optional[float]]] = []   # kept clips and key frames, in order
    captioner: Any = None
    for scene_index, s, e, n, span, starts in plan:
        if n is None:
            reason = f"scene too short: {e - s} < {min_span} frames"
            out.append((manifest_row(source_hash, fallback, "rejected", reason, start_frame=s, end_frame=e,
                                     scene_index=scene_index, duration_s=(e - s) / src_fps, start_s=float(times[s]),
                                     end_s=float(times[e - 1]) + 1 / src_fps, **common), "scene too short"))
            continue
        for start in starts:
            src_THWC = next(frames)
            report = assess(src_THWC, cfg, scorer)
            failure = report.first_failure
            change = float(scenes.changes[start + 1:start + span].max()) if span > 1 else 0.0
            reason, key = (failure.reason, failure.key) if failure else ("", "")
            if change > cfg.cut_check_threshold:   # a cut the detectors missed: drop the clip
                reason, key = f"cut inside clip: change {change:.1f} > {cfg.cut_check_threshold:g}", "cut inside clip"
            clip_THWC = center_crop_resize(src_THWC, out_h, out_w)
            cid = clip_id(clip_THWC, source_hash, start, start + span, cfg.frame_stride)
            (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
            (out_dir / "thumbs" / f"{cid}.png").write_bytes(thumbnail(clip_THWC[len(clip_THWC) // 2]))
            caption = fallback   # a kept clip's caption is filled in by _caption_rows below
            rel = "" if reason else f"clips/{cid}.mp4"
            images, mark = [], len(to_caption)
            if rel:
                write_clip(out_dir / rel, clip_THWC, fps)
                for k in _keyframe_indices(len(src_THWC), cfg.keyframes):
                    at = start + k * cfg.frame_stride   # the key frame's source frame
                    images.append(_image_row(src_THWC[k:k + 1], out_h, out_w, source_hash, cid, (at, cfg.frame_stride),
                                             sidecar, fallback, cfg, models, out_dir, "keyframe", to_caption,
                                             scene_index=scene_index, start_s=float(times[at]), src_height=src_h,
                                             src_width=src_w))
            row = manifest_row(source_hash, caption, "rejected" if reason else "kept", reason, clip_id=cid,
                               start_frame=start, end_frame=start + span, height=out_h, width=out_w,
                               num_frames=len(clip_THWC), duration_s=len(clip_THWC) / fps, scene_index=scene_index,
                               sharpness=report.sharpness, brightness=report.brightness, score=report.score,
                               bucket=buckets.bucket_name(out_h, out_w, n), path=rel, start_s=float(times[start]),
                               end_s=float(times[start + span - 1]) + 1 / src_fps, motion=report.motion,
                               text_area=report.text_area, aesthetic=report.aesthetic, phash=clip_phash(clip_THWC),
                               scored_by=f"aesthetic {scorer.identity}", kind="clip",
                               variants="" if reason else json.dumps(buckets.variants(out_h, out_w, n, cfg, fps)),
                               **common)
            if not reason:   # hold only the frames the captioner reads (none for sidecar captions) until then
                captioner = models.captioner(sidecar) if captioner is None else captioner
                to_caption.insert(mark, (row, src_THWC, report.aesthetic))   # before its key frames
                to_caption[mark:] = [(r, captioner.frames_read(f), a) for r, f, a in to_caption[mark:]]
            out += [(row, key), *images]
            full = len(to_caption) // cfg.caption.batch_size * cfg.caption.batch_size
            if full:   # the same batches as captioning every row at the end, without holding their frames
                _caption_rows(to_caption[:full], captioner, cfg.caption.batch_size)
                del to_caption[:full]
    if to_caption:
        _caption_rows(to_caption, captioner, cfg.caption.batch_size)
    return out


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
               **fields: Any) -> Tuple[Dict[str, Any], str]:
    """(row, reason key) of one image sample: an image file (``kind`` "image") or a key frame of the kept clip
    ``parent`` ("keyframe"), scored by the image filters (all but motion), cropped and resized to out_h x out_w
    (written as PNG under images/ when kept) and captioned: now, or, with ``to_caption``, by the caller (a kept
    row is appended to it)."""
    from tasks.curate import buckets
    from tasks.curate.dedup import clip_phash

    report = assess(src_1HWC, cfg, models.scorer, image=True)
    failure = report.first_failure
    image_1HWC = center_crop_resize(src_1HWC, out_h, out_w)
    iid = clip_id(image_1HWC, source_hash, at[0], at[0] + 1, at[1])
    (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    (out_dir / "thumbs" / f"{iid}.png").write_bytes(thumbnail(image_1HWC[0]))
    rel = ""
    if failure is None:
        rel = f"images/{iid}.png"
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
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

