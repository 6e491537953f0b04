"""Flyte adapter for evaluation: Checkpoint -> EvalReport (metrics, samples, report as a Deck and in MLflow)."""
from __future__ import annotations

from flytekit import Deck, Resources, task

from common import tracking
from common.config import DiTConfig, EvalConfig, FlowConfig, TrackingConfig, config_hash, to_dict
from common.hashing import code_version, sha256_json
from containers.images import cpu_image
from tasks.common import artifact_dir, fresh_dir, local_path, publish
from tasks.types import Checkpoint, EvalReport, FlyteDirectory, LatentDataset


@task(cache=True, cache_version=code_version("tasks/evaluate", "models", "common"), enable_deck=True,
      cache_ignore_input_vars=("parent_run",), container_image=cpu_image, requests=Resources(cpu="2", mem="4Gi"))
def evaluate(cfg: EvalConfig, dit: DiTConfig, flow: FlowConfig, data: LatentDataset, checkpoint: Checkpoint,
             tracking_cfg: TrackingConfig, parent_run: str) -> EvalReport:
    from tasks.evaluate.evaluate import run_evaluation

    key = sha256_json([config_hash(cfg), checkpoint.content_hash, data.content_hash], n=16)
    out = artifact_dir(tracking_cfg, "evaluate", key)
    root = local_path(checkpoint.folder)
    step_dir = root / (root / "latest").read_text().strip()
    with tracking.child_run(tracking_cfg.root, parent_run, "evaluate",
                            tags={"lineage.checkpoint_hash": checkpoint.content_hash,
                                  "lineage.data_hash": data.content_hash}) as run_id:
        import mlflow

        tracking.log_config("evaluate", to_dict(cfg))
        tmp = fresh_dir(out)
        metrics = run_evaluation(cfg, dit, flow, local_path(data.folder), step_dir, tmp,
                                 progress=lambda m: print(f"[evaluate] {m}", flush=True))
        publish(tmp, out)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out / "samples"), "samples")
        mlflow.log_artifact(str(out / "report.html"))
        mlflow.log_artifact(str(out / "metrics.json"))
        Deck("evaluation", (out / "report.html").read_text())
    return EvalReport(folder=FlyteDirectory(str(out)), metrics=metrics, checkpoint_hash=checkpoint.content_hash,
                      mlflow_run_id=run_id, config=cfg)
