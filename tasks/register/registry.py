"""Register a checkpoint in the MLflow model registry (no Flyte here).

The model version holds the DiT (``mlflow.pytorch``, pickle format with the ``models`` package as code, so
``mlflow.pytorch.load_model("models:/<name>@candidate")`` works without this repo on the path), the checkpoint
folder, and the VAE + text encoder needed to turn latents into videos. Its tags carry the lineage.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Dict, Tuple

from common.config import DiTConfig
from common.latents import META, NULL_TEXT, TEXT_DIR, VAE_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]


def register_checkpoint(name: str, alias: str, dit_cfg: DiTConfig, step_dir: Path, latents_dir: Path,
                        tags: Dict[str, str]) -> Tuple[str, str]:
    """Log and register the model in the active MLflow run; returns (version, model_uri)."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from tasks.evaluate.evaluate import load_dit

    model = load_dit(dit_cfg, step_dir)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "einops"]
    info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=requirements,
                                    code_paths=[str(REPO_ROOT / "models")], registered_model_name=name)
    mlflow.log_artifacts(str(step_dir), "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        for sub in (VAE_DIR, TEXT_DIR):
            if (latents_dir / sub).is_dir():
                shutil.copytree(latents_dir / sub, Path(tmp) / sub)
        for f in (META, NULL_TEXT):
            if (latents_dir / f).is_file():
                shutil.copy(latents_dir / f, Path(tmp) / f)
        mlflow.log_artifacts(tmp, "codecs")
    version = str(info.registered_model_version)
    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_registered_model_alias(name, alias, version)
    return version, f"models:/{name}@{alias}"
