"""Flyte adapter for registration: Checkpoint + EvalReport -> ModelVersion (alias from config, e.g. candidate; the
first version of a model also becomes the champion until a gate exists)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flytekit import task

from common import tracking
from common.config import PipelineConfig, config_hash
from common.hashing import module_code_version, sha256_json
from containers.images import cpu_image
from tasks.common import local_path
from tasks.types import Checkpoint, ClipManifest, EvalReport, LatentDataset, ModelVersion


@task(cache=True, cache_version=module_code_version("tasks.register.task"),
      cache_ignore_input_vars=("parent_run",), container_image=cpu_image)
def register(config: PipelineConfig, manifest: ClipManifest, data: LatentDataset, checkpoint: Checkpoint,
             report: EvalReport, parent_run: str) -> ModelVersion:
    """Register the checkpoint's EMA weights under config.register.model_name with alias config.register.alias (and
    config.register.champion_alias if no version holds it yet); tags = lineage, metrics and the suite hash."""
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
    return ModelVersion(name=cfg.model_name, version=version, alias=cfg.alias,
                        checkpoint_hash=checkpoint.content_hash, mlflow_run_id=run_id)
