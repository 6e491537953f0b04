"""Flyte adapter for evaluation: the final Checkpoint's EMA weights (raw beside them) against the registered champion
on the fixed suite -> EvalReport (metrics, comparison, samples, loss curves; the report as a Deck and in MLflow)."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import List, Optional

from flytekit import Deck, task

from common import tracking
from common.config import DiTConfig, EvalConfig, FlowConfig, RegisterConfig, TrackingConfig, config_hash, to_dict
from common.hashing import module_code_version, sha256_json
from tasks.common import artifact_dir, folder_ref, fresh_dir, local_path, mirror, publish
from tasks.resources import defaults
from tasks.types import Checkpoint, EvalReport, FlyteDirectory, LatentDataset

STEP_FILES = ("model.safetensors", "ema.safetensors", "meta.json")   # what evaluation reads of a step folder


def fetch_files(folder: FlyteDirectory, names: List[str], dst: Path) -> Path:
    """A folder artifact's files ``names`` (relative paths) without the rest of it: the folder itself when it is on
    this machine, else each file copied from the folder's remote URI to ``dst`` (a missing one is skipped). A
    checkpoint folder also holds optimizer state and older steps: a 10B stage is hundreds of GB, so evaluation reads
    only the files it needs."""
    source = str(folder.remote_source or folder.path)
    if Path(source).is_dir():
        return Path(source)
    from flytekit import FlyteContextManager

    fs = FlyteContextManager.current_context().file_access
    for name in names:
        remote = f"{source.rstrip('/')}/{name}"
        if fs.exists(remote):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get_data(remote, str(dst / name))
    return dst


def final_step_dir(checkpoint: Checkpoint, dst: Path) -> Path:
    """The final step folder of a Checkpoint (named by its ``latest``) with the weights, the EMA and meta.json."""
    root = fetch_files(checkpoint.folder, ["latest"], dst)
    step = (root / "latest").read_text().strip()
    return fetch_files(checkpoint.folder, [f"{step}/{f}" for f in STEP_FILES], dst) / step


def find_clip_manifest(tracking_cfg: TrackingConfig, manifest_hash: str) -> Optional[Path]:
    """The ClipManifest folder with ``manifest_hash`` under <root>/artifacts/curate (its clips/<clip_id>.mp4 are the
    held-out clips' pixels for the VAE reconstruction metrics), or None (e.g. remote storage)."""
    curate = Path(tracking_cfg.root).resolve() / "artifacts" / "curate"
    for summary in sorted(curate.glob("*/summary.json")) if curate.is_dir() else []:
        try:
            if json.loads(summary.read_text()).get("content_hash") == manifest_hash:
                return summary.parent
        except (OSError, ValueError):
            continue
    return None


@task(cache=True, cache_version=module_code_version("tasks.evaluate.task"),
      enable_deck=True, cache_ignore_input_vars=("parent_run",), **defaults("evaluate"))
def evaluate(cfg: EvalConfig, dit: DiTConfig, flow: FlowConfig, data: LatentDataset, checkpoint: Checkpoint,
             stages: List[Checkpoint], register: RegisterConfig, tracking_cfg: TrackingConfig,
             parent_run: str, champion: str = "") -> EvalReport:
    """Evaluate ``checkpoint`` (its final step's EMA weights) on ``cfg``'s suite over ``data``'s held-out clips, beside
    its raw weights and against the version of ``register.model_name`` holding ``register.champion_alias`` (none on
    the first run); ``stages`` are every training stage's Checkpoint, whose metrics.jsonl give the loss curves.
    ``champion``: that version as ``current_champion`` saw it before this task ran: part of the cache key, so a moved
    champion alias is evaluated against, not served from the cache."""
    from tasks.evaluate.evaluate import run_evaluation
    from tasks.register.registry import champion_files

    key = sha256_json([config_hash(cfg), checkpoint.content_hash, data.content_hash,
                       [s.content_hash for s in stages], config_hash(register)], n=16)
    out = artifact_dir(tracking_cfg, "evaluate", key)
    with tracking.child_run(tracking_cfg.root, parent_run, "evaluate",
                            tags={"lineage.checkpoint_hash": checkpoint.content_hash,
                                  "lineage.data_hash": data.content_hash}) as run_id:
        import mlflow

        tracking.log_config("evaluate", to_dict(cfg))
        tmp = fresh_dir(out)

        def log(message: str) -> None:
            print(f"[evaluate] {message}", flush=True)

        with tempfile.TemporaryDirectory() as download:   # inputs fetched here (champion, weights), not outputs
            dl = Path(download)
            step_dir = final_step_dir(checkpoint, dl / "candidate")
            curves = [(s.stage, fetch_files(s.folder, ["metrics.jsonl"], dl / "stages" / str(i)))
                      for i, s in enumerate(stages)]
            champion_now = champion_files(register.model_name, register.champion_alias, dl / "champion")
            log(f"champion: {'none (first model)' if champion_now is None else 'version ' + champion_now.version}")
            if (champion_now.version if champion_now else "") != champion:
                log(f"the champion moved since this run started (was {champion or 'none'}): comparing with the "
                    "current one")
            outcome = run_evaluation(cfg, dit, flow, local_path(data.folder), step_dir, tmp, stages=curves,
                                     champion=champion_now, progress=log,
                                     clips_dir=find_clip_manifest(tracking_cfg, data.manifest_hash))
        publish(tmp, out)
        mirror(tracking_cfg, out)   # the report, metrics and samples to tracking.artifact_uri, when set

        champ = outcome.champion.values() if outcome.champion else {}
        deltas = {r.name: r.delta for r in outcome.comparison if math.isfinite(r.delta)}
        mlflow.log_metrics({f"eval.{k}": v for k, v in outcome.flat.items()})
        mlflow.log_metrics({f"eval.raw.{k}": m.value for k, m in outcome.raw.items() if math.isfinite(m.value)})
        mlflow.log_metrics({f"champion.{k}": v for k, v in champ.items() if math.isfinite(v)})
        mlflow.log_metrics({f"delta.{k}": v for k, v in deltas.items()})
        mlflow.set_tags({"eval.suite_hash": outcome.suite.hash, "eval.weights": "ema",
                         "eval.champion_version": champion_now.version if champion_now else "",
                         "eval.heldout_pixels": outcome.suite.pixels_source})
        mlflow.log_artifacts(str(out / "samples"), "samples")
        for name in ("report.html", "metrics.json", outcome.files.get("loss_curves", "")):
            if name and (out / name).is_file():
                mlflow.log_artifact(str(out / name))
        Deck("evaluation", (out / "report.html").read_text())
    return EvalReport(folder=folder_ref(out), metrics=outcome.flat, checkpoint_hash=checkpoint.content_hash,
                      mlflow_run_id=run_id, config=cfg, suite_hash=outcome.suite.hash,
                      directions={k: m.direction for k, m in outcome.metrics.items()},
                      raw_metrics={k: m.value for k, m in outcome.raw.items() if math.isfinite(m.value)},
                      champion_version=champion_now.version if champion_now else "",
                      champion_metrics={k: v for k, v in champ.items() if math.isfinite(v)}, deltas=deltas)
