"""Merge shard results into one ClipManifest folder (docs/artifacts.md): cross-input checks and accounting.

In listing order (shards keep it): an input whose bytes equal an earlier input's is "rejected" ("duplicate source
(same bytes as <name>)"); the others' stored rows get their ``source_uri``. Then kept clips are compared by
perceptual hash across the whole run (``dedup.find_duplicates``, first kept wins; clips among clips, images and key
frames among images) and later near-duplicates become "rejected" ("near-duplicate of <clip_id> (distance d)"); a key
frame whose clip is rejected there goes with it ("parent clip <id> rejected"). Kept clips are copied from the store
to ``clips/``, kept images and key frames to ``images/``, the thumbnail of every candidate to ``thumbs/`` (for the
report's contact sheet).

Accounting (summary.json), input level: every input gets exactly one outcome,
  "kept"     = inputs with >= 1 kept clip,
  "rejected" = inputs that decoded but gave no kept clip,
  "failed"   = inputs that could not be fetched, decoded or processed,
so inputs == kept + rejected + failed == number of distinct manifest source_uri values. Row level:
  rows == clips_kept + clips_rejected + failed, and sum(reasons.values()) == clips_rejected + failed (a "clip" row
  here is any sample row: clips, images and key frames; images_kept and keyframes_kept count the latter two).
summary.json also has processed / reused (inputs decoded in this run / taken from the store), shards,
aesthetic_model and aesthetic_random (whether the aesthetic scores come from a randomly initialised model),
caption_sources ({source: clips}), input_status, source_hashes, config and content_hash.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from common.config import CurateConfig, to_dict
from tasks.curate.dedup import find_duplicates
from tasks.curate.manifest import MANIFEST, SCHEMA, SUMMARY, content_hash, manifest_row
from tasks.curate.store import load_entry

IMAGE_KINDS = ("image", "keyframe")


def merge_shards(results: List[Dict[str, Any]], cfg: CurateConfig, store: Path, out_dir: Path,
                 progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write the ClipManifest folder ``out_dir`` (must be empty or absent) from ``run_shard`` results; returns the
    summary."""
    store, out_dir = Path(store), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"merge: out_dir must be empty, {out_dir} is not")
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    entries: List[Dict[str, Any]] = [e for r in results for e in r["entries"]]
    keyed: List[List[Any]] = []          # [row, reason key, entry key]
    seen: Dict[str, str] = {}
    for e in entries:
        entry_rows: List[List[Any]]
        if e["key"] and e["source_hash"] in seen:
            earlier = seen[e["source_hash"]]
            reason = f"duplicate source (same bytes as {earlier})"
            entry_rows = [[manifest_row(e["source_hash"], "", "rejected", reason), "duplicate source"]]
        else:
            entry_rows = load_entry(store, e["key"])["rows"] if e["key"] else e["rows"]
            if e["key"]:
                seen[e["source_hash"]] = e["name"]
        for row, key in entry_rows:
            keyed.append([{**row, "source_uri": e["uri"]}, key, e["key"]])
    dups: Dict[str, Any] = {}
    for images in (False, True):   # clips among clips, images (files and key frames) among images
        dups.update(find_duplicates([(r["clip_id"], r["phash"]) for r, _, _ in keyed if r["status"] == "kept"
                                     and (r.get("kind") in IMAGE_KINDS) == images], cfg.dedup_max_distance))
    for item in keyed:
        row, _, key = item
        if row["clip_id"] in dups and row["status"] == "kept":
            first, dist = dups[row["clip_id"]]
            row.update(status="rejected", reason=f"near-duplicate of {first} (distance {dist:.1f})", path="",
                       variants="")
            item[1] = "near-duplicate"
    kept_clips = {r["clip_id"] for r, _, _ in keyed if r["status"] == "kept" and r.get("kind") == "clip"}
    for item in keyed:   # a key frame follows its clip: a clip rejected here takes its key frames with it
        row, key = item[0], item[2]
        if row.get("kind") == "keyframe" and row["status"] == "kept" and row["parent_clip"] not in kept_clips:
            row.update(status="rejected", reason=f"parent clip {row['parent_clip']} rejected", path="", variants="")
            item[1] = "parent clip rejected"
        if row["clip_id"] and key:
            thumb = store / key / "thumbs" / f"{row['clip_id']}.png"
            if thumb.is_file():
                shutil.copyfile(thumb, out_dir / "thumbs" / thumb.name)
        if row["status"] == "kept":
            shutil.copyfile(store / key / row["path"], out_dir / row["path"])
    rows = [r for r, _, _ in keyed]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out_dir / MANIFEST)
    outcome: Dict[str, str] = {}
    reasons: Dict[str, int] = {}
    for row, key, _ in keyed:
        statuses = outcome.get(row["source_uri"])
        s = row["status"]
        outcome[row["source_uri"]] = "kept" if "kept" in (s, statuses) else \
            "failed" if "failed" in (s, statuses) else "rejected"
        if key:
            reasons[key] = reasons.get(key, 0) + 1
    counts = {s: list(outcome.values()).count(s) for s in ("kept", "rejected", "failed")}
    scored = sorted({r["scored_by"] for r in rows if r["scored_by"]})
    caption_sources: Dict[str, int] = {}
    for r in rows:
        if r["status"] == "kept":
            caption_sources[r["caption_source"]] = caption_sources.get(r["caption_source"], 0) + 1
    summary = {
        "inputs": len(entries), **counts,
        "clips_kept": sum(r["status"] == "kept" for r in rows),
        "images_kept": sum(r["status"] == "kept" and r.get("kind") == "image" for r in rows),
        "keyframes_kept": sum(r["status"] == "kept" and r.get("kind") == "keyframe" for r in rows),
        "clips_rejected": sum(r["status"] == "rejected" for r in rows),
        "rows": len(rows),
        "reasons": dict(sorted(reasons.items())),
        "processed": sum(int(r["processed"]) for r in results),
        "reused": sum(int(r["reused"]) for r in results),
        "shards": len(results),
        "aesthetic_model": scored[0] if len(scored) == 1 else scored,
        "aesthetic_random": not (cfg.aesthetic.pretrained and cfg.aesthetic.head),
        "caption_sources": dict(sorted(caption_sources.items())),
        "source_hashes": [e["source_hash"] for e in entries],
        "input_status": {e["uri"]: outcome[e["uri"]] for e in entries},
        "input_uri": str(cfg.input_uri),
        "config": to_dict(cfg),
        "content_hash": content_hash(out_dir),
    }
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for i, e in enumerate(entries, 1):
        progress(f"[{i}/{len(entries)}] {e['name']}: {outcome[e['uri']]}")
    progress(f"curate: {summary['clips_kept']} clips kept from {counts['kept']}/{len(entries)} inputs "
             f"({counts['rejected']} rejected, {counts['failed']} failed; {summary['processed']} processed, "
             f"{summary['reused']} reused); content_hash {summary['content_hash']}")
    return summary
