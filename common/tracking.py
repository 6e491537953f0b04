"""MLflow tracking: one parent run per pipeline execution, one child run per task.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), otherwise a SQLite store
in the run folder (``<root>/mlflow.db``, artifacts under ``<root>/mlartifacts``), so a laptop needs no server.
Browse it with the command ``browse_command(root)`` returns.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

PARENT_TAG = "mlflow.parentRunId"
PIPELINE_RUN_TAG = "pipeline.parent"          # "true" on every execution's parent run
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")   # MLflow 3's UI then opens on the runs


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
    """The experiment's id, created on first use; marked as model development (``EXPERIMENT_KIND``)."""
    client = _client(root)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        location = (Path(root).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def git_source() -> Dict[str, str]:
    """MLflow's source tags for this checkout: the git commit (with "-dirty" when the work tree has changes) and
    the repository; {} outside a git checkout (e.g. in an image built without .git)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit + ("-dirty" if dirty else ""), "mlflow.source.name": str(repo),
            "mlflow.source.type": "PROJECT"}


def start_parent_run(root: str, experiment: str, run_name: str, params: Mapping[str, object],
                     tags: Dict[str, str]) -> str:
    """Create the execution's parent run and return its id (it stays RUNNING until ``finish_run``)."""
    client = _client(root)
    run = client.create_run(experiment_id(root, experiment), run_name=run_name,
                            tags={PIPELINE_RUN_TAG: "true", **git_source(), **tags})
    flat = {k: str(v)[:6000] for k, v in params.items()}
    for k, v in flat.items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def finish_run(root: str, run_id: str, status: str = "FINISHED") -> None:
    _client(root).set_terminated(run_id, status=status)


def child_runs(root: str, parent_run_id: str) -> list:
    """The child runs of a parent run."""
    client = _client(root)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def fail_running_parents(root: str, experiment: str, execution: str, reason: str) -> List[str]:
    """Mark this execution's parent runs that are still RUNNING as FAILED, with ``reason`` as a tag; returns their
    ids. (The Flyte failure handler calls it: the failed task's child run already ended FAILED.)"""
    client = _client(root)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{PIPELINE_RUN_TAG}` = 'true' and tags.`flyte.execution` = '{execution}' "
        "and attributes.status = 'RUNNING'"))
    for run in runs:
        client.set_tag(run.info.run_id, "pipeline.failure", reason[:5000])
        client.set_terminated(run.info.run_id, status="FAILED")
    return [r.info.run_id for r in runs]


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


def log_dataset(table, source: str, name: str, digest: str, context: str) -> None:
    """Log a table (a pandas DataFrame: a listing, manifest or index) as an MLflow dataset input of the active run,
    so the runs table's Dataset column and the run page show it (``context``: "curation", "training", ...)."""
    import warnings

    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    with warnings.catch_warnings():   # its schema hint about integer columns: these tables have no missing values
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = from_pandas(table, source=source, name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context)


def log_checkpoint_model(name: str, run_id: str, folder: str, content_hash: str, metrics: Dict[str, float],
                         params: Optional[Dict[str, str]] = None) -> str:
    """An MLflow 3 logged model for a stage's exported weights (an external model: the weights stay in the
    checkpoint folder, ``tags["checkpoint"]``), with ``metrics`` linked to it; returns its model id."""
    import mlflow

    model = mlflow.create_external_model(name=name, source_run_id=run_id, model_type="video-dit",
                                         tags={"checkpoint": folder, "lineage.content_hash": content_hash},
                                         params=params or {})
    for k, v in metrics.items():
        mlflow.log_metric(k, float(v), run_id=run_id, model_id=model.model_id)
    from mlflow.entities import LoggedModelOutput

    mlflow.tracking.MlflowClient().log_outputs(run_id, [LoggedModelOutput(model.model_id, int(params.get("step", 0))
                                                                          if params else 0)])
    return model.model_id
