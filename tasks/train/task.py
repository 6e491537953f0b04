"""Flyte adapters for pretraining stages and post-training.

Each stage is one task node: it writes a ``StageJob`` JSON, launches ``trainer.train`` with TorchX (``local_cwd``
here, Volcano on Kubernetes) as torchrun workers, streams their log, and returns the final Checkpoint. A stage
that was interrupted resumes from its last checkpoint when rerun (its output folder is keyed by its inputs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, cast

from flytekit import dynamic, task

from common import tracking
from common.config import (
    DiTConfig,
    FlowConfig,
    LaunchConfig,
    RegisterConfig,
    StageConfig,
    TaskResources,
    TrackingConfig,
    TrainConfig,
    to_dict,
)
from common.hashing import module_code_version, sha256_dir, sha256_json
from tasks.common import artifact_dir, exported_checkpoint_files, folder_ref, local_path, mirror
from tasks.resources import defaults, overrides
from tasks.types import Checkpoint, Curriculum, LatentDataset, PreferencePairs

_CACHE = dict(cache=True, cache_version=module_code_version("tasks.train.task", "trainer.train"),
              cache_ignore_input_vars=("parent_run", "launch"), **defaults("train_launcher"))


def _train(stage: StageConfig, dit: DiTConfig, flow: FlowConfig, launch: LaunchConfig,
           data: LatentDataset | PreferencePairs, init: Optional[Checkpoint], tracking_cfg: TrackingConfig,
           parent_run: str, init_uri: str = "") -> Checkpoint:
    """Run one stage on ``data`` (a LatentDataset, or the PreferencePairs of a ``flow_dpo`` stage), from ``init``
    (the previous stage), or from ``init_uri`` (a registered version ``models:/<name>/<version>`` or a step folder:
    a warm start), or from scratch."""
    from trainer.job import StageJob
    from trainer.launch import run_stage

    stage_hash = sha256_json([to_dict(stage), to_dict(dit), to_dict(flow)], n=16)
    parent_hash = init.content_hash if init is not None else (sha256_json(init_uri, n=16) if init_uri else "")
    key = sha256_json([stage_hash, data.content_hash, parent_hash], n=16)
    out = artifact_dir(tracking_cfg, "train", f"{stage.name}-{key}")
    out.mkdir(parents=True, exist_ok=True)
    init_path = ""
    if init is not None:
        root = local_path(init.folder)
        init_path = str(root / (root / "latest").read_text().strip())
    elif init_uri:
        init_path = str(_warm_start_folder(init_uri, out / "init"))
    with tracking.child_run(tracking_cfg.root, parent_run, stage.name,
                            tags={"lineage.data_hash": data.content_hash, "lineage.parent_checkpoint": parent_hash,
                                  "stage.config_hash": stage_hash}) as run_id:
        import mlflow

        tracking.log_config("stage", to_dict(stage))
        tracking.log_config("dit", to_dict(dit))
        import pandas as pd

        from common.latents import INDEX

        latents_dir = local_path(data.folder)
        index = pd.read_parquet(latents_dir / INDEX)
        if not isinstance(data, PreferencePairs):   # the samples this stage's data selection takes
            from common.selection import bucket_counts, describe, select

            check_stage_data([stage], latents_dir, index)
            train = index[index["split"] == "train"]
            index = train[select(train, stage.data, str(latents_dir / INDEX))]
            mlflow.set_tags({"stage.data": describe(stage.data),
                             "stage.data_buckets": json.dumps(bucket_counts(index))})
            mlflow.log_metric("data_samples", len(index))
        tracking.log_dataset(index, source=str(latents_dir),
                             name="preference-pairs" if isinstance(data, PreferencePairs) else "latents",
                             digest=data.content_hash, context="training")
        mlflow.log_params({"world_size": stage.world_size, "init_checkpoint": init_path or "scratch"})
        job = StageJob(stage=stage, dit=dit, flow=flow, latents_dir=str(latents_dir),
                       init_checkpoint=init_path, output_dir=str(out), config_hash=stage_hash,
                       mlflow_tracking_uri=tracking.tracking_uri(tracking_cfg.root), mlflow_run_id=run_id)
        job_path = out / "job.json"
        job_path.write_text(job.to_json())
        run_stage(job, job_path, launch, log_dir=out / "logs",
                  progress=lambda m: print(f"[{stage.name}] {m}", flush=True))
        latest = out / (out / "latest").read_text().strip()
        meta = json.loads((latest / "meta.json").read_text())
        content_hash = sha256_dir(latest, n=16)
        mlflow.set_tag("lineage.content_hash", content_hash)
        tracking.log_checkpoint_model(stage.name, run_id, str(latest), content_hash,
                                      {"final_loss": float(meta.get("loss", float("nan")))},
                                      params={"step": str(meta["step"]), "stage": stage.name})
        mlflow.log_artifact(str(out / "metrics.jsonl"))
        mlflow.log_artifact(str(latest / "meta.json"), "checkpoint")
        mirror(tracking_cfg, out, files=exported_checkpoint_files(out))   # weights only, when artifact_uri is set
    return Checkpoint(folder=folder_ref(out), stage=stage.name, step=int(meta["step"]),
                      content_hash=content_hash, config_hash=stage_hash, data_hash=data.content_hash,
                      parent_hash=parent_hash, mlflow_run_id=run_id, final_loss=float(meta.get("loss", float("nan"))),
                      config=stage)


def check_stage_data(stages: List[StageConfig], latents_dir: Path, index: Any = None) -> None:
    """Every stage's data selection has train samples in the LatentDataset, before any stage runs: one ValueError
    naming each stage that would train on nothing and the buckets it is missing (``common.selection``). ``index``:
    the folder's index.parquet when the caller has read it already."""
    import pandas as pd

    from common.latents import INDEX
    from common.selection import bucket_counts, describe, missing_buckets

    if index is None:
        index = pd.read_parquet(latents_dir / INDEX)
    train = index[index["split"] == "train"]
    problems = [f"stage '{s.name}' ({describe(s.data)}): no train sample for {', '.join(missing)}"
                for s in stages if s.objective == "flow"
                for missing in [missing_buckets(train, s.data, str(latents_dir / INDEX))] if missing]
    if problems:
        raise ValueError("the curriculum's data selections do not match the LatentDataset " + str(latents_dir)
                         + f" (its train samples: {bucket_counts(train)}):\n  " + "\n  ".join(problems)
                         + "\nchange the stages' data selections, or curate.resolutions / curate.bucket_frames / "
                           "curate.keyframes (and add images to the input folder for frames 1)")


