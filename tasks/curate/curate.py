"""Curation stage: inputs -> ClipManifest folder (docs/artifacts.md), without Flyte.

For each input (``common.storage.list_inputs`` order): fetch, hash the bytes, decode, split scenes, cut up to
``max_clips_per_scene`` non-overlapping windows of ``clip_frames`` frames taken every ``frame_stride`` source frames
(a window spans ``(clip_frames - 1) * frame_stride + 1`` source frames; windows are spread evenly over the scene),
score the filters on the window's source-resolution frames, center-crop + resize to ``height x width`` and write
kept clips. A failure in one input becomes a "failed" row; it never stops the run.

Rows (manifest.parquet), one of:
- a candidate clip window: status "kept" (clip written) or "rejected" (first failing filter, e.g.
  "sharpness 12.3 < 200");
- a scene shorter than one window: "rejected", reason "scene too short: <n> < <span> frames", clip_id "";
- an input with the same bytes as an earlier one: "rejected", reason "duplicate source (same bytes as <name>)";
- an input that cannot be fetched or decoded: one "failed" row, reason from DecodeError, clip fields null/NaN.
``fps`` is the clip's frame rate (source fps / frame_stride); ``duration_s`` is num_frames / fps for windows and the
scene's source duration for "scene too short" rows.

Accounting (summary.json), input level: every input gets exactly one outcome,
  "kept"     = inputs with >= 1 kept clip,
  "rejected" = inputs that decoded but gave no kept clip,
  "failed"   = inputs that could not be fetched, decoded or processed,
so inputs == kept + rejected + failed == number of distinct manifest source_uri values. Row level:
  rows == clips_kept + clips_rejected + failed, and sum(reasons.values()) == clips_rejected + failed,
where "reasons" counts non-kept rows by value-free reason key ("sharpness < 200", "scene too short", "empty file").
clip_id = sha256(output pixels, source hash, window)[:16]; content_hash = sha256 over (relative path, sha256 of
bytes) of manifest.parquet and clips/*, sorted by path, first 16 hex digits (summary.json itself is excluded).

summary.json keys: inputs, kept, rejected, failed, clips_kept, clips_rejected, rows, reasons, source_hashes (one per
input in listing order; "" when the input could not be fetched), input_status ({source_uri: outcome}), input_uri,
config (the CurateConfig as a dict), content_hash.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import CurateConfig, to_dict
from common.storage import InputFile, fetch, is_s3, list_inputs, read_text
from tasks.curate.decode import DecodeError, read_video, write_clip
from tasks.curate.filters import assess
from tasks.curate.scenes import detect_scenes

SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("source_uri", pa.string()), ("source_hash", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("start_frame", pa.int64()), ("end_frame", pa.int64()), ("fps", pa.float64()),
    ("src_height", pa.int64()), ("src_width", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
    ("num_frames", pa.int64()), ("duration_s", pa.float64()), ("scene_index", pa.int64()),
    ("sharpness", pa.float64()), ("brightness", pa.float64()), ("score", pa.float64()), ("caption", pa.string()),
    ("bucket", pa.string()), ("path", pa.string()),
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
    return np.stack([cv2.resize(np.ascontiguousarray(f), (width, height), interpolation=cv2.INTER_AREA)
                     for f in cropped_THWC])


def clip_id(pixels_THWC: np.ndarray, source_hash: str, start: int, end: int, stride: int) -> str:
    """Deterministic clip id: sha256[:16] of the output pixels, the source hash and the window."""
    return _sha16(np.ascontiguousarray(pixels_THWC).tobytes(), source_hash.encode(), f"{start}:{end}:{stride}".encode())


def _row(item: InputFile, source_hash: str, caption: str, status: str, reason: str, **clip: Any) -> Dict[str, Any]:
    row: Dict[str, Any] = {f.name: None for f in SCHEMA}
    row.update(clip_id="", source_uri=item.uri, source_hash=source_hash, status=status, reason=reason,
               fps=NAN, duration_s=NAN, sharpness=NAN, brightness=NAN, score=NAN, caption=caption, bucket="", path="")
    row.update(clip)
    return row


def _caption(item: InputFile, cfg: CurateConfig, progress: Callable[[str], None]) -> str:
    if not item.caption_uri:
        return cfg.default_caption
    try:
        return " ".join(read_text(item.caption_uri).split()) or cfg.default_caption
    except OSError as e:
        progress(f"  caption {item.caption_uri} unreadable ({e}); using the default caption")
        return cfg.default_caption


def _curate_video(item: InputFile, path: Path, source_hash: str, caption: str, cfg: CurateConfig,
                  out_dir: Path) -> List[Tuple[Dict[str, Any], str]]:
    """(row, reason key) for every scene / window of one decodable input; raises DecodeError."""
    frames_THWC, src_fps, _ = read_video(path)
    _, src_h, src_w, _ = frames_THWC.shape
    fps, span = src_fps / cfg.frame_stride, (cfg.clip_frames - 1) * cfg.frame_stride + 1
    common = dict(fps=fps, src_height=src_h, src_width=src_w)
    out: List[Tuple[Dict[str, Any], str]] = []
    pending: List[Tuple[Path, np.ndarray]] = []
    for scene_index, (s, e) in enumerate(detect_scenes(frames_THWC, src_fps, cfg.scene_threshold)):
        starts = window_starts(s, e, span, cfg.max_clips_per_scene)
        if not starts:
            out.append((_row(item, source_hash, caption, "rejected", f"scene too short: {e - s} < {span} frames",
                             start_frame=s, end_frame=e, scene_index=scene_index,
                             duration_s=(e - s) / src_fps, **common), "scene too short"))
        for start in starts:
            src_THWC = frames_THWC[start:start + span:cfg.frame_stride]
            report = assess(src_THWC, cfg)
            clip_THWC = center_crop_resize(src_THWC, cfg.height, cfg.width)
            cid = clip_id(clip_THWC, source_hash, start, start + span, cfg.frame_stride)
            failure = report.first_failure
            rel = "" if failure else f"clips/{cid}.mp4"
            if rel:
                pending.append((out_dir / rel, clip_THWC))
            out.append((_row(item, source_hash, caption, "rejected" if failure else "kept",
                             failure.reason if failure else "", clip_id=cid, start_frame=start,
                             end_frame=start + span, height=cfg.height, width=cfg.width,
                             num_frames=len(clip_THWC), duration_s=len(clip_THWC) / fps, scene_index=scene_index,
                             sharpness=report.sharpness, brightness=report.brightness, score=report.score,
                             bucket=f"{cfg.height}x{cfg.width}x{cfg.clip_frames}", path=rel, **common),
                        failure.key if failure else ""))
    try:
        for clip_path, clip_THWC in pending:
            write_clip(clip_path, clip_THWC, fps)
    except BaseException:
        for clip_path, _ in pending:
            clip_path.unlink(missing_ok=True)
        raise
    return out


def _curate_input(item: InputFile, cfg: CurateConfig, out_dir: Path, tmp: Path, seen: Dict[str, str],
                  progress: Callable[[str], None]) -> Tuple[str, List[Tuple[Dict[str, Any], str]]]:
    """(source_hash, rows with reason keys) of one input; never raises for a bad input."""
    source_hash, caption = "", cfg.default_caption
    try:
        path = fetch(item, tmp)
        source_hash = file_hash(path)
    except (OSError, ValueError) as e:
        return source_hash, [(_row(item, source_hash, caption, "failed", f"fetch failed: {e}"), "fetch failed")]
    try:
        caption = _caption(item, cfg, progress)
        if source_hash in seen:
            return source_hash, [(_row(item, source_hash, caption, "rejected",
                                       f"duplicate source (same bytes as {seen[source_hash]})"), "duplicate source")]
        rows = _curate_video(item, path, source_hash, caption, cfg, out_dir)
        seen[source_hash] = item.name
        return source_hash, rows
    except DecodeError as e:
        return source_hash, [(_row(item, source_hash, caption, "failed", str(e)), e.kind)]
    except Exception as e:  # one bad input must not stop the stage; the reason is kept in the manifest
        return source_hash, [(_row(item, source_hash, caption, "failed", f"error: {type(e).__name__}: {e}"), "error")]
    finally:
        if is_s3(item.uri):
            path.unlink(missing_ok=True)


def run_curation(cfg: CurateConfig, out_dir: Path, progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Curate ``cfg.input_uri`` into the ClipManifest folder ``out_dir`` (must be empty or absent); returns summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"run_curation: out_dir must be empty, {out_dir} is not")
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    items = list_inputs(cfg.input_uri)
    progress(f"curate: {len(items)} inputs under {cfg.input_uri}")
    rows: List[Dict[str, Any]] = []
    reasons: Dict[str, int] = {}
    outcome: Dict[str, str] = {}
    source_hashes: List[str] = []
    seen: Dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="curate-") as tmp:
        for i, item in enumerate(items, 1):
            source_hash, keyed = _curate_input(item, cfg, out_dir, Path(tmp), seen, progress)
            source_hashes.append(source_hash)
            statuses = [r["status"] for r, _ in keyed]
            outcome[item.uri] = "kept" if "kept" in statuses else "failed" if "failed" in statuses else "rejected"
            for r, key in keyed:
                rows.append(r)
                if key:
                    reasons[key] = reasons.get(key, 0) + 1
            detail = keyed[0][0]["reason"] if outcome[item.uri] == "failed" else \
                f"{statuses.count('kept')} kept, {statuses.count('rejected')} rejected"
            progress(f"[{i}/{len(items)}] {item.name}: {outcome[item.uri]} ({detail})")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out_dir / "manifest.parquet")
    counts = {s: list(outcome.values()).count(s) for s in ("kept", "rejected", "failed")}
    summary = {
        "inputs": len(items), **counts,
        "clips_kept": sum(r["status"] == "kept" for r in rows),
        "clips_rejected": sum(r["status"] == "rejected" for r in rows),
        "rows": len(rows),
        "reasons": dict(sorted(reasons.items())),
        "source_hashes": source_hashes,
        "input_status": outcome,
        "input_uri": str(cfg.input_uri),
        "config": to_dict(cfg),
        "content_hash": folder_hash(out_dir),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    progress(f"curate: {summary['clips_kept']} clips kept from {counts['kept']}/{len(items)} inputs "
             f"({counts['rejected']} rejected, {counts['failed']} failed); content_hash {summary['content_hash']}")
    return summary
