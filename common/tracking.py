"""MLflow tracking: one parent run per pipeline execution, one child run per task.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), otherwise a SQLite store
in the run folder (``<root>/mlflow.db``, artifacts under ``<root>/mlartifacts``), so a laptop needs no server.
Browse it with the command ``browse_command(root)`` returns.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator, Optional

PARENT_TAG = "mlflow.parentRunId"


def tracking_uri(root: str) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    folder = Path(root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def browse_command(root: str) -> str:
    uri = tracking_uri(root)
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri} in a browser"


def _client(root: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(root: str, name: str) -> str:
    client = _client(root)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        location = (Path(root).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_parent_run(root: str, experiment: str, run_name: str, params: Dict[str, object], tags: Dict[str, str]) -> str:
    """Create the execution's parent run and return its id (it stays RUNNING until ``finish_run``)."""
    client = _client(root)
    run = client.create_run(experiment_id(root, experiment), run_name=run_name, tags=tags)
    flat = {k: str(v)[:6000] for k, v in params.items()}
    for k, v in flat.items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def finish_run(root: str, run_id: str, status: str = "FINISHED") -> None:
    _client(root).set_terminated(run_id, status=status)


@contextlib.contextmanager
def child_run(root: str, parent_run_id: str, name: str, tags: Optional[Dict[str, str]] = None) -> Iterator[str]:
    """Open a child run of ``parent_run_id`` as the active MLflow run; yields its run id.

    The run ends FINISHED on success and FAILED when the body raises (the exception propagates).
    """
    import mlflow

    client = _client(root)
    parent = client.get_run(parent_run_id)
    while mlflow.active_run() is not None:   # a previous task in this process left one open
        mlflow.end_run()
    run = mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=name,
                           tags={PARENT_TAG: parent_run_id, "pipeline.task": name, **(tags or {})})
    try:
        yield run.info.run_id
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def log_config(prefix: str, cfg: Dict[str, object]) -> None:
    """Log a nested config dict as flat params ``prefix.key.sub``."""
    import mlflow

    flat: Dict[str, str] = {}

    def walk(p: str, v: object) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(f"{p}.{k}" if p else k, sub)
        else:
            flat[p] = str(v)[:6000]

    walk(prefix, cfg)
    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))
