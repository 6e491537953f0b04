"""Flyte adapter for curation: plan shards -> map_task over shards -> merge (logic in the modules beside, no Flyte
there).

    snapshot_inputs -> plan_curation -> map_task(curate_shard) -> curate (merge + report + MLflow child run "curate")

Each shard is its own cached, retried task execution; its inputs go through the content-addressed per-input store
(``store.py``), so a shard re-run after new videos were added (the listing, hence the shards, changed) decodes only
the new inputs. MLflow logging happens only in the merge task (one child run for the whole curation).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from flytekit import Deck, map_task, task

from common import tracking
from common.config import CurateConfig, TrackingConfig, config_hash, to_dict
from common.hashing import module_code_version, sha256_json
from tasks.common import artifact_dir, folder_ref, fresh_dir, mirror, publish
from tasks.resources import defaults
from tasks.types import ClipManifest


@dataclass
class CurateShard:
    """One map_task element: inputs (uri, name, size, sidecar uri), the config and the result store folder."""
    index: int
    uris: List[str]
    names: List[str]
    sizes: List[int]
    captions: List[str]
    store: str
    cfg: CurateConfig = field(default_factory=CurateConfig)
    caption_hashes: List[str] = field(default_factory=list)   # sidecar contents: editing a caption reruns the shard


@dataclass
class ShardResult:
    index: int
    result_json: str     # shard.run_shard's dict as JSON (entries, processed, reused)
    store: str


def store_dir(cfg: CurateConfig, tracking_cfg: TrackingConfig) -> str:
    return cfg.store_uri or str(artifact_dir(tracking_cfg, "curate", "store"))


def _caption_hash(caption_uri: str) -> str:
    """sha256 of a sidecar caption's text ("" when the input has none)."""
    from common.storage import read_text

    return sha256_json(read_text(caption_uri), n=16) if caption_uri else ""


@task(**defaults("orchestration"))
def snapshot_inputs(cfg: CurateConfig) -> str:
    """Fingerprint of the raw inputs (names, sizes and the sidecar captions' contents): curation's cache key changes
    when videos are added or a caption is edited."""
    from common.storage import list_inputs

    items = list_inputs(cfg.input_uri)
    return sha256_json([sorted(repr(i) for i in items), sorted(_caption_hash(i.caption_uri) for i in items)], n=16)


@task(**defaults("orchestration"))
def plan_curation(cfg: CurateConfig, inputs_fingerprint: str, tracking_cfg: TrackingConfig) -> List[CurateShard]:
    """List the inputs and cut them into shards of ``cfg.shard_size`` (``inputs_fingerprint`` orders it after the
    snapshot)."""
    from common.storage import list_inputs
    from tasks.curate.shard import plan_shards

    store = store_dir(cfg, tracking_cfg)
    return [CurateShard(index=i, uris=[x.uri for x in s], names=[x.name for x in s], sizes=[x.size for x in s],
                        captions=[x.caption_uri for x in s], store=store, cfg=cfg,
                        caption_hashes=[_caption_hash(x.caption_uri) for x in s])
            for i, s in enumerate(plan_shards(list_inputs(cfg.input_uri), cfg.shard_size))]


@task(cache=True, cache_version=module_code_version("tasks.curate.task"), retries=2,
      **defaults("curate_shard"))
def curate_shard(shard: CurateShard) -> ShardResult:
    """Decode, split, filter, caption one shard's inputs into the per-input store (reusing stored results)."""
    from common.storage import InputFile
    from tasks.curate.shard import run_shard

    items = [InputFile(u, s, n, c) for u, n, s, c in zip(shard.uris, shard.names, shard.sizes, shard.captions)]
    result = run_shard(items, shard.cfg, Path(shard.store),
                       progress=lambda m: print(f"[curate] shard {shard.index}: {m}", flush=True))
    return ShardResult(index=shard.index, result_json=json.dumps(result), store=shard.store)


curate_shards = map_task(curate_shard)


@task(cache=True, cache_version=module_code_version("tasks.curate.task"), cache_ignore_input_vars=("parent_run",),
      enable_deck=True, **defaults("curate_merge"))
def curate(cfg: CurateConfig, shards: List[ShardResult], tracking_cfg: TrackingConfig, parent_run: str) -> ClipManifest:
    """Merge the shards (source and near-duplicate checks, accounting), report (Deck + MLflow) -> ClipManifest."""
    from tasks.curate.merge import merge_shards
    from tasks.curate.report import write_report

    results = [json.loads(s.result_json) for s in sorted(shards, key=lambda s: s.index)]
    key = sha256_json([config_hash(cfg), [s.result_json for s in sorted(shards, key=lambda s: s.index)]], n=16)
    out = artifact_dir(tracking_cfg, "curate", key)
    store = Path(shards[0].store) if shards else Path(store_dir(cfg, tracking_cfg))
    with tracking.child_run(tracking_cfg.root, parent_run, "curate") as _:
        import mlflow

        tracking.log_config("curate", to_dict(cfg))
        tmp = fresh_dir(out)
        summary = merge_shards(results, cfg, store, tmp, progress=lambda m: print(f"[curate] {m}", flush=True))
        publish(tmp, out)
        mirror(tracking_cfg, out)   # clips + manifest to tracking.artifact_uri, when set
        report_dir = out.with_name(out.name + "-report")
        page = write_report(out, report_dir)
        Deck("curation", page)
        mlflow.log_metrics({k: float(summary[k]) for k in ("inputs", "kept", "rejected", "failed", "clips_kept",
                                                           "clips_rejected", "images_kept", "keyframes_kept",
                                                           "processed", "reused", "shards")})
        mlflow.log_metrics({"reason." + re.sub(r"[^0-9A-Za-z_.\-/ ]", "_", k).replace(" ", "_"): float(v)
                            for k, v in summary["reasons"].items()})
        import pandas as pd

        tracking.log_dataset(pd.DataFrame({"uri": [e["uri"] for r in results for e in r["entries"]],
                                           "source_hash": [e["source_hash"] for r in results for e in r["entries"]]}),
                             source=str(cfg.input_uri), name="raw-inputs",
                             digest=sha256_json(summary["source_hashes"]), context="curation")
        mlflow.log_artifact(str(out / "manifest.parquet"), "manifest")
        mlflow.log_artifact(str(out / "summary.json"), "manifest")
        for name in ("report.html", "histograms.png", "contact_sheet.png"):
            mlflow.log_artifact(str(report_dir / name), "report")
        mlflow.set_tags({"lineage.content_hash": summary["content_hash"],
                         "aesthetic.model": str(summary["aesthetic_model"]),
                         "aesthetic.random_model": str(summary["aesthetic_random"]),
                         "caption.sources": json.dumps(summary["caption_sources"])})
        mlflow.log_text(json.dumps({"source_hashes": summary["source_hashes"]}, indent=1), "lineage.json")
    return ClipManifest(folder=folder_ref(out), content_hash=summary["content_hash"],
                        source_hashes=list(summary["source_hashes"]), inputs=int(summary["inputs"]),
                        kept=int(summary["kept"]), rejected=int(summary["rejected"]), failed=int(summary["failed"]),
                        config=cfg, processed=int(summary["processed"]), reused=int(summary["reused"]))
