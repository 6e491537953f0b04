"""The pipeline DAG and its launch plans. No business logic here.

    pyflyte run workflows/pipeline.py train_video_model --config configs/tiny.yaml            # local, in-process
    pyflyte run --remote workflows/pipeline.py train_video_model --config configs/mugv_10b.yaml  # a Flyte cluster

raw videos -> curate -> compress (VAE + T5) -> pretrain stage 1 -> stage 2 ... -> SFT -> preference (Flow-DPO on
pairs) -> evaluate (vs the champion) -> register
"""
from __future__ import annotations

import os
from datetime import datetime
from typing import Optional

from flytekit import CronSchedule, LaunchPlan, workflow
from flytekit.types.file import FlyteFile

from tasks.compress.task import compress, fit_vae
from tasks.curate.task import curate, curate_shards, plan_curation, snapshot_inputs
from tasks.evaluate.task import evaluate
from tasks.lifecycle import fail_tracking, finish_tracking, load_pipeline_config, start_tracking
from tasks.preference.task import build_preference_pairs, pairs_source_hash
from tasks.register.task import current_champion, register
from tasks.train.task import curriculum, post_train, preference, pretrain


@workflow(on_failure=fail_tracking)   # a failed execution marks its MLflow parent run FAILED
def train_video_model(config: FlyteFile, kickoff_time: Optional[datetime] = None) -> str:
    """Raw footage to a registered, evaluated checkpoint. ``config`` is a YAML file (see configs/);
    ``kickoff_time`` is set by the weekly schedule (a manual run leaves it empty)."""
    cfg = load_pipeline_config(config=config)
    run = start_tracking(config=cfg, kickoff_time=kickoff_time)
    shards = plan_curation(cfg=cfg.curate, inputs_fingerprint=snapshot_inputs(cfg=cfg.curate),
                           tracking_cfg=cfg.tracking)                      # inputs cut into shards
    manifest = curate(cfg=cfg.curate, shards=curate_shards(shard=shards),  # map_task: one cached task per shard
                      tracking_cfg=cfg.tracking, parent_run=run)           # merge + report + MLflow "curate" run
    vae = fit_vae(cfg=cfg.compress, manifest=manifest, tracking_cfg=cfg.tracking, parent_run=run)  # fitted once
    latents = compress(cfg=cfg.compress, manifest=manifest, tracking_cfg=cfg.tracking, parent_run=run, vae=vae)
    pretrained = pretrain(train=cfg.train, data=latents, register=cfg.register, tracking_cfg=cfg.tracking,
                          parent_run=run)                                   # Curriculum
    tuned = post_train(stage=cfg.train.post_train, dit=cfg.train.dit, flow=cfg.train.flow, launch=cfg.train.launch,
                       data=latents, init=pretrained.final, tracking_cfg=cfg.tracking, parent_run=run)   # SFT
    pairs = build_preference_pairs(cfg=cfg.train.pairs, data=latents, tracking_cfg=cfg.tracking, parent_run=run,
                                   source_hash=pairs_source_hash(cfg=cfg.train.pairs))
    aligned = preference(stage=cfg.train.preference, dit=cfg.train.dit, flow=cfg.train.flow, launch=cfg.train.launch,
                         pairs=pairs, init=tuned, tracking_cfg=cfg.tracking, parent_run=run)      # Flow-DPO
    trained = curriculum(pretraining=pretrained.stages, post_training=[tuned, aligned])
    report = evaluate(cfg=cfg.evaluate, dit=cfg.train.dit, flow=cfg.train.flow, data=latents, checkpoint=trained.final,
                      stages=trained.stages, register=cfg.register, tracking_cfg=cfg.tracking, parent_run=run,
                      champion=current_champion(register=cfg.register, tracking_cfg=cfg.tracking,
                                                candidate=trained.final))
    model = register(config=cfg, manifest=manifest, data=latents, checkpoint=trained.final, report=report,
                     parent_run=run, stages=trained.stages)
    return finish_tracking(config=cfg, parent_run=run, manifest=manifest, report=report, model=model)


# Weekly retraining on a cluster: the config file lives in object storage (VGEN_WEEKLY_CONFIG overrides it at
# registration). Declared here, activated with `pyflyte register` + `flytectl update launchplan --activate`.
weekly_retrain = LaunchPlan.get_or_create(
    train_video_model,
    name="train_video_model_weekly",
    schedule=CronSchedule(schedule="0 3 * * 1", kickoff_time_input_arg="kickoff_time"),   # Mondays 03:00 UTC
    default_inputs={"config": FlyteFile(os.environ.get("VGEN_WEEKLY_CONFIG", "s3://video-gen/configs/weekly.yaml"))},
)
