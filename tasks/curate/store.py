"""The per-input result store of curation: content-addressed entries, so a rerun decodes only new inputs.

The result of one input lives under ``<store>/<key>/``: ``result.json`` (its manifest rows with their reason keys,
and its source hash), ``clips/*.mp4`` (kept clips) and ``thumbs/*.png`` (one thumbnail per candidate clip), where

    key = sha256(source bytes hash, processing-config hash, curation code version, sidecar caption)[:24]

An input whose key is present is reused, not decoded again; a config change that affects processing, or an edit of
a curation source file, gives every input a new key. Settings that act only at merge time (``MERGE_ONLY_KEYS``:
dedup, input location, sharding) are left out of the key. Entries are written into a temporary folder of the store
and renamed when complete, so a killed worker leaves no half entry.

    key = entry_key(source_hash, cfg, sidecar)
    if not has_entry(store, key):
        add_entry(store, key, source_hash, lambda folder: curate_input(item, cfg, models, folder, path, ...))
    rows = load_entry(store, key)["rows"]
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

from common.config import CurateConfig, to_dict
from common.hashing import code_version, sha256_json

RESULT = "result.json"
MERGE_ONLY_KEYS = ("input_uri", "shard_size", "store_uri", "dedup_max_distance")
# settings that change how an input is processed, not its result: the frames buffered for one-pass curation (which
# windows are curated in the first pass; it changes the caption batches' composition as caption.batch_size does).
# Not the decoder: PyAV and decord give the same frames and times on MP4 (tests/test_curate_stream.py), but decord's
# frames were seen shifted on an MPEG-TS file
SAME_RESULT_KEYS = ("buffer_mb",)
# what does not change a stored result: the Flyte adapter, the report, the synthetic-video generator
NOT_CURATION_CODE = ("tasks/curate/task.py", "tasks/curate/report.py", "tasks/curate/synthetic.py")


def curation_code_version() -> str:
    """Version (12 hex digits) of the curation code: tasks/curate/*.py except ``NOT_CURATION_CODE``."""
    return code_version("tasks/curate", exclude=NOT_CURATION_CODE)


def processing_hash(cfg: CurateConfig) -> str:
    """sha256[:16] of the settings that change an input's result (all of ``cfg`` but ``MERGE_ONLY_KEYS``,
    ``SAME_RESULT_KEYS`` and the caption batch size, which changes how many clips one generate call captions, not
    the captions)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in MERGE_ONLY_KEYS + SAME_RESULT_KEYS}
    d["caption"] = {k: v for k, v in d["caption"].items() if k != "batch_size"}
    return sha256_json(d, n=16)


def entry_key(source_hash: str, cfg: CurateConfig, sidecar: str | None) -> str:
    return sha256_json([source_hash, processing_hash(cfg), curation_code_version(), sidecar], n=24)


def has_entry(store: Path, key: str) -> bool:
    return (Path(store) / key / RESULT).is_file()


def load_entry(store: Path, key: str) -> Dict[str, Any]:
    """{"rows": [[row, reason key], ...], "source_hash": ...} of the entry ``key``."""
    return json.loads((Path(store) / key / RESULT).read_text())


def add_entry(store: Path, key: str, source_hash: str, fill: Callable[[Path], List[Any]]) -> List[Any]:
    """Create the entry ``key``: ``fill(folder)`` writes clips/ and thumbs/ into a temporary folder of the store and
    returns the rows with their reason keys; they go to result.json and the folder is renamed to ``<store>/<key>``
    (when another worker finished the same key first, its entry is kept). Returns the rows."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=store))
    try:
        rows = fill(work)
        (work / RESULT).write_text(json.dumps({"rows": rows, "source_hash": source_hash}, allow_nan=True))
        if not (store / key).exists():
            os.replace(work, store / key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows
