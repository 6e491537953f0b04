"""Helpers shared by the task adapters: where outputs go, their copy in object storage, and resolving Flyte folders
to local paths."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from flytekit.types.directory import FlyteDirectory

from common.config import TrackingConfig


def artifact_dir(tracking: TrackingConfig, stage: str, key: str) -> Path:
    """Persistent folder for one stage output: ``<root>/artifacts/<stage>/<key>`` (absolute).

    Outputs live in the run folder, not in a temp dir, so a cached result keeps pointing at real files and an
    interrupted training stage finds its checkpoints again.
    """
    path = Path(tracking.root).resolve() / "artifacts" / stage / key
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def fresh_dir(path: Path) -> Path:
    """An empty temp sibling of ``path``; ``publish`` renames it into place when the stage succeeded."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def folder_ref(path: Path) -> FlyteDirectory:
    """The FlyteDirectory a task returns for an artifact folder under ``tracking.root``: Flyte passes its path and
    never uploads it (``remote_directory=False``). The run folder is the data plane (local here; on a cluster a volume
    every pod mounts, README "Running on a cluster"); a checkpoint folder holds optimizer state and older steps that
    must not be copied to the raw-output prefix. What a remote run needs in object storage goes there through
    ``mirror`` (complete or absent, checksummed, exported weights only)."""
    return FlyteDirectory(str(path), remote_directory=False)


def local_path(folder: FlyteDirectory) -> Path:
    """Download (remote) or resolve (local) a FlyteDirectory; a clear error if a cached path has vanished."""
    path = Path(folder.download())
    if not path.exists():
        raise FileNotFoundError(
            f"artifact folder {path} no longer exists (a cached result points at deleted files); "
            "clear the cache with `pyflyte local-cache clear` and rerun")
    return path


def mirror(tracking: TrackingConfig, folder: Path, files: Optional[Sequence[str]] = None,
           exclude: Sequence[str] = ()) -> str:
    """Upload a published stage output ``<root>/artifacts/<stage>/<key>`` to ``<tracking.artifact_uri>/<stage>/<key>``
    (``common.objectstore.upload_folder``: complete or absent, checksummed; ``files``/``exclude`` select what goes)
    and tag the active MLflow run with the URI (``artifact_uri``); returns it. Nothing happens, and "" is returned,
    when ``tracking.artifact_uri`` is "" (local only, the default)."""
    if not tracking.artifact_uri:
        return ""
    from common.objectstore import upload_folder

    base = Path(tracking.root).resolve() / "artifacts"
    try:
        rel = Path(folder).resolve().relative_to(base).as_posix()
    except ValueError:
        raise ValueError(f"mirror: {folder} is not under {base} (outputs are published with artifact_dir)") from None
    uri = f"{tracking.artifact_uri.rstrip('/')}/{rel}"
    manifest = upload_folder(folder, uri, files=files, exclude=exclude)
    print(f"[objectstore] {folder.name}: {len(manifest['files'])} files, {manifest['total_bytes']} bytes -> {uri}",
          flush=True)
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag("artifact_uri", uri)
    return uri


def exported_checkpoint_files(checkpoint_dir: Path) -> List[str]:
    """What a Checkpoint folder keeps in object storage: ``latest``, ``metrics.jsonl`` and the latest step's exported
    weights (model.safetensors, ema.safetensors, meta.json), never optim/, dist/, job.json or older steps."""
    step = (checkpoint_dir / "latest").read_text().strip()
    names = ["latest", "metrics.jsonl"] + [f"{step}/{f}" for f in ("model.safetensors", "ema.safetensors",
                                                                      "meta.json")]
    return [n for n in names if (checkpoint_dir / n).is_file()]
