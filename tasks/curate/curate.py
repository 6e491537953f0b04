"""Curation of one input: fetched file -> manifest rows + clips (docs/artifacts.md), without Flyte.

``curate_video`` decodes (decord, PyAV fallback, constant frame rate), analyses scenes (``scenes.analyse``: hard
cuts + fades/dissolves), and for each scene picks the size bucket (closest aspect) and the longest length bucket that
fits (``buckets``), cuts up to ``max_clips_per_scene`` windows spread evenly over the scene, scores every filter on
the window's source-resolution frames (``filters.assess``: brightness, sharpness, motion, text area, aesthetic),
drops windows that still contain a cut (max frame change > ``cut_check_threshold``), center-crops + resizes to the
bucket and captions kept clips (``captioner``: sidecar or Qwen2-VL, aesthetic score appended). Every candidate gets
a pHash (for the run-wide near-duplicate check at merge) and a thumbnail.

Rows, one of:
- a candidate clip window: status "kept" (clip written) or "rejected" (first failing check, e.g. "sharpness 12.3 <
  200", "cut inside clip: change 40.1 > 25");
- a scene shorter than the shortest allowed window: "rejected", "scene too short: <n> < <span> frames", clip_id "";
- an input that cannot be decoded or processed: one "failed" row with the reason, clip fields null/NaN.
``fps`` is the clip's frame rate (source fps / frame_stride); ``start_s``/``end_s`` come from the decoded frames'
presentation timestamps. ``run_curation`` runs the whole stage in-process (shards -> store -> merge; see
``shard.py`` and ``merge.py`` for the store, the accounting and summary.json). clip_id = sha256(output pixels, source
hash, window)[:16]; content_hash = sha256 over (relative path, sha256 of bytes) of every file but summary.json.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import cv2
import numpy as np
import pyarrow as pa

from common.config import CurateConfig
from common.storage import InputFile, list_inputs, read_text
from tasks.curate.decode import DecodeError, read_video, write_clip
from tasks.curate.filters import assess

SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("source_uri", pa.string()), ("source_hash", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("start_frame", pa.int64()), ("end_frame", pa.int64()), ("fps", pa.float64()),
    ("src_height", pa.int64()), ("src_width", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
    ("num_frames", pa.int64()), ("duration_s", pa.float64()), ("scene_index", pa.int64()),
    ("sharpness", pa.float64()), ("brightness", pa.float64()), ("score", pa.float64()), ("caption", pa.string()),
    ("bucket", pa.string()), ("path", pa.string()),
    # added by the production curation (issue 4); older readers ignore them
    ("start_s", pa.float64()), ("end_s", pa.float64()), ("motion", pa.float64()), ("text_area", pa.float64()),
    ("aesthetic", pa.float64()), ("phash", pa.string()), ("caption_source", pa.string()), ("scored_by", pa.string()),
])
NAN = float("nan")


def _sha16(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    """sha256[:16] of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def folder_hash(folder: Path, exclude: Tuple[str, ...] = ("summary.json",)) -> str:
    """sha256[:16] over (relative path, sha256 of bytes) of every file, sorted by path, minus ``exclude``."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        if rel not in exclude:
            h.update(f"{rel}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()[:16]


def window_starts(scene_start: int, scene_end: int, span: int, max_clips: int) -> List[int]:
    """Starts of up to ``max_clips`` non-overlapping windows of ``span`` frames spread evenly over the scene."""
    count = min(max_clips, (scene_end - scene_start) // span)
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
    return _sha16(np.ascontiguousarray(pixels_THWC).tobytes(), source_hash.encode(), f"{start}:{end}:{stride}".encode())


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


def _row(source_hash: str, caption: str, status: str, reason: str, **clip: Any) -> Dict[str, Any]:
    """A manifest row without ``source_uri`` (added at merge: stored results are shared by identical bytes)."""
    row: Dict[str, Any] = {f.name: None for f in SCHEMA if f.name != "source_uri"}
    row.update(clip_id="", source_hash=source_hash, status=status, reason=reason, fps=NAN, duration_s=NAN,
               sharpness=NAN, brightness=NAN, score=NAN, caption=caption, bucket="", path="", start_s=NAN, end_s=NAN,
               motion=NAN, text_area=NAN, aesthetic=NAN, phash="", caption_source="", scored_by="")
    row.update(clip)
    return row


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
    to ``out_dir/thumbs``. Raises DecodeError."""
    from tasks.curate import buckets
    from tasks.curate.dedup import clip_phash
    from tasks.curate.scenes import analyse

    frames_THWC, src_fps, meta = read_video(path, cfg.max_pixels, cfg.max_frames)
    times = meta["timestamps"]
    _, src_h, src_w, _ = frames_THWC.shape
    fps = src_fps / cfg.frame_stride
    out_h, out_w = buckets.size_bucket(src_h, src_w, cfg.sizes)
    allowed = buckets.lengths(cfg, fps)
    if not allowed:
        raise ValueError(f"no clip length in {[cfg.clip_frames, *cfg.bucket_frames]} fits "
                         f"[{cfg.min_clip_s}, {cfg.max_clip_s}] s at {fps:g} fps")
    min_span = (allowed[-1] - 1) * cfg.frame_stride + 1
    scenes = analyse(frames_THWC, src_fps, cfg.scene_threshold, cfg.adaptive_threshold, cfg.analysis_width,
                     cfg.gradual_window, cfg.gradual_min_change, cfg.gradual_max_residual)
    common = dict(fps=fps, src_height=src_h, src_width=src_w)
    fallback = sidecar or cfg.default_caption
    scorer = models.scorer
    out: List[Tuple[Dict[str, Any], str]] = []
    pending: List[Tuple[Path, np.ndarray]] = []
    for scene_index, (s, e) in enumerate(scenes.scenes):
        n = buckets.length_bucket(e - s, cfg, fps)
        if n is None:
            out.append((_row(source_hash, fallback, "rejected", f"scene too short: {e - s} < {min_span} frames",
                             start_frame=s, end_frame=e, scene_index=scene_index, duration_s=(e - s) / src_fps,
                             start_s=float(times[s]), end_s=float(times[e - 1]) + 1 / src_fps, **common),
                        "scene too short"))
            continue
        span = (n - 1) * cfg.frame_stride + 1
        for start in window_starts(s, e, span, cfg.max_clips_per_scene):
            src_THWC = frames_THWC[start:start + span:cfg.frame_stride]
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
            if reason:
                caption, caption_source = fallback, ""
            else:
                captioner = models.captioner(sidecar)
                caption, caption_source = captioner.caption(src_THWC, report.aesthetic), captioner.source
            rel = "" if reason else f"clips/{cid}.mp4"
            if rel:
                pending.append((out_dir / rel, clip_THWC))
            out.append((_row(source_hash, caption, "rejected" if reason else "kept", reason, clip_id=cid,
                             start_frame=start, end_frame=start + span, height=out_h, width=out_w,
                             num_frames=len(clip_THWC), duration_s=len(clip_THWC) / fps, scene_index=scene_index,
                             sharpness=report.sharpness, brightness=report.brightness, score=report.score,
                             bucket=buckets.bucket_name(out_h, out_w, n), path=rel, start_s=float(times[start]),
                             end_s=float(times[start + span - 1]) + 1 / src_fps, motion=report.motion,
                             text_area=report.text_area, aesthetic=report.aesthetic, phash=clip_phash(clip_THWC),
                             caption_source=caption_source, scored_by=f"aesthetic {scorer.identity}", **common), key))
    for clip_path, clip_THWC in pending:
        write_clip(clip_path, clip_THWC, fps)
    return out