def _warm_start_folder(init_uri: str, dst: Path) -> Path:
    """The step folder a warm start loads: a registered version's weights (``models:/<name>/<version>``, downloaded
    into ``dst``) or a step folder path as it is."""
    if not init_uri.startswith("models:/"):
        folder = Path(init_uri)
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"stage init {init_uri}: not a checkpoint step folder (no meta.json)")
        return folder
    from common.lineage import parse_model_uri
    from tasks.register.registry import RegisteredVersion, download_version

    name, kind, version = parse_model_uri(init_uri)
    if kind != "version":
        raise ValueError(f"stage init {init_uri}: name a version (models:/<name>/<version>)")
    from mlflow.tracking import MlflowClient

    mv = MlflowClient().get_model_version(name, version)
    step, _ = download_version(RegisteredVersion(name, str(version), str(mv.run_id or ""), dict(mv.tags or {})), dst)
    return step


@task(**_CACHE)
def train_stage(stage: StageConfig, dit: DiTConfig, flow: FlowConfig, launch: LaunchConfig, data: LatentDataset,
                tracking_cfg: TrackingConfig, parent_run: str, init: Optional[Checkpoint] = None,
                init_uri: str = "") -> Checkpoint:
    """One curriculum pretraining stage (its layout, TP x DP, comes from the stage config); ``init_uri``: a warm
    start (the champion's version, resolved by ``pretrain``)."""
    return _train(stage, dit, flow, launch, data, init, tracking_cfg, parent_run, init_uri)


