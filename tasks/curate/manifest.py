"""The ClipManifest vocabulary (docs/artifacts.md): the manifest.parquet schema, the row builder and the folder's
content hash. Every curation module that writes or reads manifest rows takes them from here.

    from tasks.curate.manifest import MANIFEST, SCHEMA, content_hash, manifest_row
    row = manifest_row(source_hash, "a video", "rejected", "sharpness 12.3 < 200", clip_id=cid, start_frame=0)
    pq.write_table(pa.Table.from_pylist([{**row, "source_uri": uri}], schema=SCHEMA), out_dir / MANIFEST)
    content_hash(out_dir)   # sha256[:16] over (relative path, sha256 of bytes) of every file but summary.json
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pyarrow as pa

from common.hashing import sha256_dir

MANIFEST, SUMMARY = "manifest.parquet", "summary.json"
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
    # the curriculum (issue 12): "clip" | "image" (an image file) | "keyframe" (a frame of the kept clip
    # parent_clip); variants: JSON [[resolution, H, W, frames], ...], what compress encodes of a kept row
    ("kind", pa.string()), ("parent_clip", pa.string()), ("variants", pa.string()),
])
NAN = float("nan")


def manifest_row(source_hash: str, caption: str, status: str, reason: str, **clip: Any) -> Dict[str, Any]:
    """A manifest row without ``source_uri`` (added at merge: stored results are shared by identical bytes); the
    columns not given in ``clip`` are null, NaN or "" (a failed input has no clip)."""
    row: Dict[str, Any] = {f.name: None for f in SCHEMA if f.name != "source_uri"}
    row.update(clip_id="", source_hash=source_hash, status=status, reason=reason, fps=NAN, duration_s=NAN,
               sharpness=NAN, brightness=NAN, score=NAN, caption=caption, bucket="", path="", start_s=NAN, end_s=NAN,
               motion=NAN, text_area=NAN, aesthetic=NAN, phash="", caption_source="", scored_by="", kind="",
               parent_clip="", variants="")
    row.update(clip)
    return row


def content_hash(folder: str | Path) -> str:
    """The ClipManifest folder's content hash: every file but summary.json (which records the hash itself)."""
    return sha256_dir(folder, n=16, exclude=(SUMMARY,))
