"""Shards and the content-addressed per-input result store (incremental curation).

``plan_shards`` cuts the input listing into shards of ``shard_size`` inputs (listing order), so each shard is one
Flyte map_task element, retried and cached on its own. ``run_shard`` processes a shard's inputs one by one; the
result of an input is stored under ``<store>/<key>/`` where

    key = sha256(source bytes hash, processing-config hash, curation code version, sidecar caption)[:24]

(``result.json`` with the rows, ``clips/*.mp4`` kept clips, ``thumbs/*.png`` one thumbnail per candidate clip).
Entries are written to a temp folder and renamed, so a killed shard leaves no half entry. An input whose key is
already present is *reused*, not decoded again: re-running after adding videos processes only the new ones (and a
config change that affects processing re-processes everything). Settings that only act at merge time (dedup, input
location, sharding) are left out of the key. Inputs that cannot even be fetched get a failed row and no entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

from common.config import CurateConfig, to_dict
from common.storage import InputFile, fetch, is_s3
from tasks.curate.curate import Models, _row, curate_input, file_hash, read_sidecar

MERGE_ONLY_KEYS = ("input_uri", "shard_size", "store_uri", "dedup_max_distance")
_HERE = Path(__file__).resolve().parent


def plan_shards(items: List[InputFile], shard_size: int) -> List[List[InputFile]]:
    if shard_size < 1:
        raise ValueError(f"curate.shard_size must be >= 1, got {shard_size}")
    return [items[i:i + shard_size] for i in range(0, len(items), shard_size)]


def code_version() -> str:
    """sha256[:12] of the curation code (tasks/curate/*.py except the Flyte adapter and reporting)."""
    h = hashlib.sha256()
    for p in sorted(_HERE.glob("*.py")):
        if p.name not in ("task.py", "report.py", "synthetic.py"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def processing_hash(cfg: CurateConfig) -> str:
    d = {k: v for k, v in to_dict(cfg).items() if k not in MERGE_ONLY_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def entry_key(source_hash: str, cfg: CurateConfig, sidecar: str | None) -> str:
    blob = json.dumps([source_hash, processing_hash(cfg), code_version(), sidecar], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def load_entry(store: Path, key: str) -> Dict[str, Any]:
    return json.loads((Path(store) / key / "result.json").read_text())


def run_shard(items: List[InputFile], cfg: CurateConfig, store: Path,
              progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Process (or reuse) every input of one shard. Returns {"entries": [...], "processed": n, "reused": m} with one
    entry per input: {"uri", "name", "source_hash", "key" ("" when not stored), "rows" (only when not stored)}."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    models = Models(cfg)
    entries: List[Dict[str, Any]] = []
    processed = reused = 0
    with tempfile.TemporaryDirectory(prefix="curate-fetch-") as tmp:
        for item in items:
            base = {"uri": item.uri, "name": item.name}
            try:
                path = fetch(item, tmp)
                source_hash = file_hash(path)
            except (OSError, ValueError) as e:
                row = _row("", "", "failed", f"fetch failed: {e}")
                entries.append({**base, "source_hash": "", "key": "", "rows": [[row, "fetch failed"]]})
                processed += 1
                progress(f"{item.name}: failed (fetch failed: {e})")
                continue
            try:
                sidecar = read_sidecar(item, progress)
                key = entry_key(source_hash, cfg, sidecar)
                if (store / key / "result.json").is_file():
                    reused += 1
                    progress(f"{item.name}: reused stored result {key}")
                else:
                    work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=store))
                    try:
                        keyed = curate_input(item, cfg, models, work, path, source_hash, sidecar)
                        (work / "result.json").write_text(json.dumps({"rows": keyed, "source_hash": source_hash},
                                                                     allow_nan=True))
                        if (store / key).exists():   # another worker finished it first
                            shutil.rmtree(work)
                        else:
                            os.replace(work, store / key)
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    processed += 1
                    statuses = [r["status"] for r, _ in keyed]
                    detail = keyed[0][0]["reason"] if "failed" in statuses else \
                        f"{statuses.count('kept')} kept, {statuses.count('rejected')} rejected"
                    progress(f"{item.name}: processed ({detail})")
                entries.append({**base, "source_hash": source_hash, "key": key})
            finally:
                if is_s3(item.uri):
                    path.unlink(missing_ok=True)
    return {"entries": entries, "processed": processed, "reused": reused}