@task(**_CACHE)
def post_train(stage: StageConfig, dit: DiTConfig, flow: FlowConfig, launch: LaunchConfig, data: LatentDataset,
               init: Checkpoint, tracking_cfg: TrackingConfig, parent_run: str) -> Checkpoint:
    """Supervised fine-tune on the best-scored clips (stage.top_fraction), resuming from the last pretraining stage."""
    return _train(stage, dit, flow, launch, data, init, tracking_cfg, parent_run)


@task(**_CACHE)
def preference(stage: StageConfig, dit: DiTConfig, flow: FlowConfig, launch: LaunchConfig, pairs: PreferencePairs,
               init: Checkpoint, tracking_cfg: TrackingConfig, parent_run: str) -> Checkpoint:
    """Preference optimisation (Flow-DPO, ``stage.objective: flow_dpo``) on the pairs, from the SFT checkpoint (the
    frozen reference)."""
    return _train(stage, dit, flow, launch, pairs, init, tracking_cfg, parent_run)


@dynamic(**defaults("orchestration"))
def pretrain(train: TrainConfig, data: LatentDataset, register: RegisterConfig, tracking_cfg: TrackingConfig,
             parent_run: str, launcher: Optional[TaskResources] = None) -> Curriculum:
    """The curriculum: one train_stage node per configured stage (``skip: true`` ones left out), each starting from
    the previous checkpoint, unless its ``init`` says scratch, the registered champion (a warm start: its version is
    resolved here, so a new champion is a new cache key) or a step folder."""
    check_stage_data([s for s in train.stages if not s.skip], local_path(data.folder))
    ckpts: List[Checkpoint] = []
    prev: Optional[Checkpoint] = None
    for stage in train.stages:
        if stage.skip:
            print(f"[pretrain] {stage.name}: skipped (skip: true)", flush=True)
            continue
        init_uri = ""
        if stage.init:
            prev = None
            init_uri = "" if stage.init == "scratch" else stage.init
        if init_uri == "champion":
            init_uri = _champion_uri(register, tracking_cfg)
            print(f"[pretrain] {stage.name}: warm start from "
                  f"{init_uri or 'scratch (no champion of ' + register.model_name + ' yet)'}", flush=True)
        prev = train_stage(stage=stage, dit=train.dit, flow=train.flow, launch=train.launch, data=data,
                           tracking_cfg=tracking_cfg, parent_run=parent_run, init=prev, init_uri=init_uri)
        if launcher is not None:   # resources.train_launcher of the config (tasks/resources.py)
            cast(Any, prev).with_overrides(**overrides(launcher))
        ckpts.append(prev)
    return curriculum(pretraining=ckpts, post_training=[])


def _champion_uri(register: RegisterConfig, tracking_cfg: TrackingConfig) -> str:
    """``models:/<name>/<version>`` of the current champion, "" before the first one."""
    import mlflow

    from tasks.register.registry import find_alias

    uri = tracking.tracking_uri(tracking_cfg.root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    champ = find_alias(register.model_name, register.champion_alias)
    return f"models:/{register.model_name}/{champ.version}" if champ is not None else ""


@task(**defaults("orchestration"))
def curriculum(pretraining: List[Checkpoint], post_training: List[Checkpoint]) -> Curriculum:
    """The stages in the order they trained; ``final`` is the last one."""
    stages = list(pretraining) + list(post_training)
    if not stages:
        raise ValueError("curriculum: no training stage")
    return Curriculum(stages=stages, final=stages[-1])
