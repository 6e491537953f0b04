"""Tasks that open and close an execution: strict config loading and the MLflow parent run."""
from __future__ import annotations

import json

from flytekit import current_context, task
from flytekit.types.file import FlyteFile

from common import tracking
from common.config import PipelineConfig, config_hash, load_config, to_dict
from containers.images import cpu_image
from tasks.types import ClipManifest, EvalReport, ModelVersion


@task(container_image=cpu_image)
def load_pipeline_config(config: FlyteFile) -> PipelineConfig:
    """Parse the YAML strictly (an unknown key or a wrong type is an error naming it)."""
    return load_config(config.download())


@task(container_image=cpu_image)
def start_tracking(config: PipelineConfig) -> str:
    """Create this execution's MLflow parent run; its id is passed to every task, which logs a child run under it."""
    ctx = current_context()
    execution = ctx.execution_id.name if ctx.execution_id else "local"
    return tracking.start_parent_run(
        config.tracking.root, config.tracking.experiment, run_name=f"{config.name}-{execution}",
        params={"config_hash": config_hash(config), "config": json.dumps(to_dict(config), sort_keys=True)},
        tags={"pipeline.config_name": config.name, "pipeline.config_hash": config_hash(config),
              "flyte.execution": execution})


@task(container_image=cpu_image)
def finish_tracking(config: PipelineConfig, parent_run: str, manifest: ClipManifest, report: EvalReport,
                    model: ModelVersion) -> str:
    """Close the parent run and say what was produced and how to browse it."""
    import mlflow

    tracking.tracking_uri(config.tracking.root)
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(config.tracking.root))
    for k, v in report.metrics.items():
        client.log_metric(parent_run, k, float(v))
    client.set_tag(parent_run, "registered_model", f"{model.name}@{model.alias} (v{model.version})")
    tracking.finish_run(config.tracking.root, parent_run)
    lines = [
        f"pipeline '{config.name}' finished",
        f"  inputs {manifest.inputs}: kept {manifest.kept}, rejected {manifest.rejected}, failed {manifest.failed}"
        f"  (clips: {manifest.folder.path})",
        "  evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.metrics.items())),
        f"  report: {report.folder.path}/report.html",
        f"  model: {model.name} version {model.version} alias '{model.alias}'",
        f"  MLflow parent run: {parent_run}",
        f"  browse: {tracking.browse_command(config.tracking.root)}",
    ]
    return "\n".join(lines)   # pyflyte prints it; on a cluster it is the execution's output
