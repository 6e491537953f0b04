"""Flyte adapter for curation: inputs -> ClipManifest (logic in tasks/curate/curate.py, no Flyte there)."""
from __future__ import annotations

import json

from flytekit import Resources, task

from common import tracking
from common.config import CurateConfig, TrackingConfig, config_hash, to_dict
from common.lineage import hash_values
from containers.images import curation_image
from tasks.common import artifact_dir, code_version, fresh_dir, publish
from tasks.types import ClipManifest, FlyteDirectory


@task(container_image=curation_image)
def snapshot_inputs(cfg: CurateConfig) -> str:
    """Fingerprint of the raw inputs (names and sizes): curation's cache key changes when videos are added."""
    from common.storage import list_inputs

    return hash_values(sorted(repr(i) for i in list_inputs(cfg.input_uri)))


@task(cache=True, cache_version=code_version("tasks/curate", "common"), cache_ignore_input_vars=("parent_run",),
      container_image=curation_image, requests=Resources(cpu="2", mem="4Gi"))
def curate(cfg: CurateConfig, inputs_fingerprint: str, tracking_cfg: TrackingConfig, parent_run: str) -> ClipManifest:
    """Decode, split scenes, cut, filter and caption raw videos; every input is kept, rejected or failed."""
    from tasks.curate.curate import run_curation

    key = hash_values(config_hash(cfg), inputs_fingerprint)
    out = artifact_dir(tracking_cfg, "curate", key)
    with tracking.child_run(tracking_cfg.root, parent_run, "curate") as _:
        import mlflow

        tracking.log_config("curate", to_dict(cfg))
        tmp = fresh_dir(out)
        summary = run_curation(cfg, tmp, progress=lambda m: print(f"[curate] {m}", flush=True))
        publish(tmp, out)
        mlflow.log_metrics({k: float(summary[k]) for k in ("inputs", "kept", "rejected", "failed")})
        mlflow.log_artifact(str(out / "manifest.parquet"), "manifest")
        mlflow.log_artifact(str(out / "summary.json"), "manifest")
        mlflow.set_tags({"lineage.content_hash": summary["content_hash"],
                         "lineage.inputs_fingerprint": inputs_fingerprint})
        mlflow.log_text(json.dumps({"source_hashes": summary["source_hashes"]}, indent=1), "lineage.json")
    return ClipManifest(folder=FlyteDirectory(str(out)), content_hash=summary["content_hash"],
                        source_hashes=list(summary["source_hashes"]), inputs=int(summary["inputs"]),
                        kept=int(summary["kept"]), rejected=int(summary["rejected"]), failed=int(summary["failed"]),
                        config=cfg)