def curate_input(item: InputFile, cfg: CurateConfig, models: Models, out_dir: Path, path: Path, source_hash: str,
                 sidecar: str | None) -> List[Tuple[Dict[str, Any], str]]:
    """Rows with reason keys of one fetched input; never raises for a bad input (it becomes a "failed" row)."""
    fallback = sidecar or cfg.default_caption
    try:
        return curate_video(path, source_hash, sidecar, cfg, models, out_dir)
    except DecodeError as e:
        return [(_row(source_hash, fallback, "failed", str(e)), e.kind)]
    except MemoryError as e:
        return [(_row(source_hash, fallback, "failed", f"out of memory: {e}"), "out of memory")]
    except Exception as e:  # one bad input must not stop the stage; the reason is kept in the manifest
        return [(_row(source_hash, fallback, "failed", f"error: {type(e).__name__}: {e}"), "error")]


def run_curation(cfg: CurateConfig, out_dir: Path, progress: Callable[[str], None] = print,
                 store_dir: Path | None = None, shard_size: int | None = None) -> Dict[str, Any]:
    """Curate ``cfg.input_uri`` into the ClipManifest folder ``out_dir`` (must be empty or absent) in-process: plan
    shards, run each (``shard.run_shard``, results in the per-input store ``store_dir``; a temp dir when None) and
    merge (``merge.merge_shards``). Returns the summary."""
    from tasks.curate.merge import merge_shards
    from tasks.curate.shard import plan_shards, run_shard

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"run_curation: out_dir must be empty, {out_dir} is not")
    items = list_inputs(cfg.input_uri)
    progress(f"curate: {len(items)} inputs under {cfg.input_uri}")
    with tempfile.TemporaryDirectory(prefix="curate-store-") as tmp_store:
        store = Path(store_dir) if store_dir else Path(tmp_store)
        results = [run_shard(shard, cfg, store, progress) for shard in plan_shards(items, shard_size or cfg.shard_size)]
        return merge_shards(results, cfg, store, out_dir, progress)
