"""Helpers shared by the task adapters: where outputs go, and resolving Flyte folders to local paths."""
from __future__ import annotations

import shutil
from pathlib import Path

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


def local_path(folder: FlyteDirectory) -> Path:
    """Download (remote) or resolve (local) a FlyteDirectory; a clear error if a cached path has vanished."""
    path = Path(folder.download())
    if not path.exists():
        raise FileNotFoundError(
            f"artifact folder {path} no longer exists (a cached result points at deleted files); "
            "clear the cache with `pyflyte local-cache clear` and rerun")
    return path
