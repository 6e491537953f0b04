"""The MLflow model registry (no Flyte here): register an evaluated checkpoint, find and download the champion.

A model version holds the exported weights only, as run artifacts: ``checkpoint/`` = model.safetensors,
ema.safetensors and meta.json of the final step folder (meta.json's ``dit`` is the model config; no optimizer
state, no dist/, no pickled model), ``codecs/`` = the VAE + text encoder + latent statistics that turn its latents
into videos, and ``evaluation/metrics.json``. The version's source is ``runs:/<run>/checkpoint``, so
``mlflow.artifacts.download_artifacts("models:/<name>@candidate")`` fetches the weights; ``load_registered_dit``
builds the DiT from them (its EMA, what evaluation ranked). With a tracking server whose artifacts live on S3/MinIO
(``make services``, README "Object storage and services") this is the upload of the weights. Its tags carry the
lineage, the metrics and the suite hash (``eval.suite_hash``).

    version, uri = register_checkpoint(name, "candidate", dit_cfg, step_dir, latents_dir, tags, eval_dir=report_dir)
    champ = champion_files(name, "champion", dst)   # ChampionFiles (downloaded) or None before the first version
    model = load_registered_dit("models:/video-dit-tiny@champion", dst)

Registration sets the candidate alias only; the champion alias moves through the gate (``tasks/register/gate.py``,
applied by the register task with ``tasks/register/promote.py``).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from common.config import DiTConfig, to_dict
from common.latents import META, NULL_TEXT, TEXT_DIR, VAE_DIR
from tasks.evaluate.results import ChampionFiles

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "meta.json")   # what a version keeps of a step folder
SUITE_TAG, METRICS_TAG = "eval.suite_hash", "eval.metrics_json"
TAG_LIMIT = 5000   # MLflow's model-version tag value limit (characters)


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    tags: Dict[str, str]


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def find_alias(name: str, alias: str) -> Optional[RegisteredVersion]:
    """The version of registered model ``name`` holding ``alias``, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return RegisteredVersion(name, str(mv.version), str(mv.run_id or ""), dict(mv.tags or {}))


def download_version(mv: RegisteredVersion, dst: Path) -> Tuple[Path, Path]:
    """Download a version's ``checkpoint/`` and ``codecs/`` into ``dst``; returns (step folder, codecs folder)."""
    import mlflow

    if not mv.run_id:
        raise ValueError(f"model {mv.name} version {mv.version} has no source run: its files cannot be downloaded")
    dst.mkdir(parents=True, exist_ok=True)
    step = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="checkpoint", dst_path=str(dst)))
    codecs = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="codecs", dst_path=str(dst)))
    missing = [f for f in ("ema.safetensors", "meta.json") if not (step / f).is_file()]
    if missing:
        raise FileNotFoundError(f"model {mv.name} version {mv.version}: checkpoint/ lacks {missing} (registered "
                                "before versions carried their EMA weights); re-register it or move the champion alias")
    return step, codecs


def champion_files(name: str, alias: str, dst: Path) -> Optional[ChampionFiles]:
    """The champion of ``name`` downloaded into ``dst`` with its registered suite hash and metrics; None if the
    model has no version with ``alias`` (the first run)."""
    mv = find_alias(name, alias)
    if mv is None:
        return None
    step, codecs = download_version(mv, dst)
    try:
        metrics = {k: float(v) for k, v in json.loads(mv.tags.get(METRICS_TAG, "{}")).items()}
    except (ValueError, TypeError, AttributeError):
        metrics = {}
    return ChampionFiles(version=mv.version, step_dir=step, codecs_dir=codecs, suite_hash=mv.tags.get(SUITE_TAG, ""),
                         metrics=metrics)


def register_checkpoint(name: str, alias: str, dit_cfg: DiTConfig, step_dir: Path, latents_dir: Path,
                        tags: Dict[str, str], champion_alias: str = "champion",
                        eval_dir: Optional[Path] = None) -> Tuple[str, str]:
    """Log the checkpoint's exported weights (``CHECKPOINT_FILES``), its codecs and evaluation in the active MLflow
    run, register them as a new version of ``name`` and set ``alias``; returns (version, model_uri).
    (``champion_alias`` is accepted for callers of the former signature; the gate moves it.)"""
    import mlflow
    from mlflow.exceptions import MlflowException

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_checkpoint logs into the active MLflow run: call it inside "
                           "common.tracking.child_run(...) (or mlflow.start_run())")
    trained = json.loads((step_dir / "meta.json").read_text()).get("dit") or {} \
        if (step_dir / "meta.json").is_file() else {}
    wanted = json.loads(json.dumps(to_dict(dit_cfg)))
    differ = sorted(k for k in set(trained) & set(wanted) if trained[k] != wanted[k])
    if differ:
        raise ValueError(f"{step_dir}/meta.json was trained with another DiT config than train.dit ({differ[:5]} "
                         "differ): register the checkpoint with the config it was trained with")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint"
        ckpt.mkdir()
        for f in CHECKPOINT_FILES:
            if not (step_dir / f).is_file():
                raise FileNotFoundError(f"{step_dir / f} not found: registration needs the full weights, the EMA and "
                                        "meta.json of the final step folder")
            shutil.copy(step_dir / f, ckpt / f)
        mlflow.log_artifacts(str(ckpt), "checkpoint")
        codecs = Path(tmp) / "codecs"
        codecs.mkdir()
        for sub in (VAE_DIR, TEXT_DIR):
            if (latents_dir / sub).is_dir():
                shutil.copytree(latents_dir / sub, codecs / sub)
        for f in (META, NULL_TEXT):
            if (latents_dir / f).is_file():
                shutil.copy(latents_dir / f, codecs / f)
        mlflow.log_artifacts(str(codecs), "codecs")
    if eval_dir is not None and (eval_dir / "metrics.json").is_file():
        mlflow.log_artifact(str(eval_dir / "metrics.json"), "evaluation")
    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = str(client.create_model_version(name, source=f"runs:/{run.info.run_id}/checkpoint",
                                              run_id=run.info.run_id).version)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v)[:TAG_LIMIT])
    client.set_registered_model_alias(name, alias, version)
    return version, f"models:/{name}@{alias}"


def load_registered_dit(model_uri: str, dst: Path, ema: bool = True):
    """The DiT of a registered version (``models:/<name>@<alias>`` or ``models:/<name>/<version>``), built from
    its meta.json's ``dit`` config with its EMA weights (``ema=False``: the raw weights), checksums verified;
    the files are downloaded into ``dst``."""
    from common.lineage import parse_model_uri
    from tasks.evaluate.evaluate import dit_config_of, load_dit

    name, kind, ref = parse_model_uri(model_uri)
    if kind == "alias":
        mv = find_alias(name, ref)
        if mv is None:
            raise LookupError(f"{model_uri}: no such model or alias (list the versions and aliases: python -m "
                              f"tasks.register.promote --show {name})")
    else:
        found = _client().get_model_version(name, ref)
        mv = RegisteredVersion(name, str(found.version), str(found.run_id or ""), dict(found.tags or {}))
    step, _ = download_version(mv, Path(dst))
    return load_dit(dit_config_of(step), step, ema=ema)
