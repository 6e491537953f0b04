"""The whole curation stage in one process, without Flyte: plan shards, run each, merge.

``run_curation`` is what the Flyte DAG does with ``plan_curation -> map_task(curate_shard) -> curate`` (task.py),
in a loop: tests, the benchmark and local runs use it.

    summary = run_curation(CurateConfig(input_uri="data/demo"), Path("out"), store_dir=Path("store"))
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

from common.config import CurateConfig
from common.storage import list_inputs
from tasks.curate.merge import merge_shards
from tasks.curate.shard import plan_shards, run_shard


def run_curation(cfg: CurateConfig, out_dir: Path, progress: Callable[[str], None] = print,
                 store_dir: Path | None = None, shard_size: int | None = None) -> Dict[str, Any]:
    """Curate ``cfg.input_uri`` into the ClipManifest folder ``out_dir`` (must be empty or absent) in-process: plan
    shards, run each (``shard.run_shard``, results in the per-input store ``store_dir``; a temp dir when None) and
    merge (``merge.merge_shards``). Returns the summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"run_curation: out_dir must be empty, {out_dir} is not")
    items = list_inputs(cfg.input_uri)
    progress(f"curate: {len(items)} inputs under {cfg.input_uri}")
    with tempfile.TemporaryDirectory(prefix="curate-store-") as tmp_store:
        store = Path(store_dir) if store_dir else Path(tmp_store)
        results = [run_shard(shard, cfg, store, progress) for shard in plan_shards(items, shard_size or cfg.shard_size)]
        return merge_shards(results, cfg, store, out_dir, progress)
