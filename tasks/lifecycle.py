"""Tasks that open and close an execution: strict config loading and the MLflow parent run.

The parent run is named ``<config> <trigger> <UTC date and time>`` and carries the git commit as its source;
``finish_tracking`` closes it, or deletes it when every task was a cache hit (then nothing new was made, and the
output names the runs that made the results); ``fail_tracking`` is the workflow's failure handler: it marks the
execution's parent run FAILED with the error.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from flytekit import current_context, task
from flytekit.types.error import FlyteError
from flytekit.types.file import FlyteFile

from common import tracking
from common.config import PipelineConfig, config_hash, load_config, to_dict
from tasks.resources import defaults
from tasks.types import ClipManifest, EvalReport, ModelVersion


@task(**defaults("orchestration"))
def load_pipeline_config(config: FlyteFile) -> PipelineConfig:
    """Parse the YAML strictly (an unknown key or a wrong type is an error naming it)."""
    return load_config(config.download())


@task(**defaults("orchestration"))
def start_tracking(config: PipelineConfig, kickoff_time: Optional[datetime] = None) -> str:
    """Create this execution's MLflow parent run; its id is passed to every task, which logs a child run under it.
    ``kickoff_time``: the schedule's (then the trigger is "scheduled" and the run is named after that time)."""
    if execution_name() == "local":   # before any later task reads the cache
        repaired = drop_stale_cache(Path(config.tracking.root))
        if repaired:
            print(repaired, flush=True)
    trigger = "scheduled" if kickoff_time is not None else "manual"
    at = kickoff_time or datetime.now(timezone.utc)
    params = {"config_hash": config_hash(config), "config": json.dumps(to_dict(config), sort_keys=True)}
    if kickoff_time is not None:
        params["kickoff_time"] = kickoff_time.isoformat()
    return tracking.start_parent_run(
        config.tracking.root, config.tracking.experiment, run_name=f"{config.name} {trigger} {at:%Y-%m-%d %H:%M}",
        params=params, tags={"pipeline.config_name": config.name, "pipeline.config_hash": config_hash(config),
                             "flyte.execution": execution_name(), "pipeline.trigger": trigger})


def drop_stale_cache(root: Path) -> Optional[str]:
    """A local run's repair of flytekit's local task cache after the run folder was deleted (by hand, not ``make
    clean-runs``): a cached result that names a folder ``<root>/artifacts/<stage>/<key>`` (tasks.common.artifact_dir)
    that no longer exists would feed the next task a missing folder, which fails inside flytekit with "invalid value
    {'path': ...}". Those entries, and only those, are removed, so their tasks run again; other projects' entries in
    the same user-wide cache are left alone. Returns the line to print, or None when nothing was stale."""
    import os
    import re

    from flytekit.core.local_cache import CACHE_LOCATION

    location = Path(os.path.expanduser(CACHE_LOCATION))
    if not (location / "cache.db").is_file():   # diskcache's index: no cache, nothing cached (nothing is created)
        return None
    from diskcache import Cache

    artifacts = (Path(root).resolve() / "artifacts").as_posix()
    named = re.compile(re.escape(artifacts.encode()) + rb"/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)")
    stale = []
    with Cache(str(location)) as cache:
        for key in list(cache.iterkeys()):
            value = cache.get(key)   # a serialized LiteralMap: the folders' paths are plain bytes in it
            if isinstance(value, bytes) and any(not Path(artifacts, m[1].decode(), m[2].decode()).exists()
                                                for m in named.finditer(value)):
                stale.append(key)
        for key in stale:
            cache.delete(key)
    if not stale:
        return None
    return (f"note: removed {len(stale)} cached result(s) from flytekit's local task cache ({location}) that named "
            f"folders under {artifacts} which no longer exist (the run folder was deleted): their tasks run again. "
            "`make clean-runs` removes the run folder and clears that cache in one go.")


def execution_name() -> str:
    """This Flyte execution's name ("local" for every local run)."""
    ctx = current_context()
    return ctx.execution_id.name if ctx.execution_id else "local"


@task(**defaults("orchestration"))
def fail_tracking(config: FlyteFile, kickoff_time: Optional[datetime] = None, err: Optional[FlyteError] = None) -> None:
    """The workflow's failure handler: mark this execution's MLflow parent run FAILED, with the error. Nothing to do
    when the config itself could not be read (no parent run was started)."""
    try:
        cfg = load_config(config.download())
    except (OSError, ValueError) as e:
        print(f"[tracking] no parent run to close: the config could not be read ({e})", flush=True)
        return
    reason = err.message if err is not None else "the workflow failed"
    closed = tracking.fail_running_parents(cfg.tracking.root, cfg.tracking.experiment, execution_name(), reason)
    print(f"[tracking] marked {len(closed)} parent run(s) FAILED: {', '.join(closed) or '-'}", flush=True)


@task(**defaults("orchestration"))
def finish_tracking(config: PipelineConfig, parent_run: str, manifest: ClipManifest, report: EvalReport,
                    model: ModelVersion) -> str:
    """Close the parent run and say what was produced and how to browse it."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(config.tracking.root))
    cached = not tracking.child_runs(config.tracking.root, parent_run)
    if cached:   # every task was a cache hit: an empty parent run would only clutter the experiment
        client.delete_run(parent_run)
        made_by = client.get_run(report.mlflow_run_id).data.tags.get(tracking.PARENT_TAG, report.mlflow_run_id)
    else:
        for k, v in report.metrics.items():
            client.log_metric(parent_run, k, float(v))
        client.set_tag(parent_run, "registered_model", f"{model.name}@{model.alias} (v{model.version})")
        tracking.finish_run(config.tracking.root, parent_run)
    lines = [
        f"pipeline '{config.name}' finished" + (" (every task was a cache hit: nothing was recomputed)" if cached
                                                else ""),
        f"  inputs {manifest.inputs}: kept {manifest.kept}, rejected {manifest.rejected}, failed {manifest.failed}"
        f"  (clips: {manifest.folder.path})",
        "  evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(report.metrics.items())),
        f"  report: {report.folder.path}/report.html",
        f"  model: {model.name} version {model.version} alias '{model.alias}'",
        f"  MLflow parent run: {made_by} (the run that made these results)" if cached
        else f"  MLflow parent run: {parent_run}",
        f"  browse: {tracking.browse_command(config.tracking.root)}",
    ]
    return "\n".join(lines)   # pyflyte prints it; on a cluster it is the execution's output
