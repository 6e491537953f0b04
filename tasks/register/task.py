"""Flyte adapter for registration: Checkpoint + EvalReport -> ModelVersion.

Registers the checkpoint's EMA weights with alias ``register.alias`` (candidate), applies the champion gate
(``gate.decide`` on the report's candidate and champion metrics, same suite) and moves the champion alias when it
passes (``promote.promote``; the first model becomes champion), and records the version's lineage
(``common.lineage``: execution, config, git commit, code versions, every stage's checkpoint, the latents, the
manifest and the raw inputs). The decision and its reasons go to the version's tags, the MLflow run and a Deck.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Optional

from flytekit import Deck, task

from common import tracking
from common.config import PipelineConfig, RegisterConfig, TrackingConfig, config_hash, to_dict
from common.hashing import module_code_version, sha256_json
from tasks.common import local_path
from tasks.resources import defaults
from tasks.types import Checkpoint, ClipManifest, EvalReport, LatentDataset, ModelVersion


@task(cache=True, cache_version=module_code_version("tasks.register.task"),
      cache_ignore_input_vars=("parent_run",), enable_deck=True, **defaults("register"))
def register(config: PipelineConfig, manifest: ClipManifest, data: LatentDataset, checkpoint: Checkpoint,
             report: EvalReport, parent_run: str, stages: Optional[List[Checkpoint]] = None) -> ModelVersion:
    """Register the checkpoint's EMA weights under config.register.model_name with alias config.register.alias, gate
    it against the champion, record its lineage; tags = lineage, metrics, the suite hash and the gate's decision.
    ``stages``: every training stage's checkpoint, in order (for the lineage; default: just ``checkpoint``)."""
    from tasks.evaluate.task import final_step_dir
    from tasks.register.registry import METRICS_TAG, SUITE_TAG, register_checkpoint

    cfg, tracking_cfg = config.register, config.tracking
    tags = {
        "config_hash": config_hash(config),
        "stage_config_hash": checkpoint.config_hash,
        "checkpoint_hash": checkpoint.content_hash,
        "checkpoint_stage": checkpoint.stage,
        "checkpoint_step": str(checkpoint.step),
        "data.latents_hash": data.content_hash,
        "data.manifest_hash": manifest.content_hash,
        "data.sources_hash": sha256_json([sorted(manifest.source_hashes)], n=16),
        "data.num_sources": str(len(manifest.source_hashes)),
        "vae_identity": data.vae_identity,
        "text_encoder_identity": data.text_encoder_identity,
        **{f"eval.{k}": f"{v:.6g}" for k, v in report.metrics.items()},
        SUITE_TAG: report.suite_hash,
        METRICS_TAG: json.dumps(report.metrics, sort_keys=True),
        "eval.champion_version": report.champion_version,   # the champion it was compared with ("" = none)
    }
    with tracking.child_run(tracking_cfg.root, parent_run, "register",
                            tags={"lineage.checkpoint_hash": checkpoint.content_hash}) as run_id, \
            tempfile.TemporaryDirectory() as download:
        step_dir = final_step_dir(checkpoint, Path(download))   # weights, EMA and meta.json only
        version, uri = register_checkpoint(cfg.model_name, cfg.alias, config.train.dit, step_dir,
                                           local_path(data.folder), tags, champion_alias=cfg.champion_alias,
                                           eval_dir=local_path(report.folder))
        print(f"[register] {uri} -> version {version}", flush=True)
        decision = _gate(config, report, version)
        import mlflow

        from common.lineage import log_lineage

        mlflow.set_tags({"gate.promoted": str(decision.promote), "gate.decision": decision.summary[:5000]})
        mlflow.log_dict({"promote": decision.promote, "reasons": decision.reasons}, "gate.json")
        log_lineage(_lineage(config, manifest, data, stages or [checkpoint], version, parent_run))
    return ModelVersion(name=cfg.model_name, version=version, alias=cfg.alias,
                        checkpoint_hash=checkpoint.content_hash, mlflow_run_id=run_id)


@task(**defaults("orchestration"))
def current_champion(register: RegisterConfig, tracking_cfg: TrackingConfig, candidate: Checkpoint) -> str:
    """The version holding ``register.champion_alias`` now, an input of the cached evaluate task so that a moved
    champion is a new cache key; "" before the first champion, and "" when the champion IS ``candidate`` (the same
    checkpoint, e.g. an identical rerun right after it was promoted: nothing to compare, the earlier report stands).
    Never cached."""
    from tasks.register.promote import current_champion as lookup
    from tasks.register.promote import registry_client

    client = registry_client(tracking_cfg.root)
    version = lookup(client, register.model_name, register.champion_alias) or ""
    if version and client.get_model_version(register.model_name, version).tags.get(
            "checkpoint_hash") == candidate.content_hash:
        return ""
    return version


