"""Flyte adapter for the preference pairs: LatentDataset (+ a pair table, or none) -> PreferencePairs (logic in
``build.py``, ``auto.py``, ``encode.py`` and ``labels.py`` beside this file, no Flyte there).

    source_hash = pairs_source_hash(cfg=cfg.train.pairs)
    pairs = build_preference_pairs(cfg=cfg.train.pairs, data=latents, tracking_cfg=cfg.tracking,
                                   parent_run=run_id, source_hash=source_hash)

``pairs_source_hash`` is not cached: it fingerprints the table and its videos on every run, so editing the table
(same path) changes ``build_preference_pairs``'s inputs and with them its cache key, as curation's input snapshot
does. For ``source: auto`` it is "".
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from flytekit import task

from common import tracking
from common.config import PairsConfig, TrackingConfig, config_hash, to_dict
from common.hashing import code_version, sha256_json
from tasks.common import artifact_dir, folder_ref, fresh_dir, local_path, publish
from tasks.resources import defaults
from tasks.types import LatentDataset, PreferencePairs


@task(**defaults("orchestration"))
def pairs_source_hash(cfg: PairsConfig) -> str:
    """Fingerprint of the pair table (its bytes + the size of every video it names); "" for ``source: auto``."""
    from tasks.preference.labels import source_fingerprint

    with tempfile.TemporaryDirectory() as tmp:
        return source_fingerprint(cfg.source, cfg.dimensions, Path(tmp))


@task(cache=True, cache_version=code_version("tasks/preference", "tasks/curate", "models", "common"),
      cache_ignore_input_vars=("parent_run",), **defaults("preference_pairs"))
def build_preference_pairs(cfg: PairsConfig, data: LatentDataset, tracking_cfg: TrackingConfig, parent_run: str,
                           source_hash: str) -> PreferencePairs:
    """Preference pairs in the dataset's latent space: from a human pair table, or automatic (corrupted held-in
    clips) when ``cfg.source`` is "auto"."""
    from tasks.preference.build import run_pairs
    from tasks.preference.labels import source_fingerprint

    with tempfile.TemporaryDirectory() as tmp:
        current = source_fingerprint(cfg.source, cfg.dimensions, Path(tmp))
    if current != source_hash:
        print(f"[preference_pairs] the pair table changed since pairs_source_hash ({source_hash} -> {current}); "
              "building from its current content", flush=True)
    out = artifact_dir(tracking_cfg, "pairs", sha256_json([config_hash(cfg), data.content_hash, current], n=16))
    with tracking.child_run(tracking_cfg.root, parent_run, "preference_pairs") as _:
        import mlflow

        tracking.log_config("pairs", to_dict(cfg))
        tmp_out = fresh_dir(out)
        meta = run_pairs(cfg, local_path(data.folder), tmp_out, work_dir=tmp_out.parent,
                         progress=lambda m: print(f"[preference_pairs] {m}", flush=True))
        publish(tmp_out, out)
        summary = meta["pairs"]
        mlflow.log_metrics({"rows": summary["rows"], "pairs": summary["pairs"], "dropped": summary["dropped"],
                            **{f"dropped.{re.sub(r'[^0-9A-Za-z_]+', '_', k)}": n
                               for k, n in summary["reasons"].items()}})
        mlflow.set_tags({"pairs.labels": summary["labels"], "lineage.content_hash": meta["content_hash"],
                         "lineage.data_hash": data.content_hash, "lineage.source_hash": current})
        mlflow.log_text(json.dumps(summary, indent=1, default=str), "preference_pairs_summary.json")
    return PreferencePairs(folder=folder_ref(out), content_hash=meta["content_hash"],
                           data_hash=data.content_hash, num_pairs=summary["pairs"], labels=summary["labels"],
                           dropped=summary["dropped"], config=cfg, source_hash=current)
