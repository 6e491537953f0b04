"""Shards of the input listing, and the curation of one shard into the per-input result store.

``plan_shards`` cuts the input listing into shards of ``shard_size`` inputs (listing order), so each shard is one
Flyte map_task element, retried and cached on its own. ``run_shard`` processes a shard's inputs one by one into the
per-input result store (``store.py``): an input whose entry is already stored is reused, not decoded again, so
re-running after adding videos processes only the new ones. Only content failures become rows (``curate_input``); an
unreachable store or any other transient error fails the shard with nothing recorded, so a rerun processes the
inputs again.

    results = [run_shard(shard, cfg, store) for shard in plan_shards(list_inputs(cfg.input_uri), cfg.shard_size)]
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List

from common.config import CurateConfig
from common.hashing import sha256_file
from common.storage import InputFile, fetch, is_s3
from tasks.curate.curate import Models, curate_input, read_sidecar
from tasks.curate.manifest import manifest_row
from tasks.curate.store import add_entry, entry_key, has_entry


def plan_shards(items: List[InputFile], shard_size: int) -> List[List[InputFile]]:
    if shard_size < 1:
        raise ValueError(f"curate.shard_size must be >= 1, got {shard_size}")
    return [items[i:i + shard_size] for i in range(0, len(items), shard_size)]


def _curate_into(item: InputFile, cfg: CurateConfig, models: Models, path: Path, source_hash: str,
                 sidecar: str | None, folder: Path) -> List[Any]:
    """``curate_input`` writing into the store's temporary entry ``folder``."""
    return curate_input(item, cfg, models, folder, path, source_hash, sidecar)


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
            try:   # an unreachable store (OSError) is transient: it fails the shard, nothing is recorded
                path = fetch(item, tmp)
                source_hash = sha256_file(path, n=16)
            except ValueError as e:   # the input itself cannot be fetched safely (e.g. a name leaving the folder)
                row = manifest_row("", "", "failed", f"fetch refused: {e}")
                entries.append({**base, "source_hash": "", "key": "", "rows": [[row, "fetch refused"]]})
                processed += 1
                progress(f"{item.name}: failed (fetch refused: {e})")
                continue
            try:
                sidecar = read_sidecar(item, progress)
                key = entry_key(source_hash, cfg, sidecar)
                if has_entry(store, key):
                    reused += 1
                    progress(f"{item.name}: reused stored result {key}")
                else:
                    keyed = add_entry(store, key, source_hash, functools.partial(
                        _curate_into, item, cfg, models, path, source_hash, sidecar))
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