def _gate(config: PipelineConfig, report: EvalReport, version: str):
    """Decide and apply: the champion alias moves to ``version`` when the gate passes; tags say why either way."""
    import html

    from tasks.register.gate import GateDecision, decide
    from tasks.register.promote import promote, registry_client

    cfg = config.register
    client = registry_client(config.tracking.root)
    if cfg.gate.enabled:
        decision = decide(report.metrics, report.champion_metrics, report.directions, cfg.gate,
                          has_champion=bool(report.champion_version))
    else:
        decision = GateDecision(False, ["gate disabled (register.gate.enabled: false): promote by hand"])
    if decision.promote:
        promote(client, cfg.model_name, version, decision.summary[:5000], cfg.champion_alias)
    else:
        client.set_model_version_tag(cfg.model_name, version, "gate.decision", decision.summary[:5000])
    client.set_model_version_tag(cfg.model_name, version, "gate.promoted", str(decision.promote))
    verdict = f"version {version} {'is now' if decision.promote else 'stays a candidate; not'} {cfg.champion_alias}"
    print(f"[register] gate: {verdict} (compared with version {report.champion_version or 'none'})", flush=True)
    for reason in decision.reasons:
        print(f"[register]   {reason}", flush=True)
    Deck("gate", f"<h3>{html.escape(verdict)}</h3><ul>" + "".join(f"<li>{html.escape(r)}</li>"
                                                                 for r in decision.reasons) + "</ul>")
    return decision


def _lineage(config: PipelineConfig, manifest: ClipManifest, data: LatentDataset, stages: List[Checkpoint],
             version: str, parent_run: str) -> dict:
    """The lineage document of this version (common.lineage.build_lineage)."""
    import pandas as pd

    from common.lineage import build_lineage
    from tasks.lifecycle import execution_name

    man_dir = local_path(manifest.folder)
    if (man_dir / "summary.json").is_file() and (man_dir / "manifest.parquet").is_file():
        summary = json.loads((man_dir / "summary.json").read_text())
        rows = pd.read_parquet(man_dir / "manifest.parquet", columns=["source_uri", "status"])
        kept = rows[rows.status == "kept"].groupby("source_uri").size().to_dict()
        sources = [{"uri": uri, "hash": h, "status": summary["input_status"][uri], "clips": int(kept.get(uri, 0))}
                   for uri, h in zip(summary["input_status"], summary["source_hashes"])]
    else:   # a manifest folder without its summary (hand-made): the hashes the artifact carries, URIs unknown
        print(f"[register] {man_dir} has no summary.json/manifest.parquet: lineage lists source hashes only",
              flush=True)
        sources = [{"uri": "", "hash": h, "status": "unknown", "clips": 0} for h in manifest.source_hashes]
    modules = {"curate": "tasks.curate.task", "compress": "tasks.compress.task", "train": "tasks.train.task",
               "evaluate": "tasks.evaluate.task", "register": "tasks.register.task"}
    return build_lineage(
        model={"name": config.register.model_name, "version": version},
        execution={"flyte_execution": execution_name(), "parent_run": parent_run, "config_name": config.name,
                   "config_hash": config_hash(config), "config": to_dict(config),
                   "git_commit": tracking.git_source().get("mlflow.source.git.commit", ""),
                   "code_versions": {k: module_code_version(m) for k, m in modules.items()}},
        checkpoints=[{"stage": c.stage, "step": c.step, "content_hash": c.content_hash, "config_hash": c.config_hash,
                      "data_hash": c.data_hash, "parent_hash": c.parent_hash, "mlflow_run_id": c.mlflow_run_id,
                      "folder": str(c.folder.path)} for c in stages],
        latents={"content_hash": data.content_hash, "manifest_hash": data.manifest_hash,
                 "vae_identity": data.vae_identity, "text_encoder_identity": data.text_encoder_identity,
                 "num_train": data.num_train, "num_val": data.num_val, "folder": str(data.folder.path)},
        manifest={"content_hash": manifest.content_hash, "folder": str(man_dir), "inputs": manifest.inputs,
                  "kept": manifest.kept, "rejected": manifest.rejected, "failed": manifest.failed},
        sources=sources)
