"""The pipeline DAG and its launch plans. No business logic here.

    pyflyte run workflows/pipeline.py train_video_model --config configs/tiny.yaml            # local, in-process
    pyflyte run --remote workflows/pipeline.py train_video_model --config configs/mugv_10b.yaml  # a Flyte cluster

``train_video_model`` loads the config and opens the MLflow run; ``run_pipeline`` (a @dynamic) then creates the nodes
below, each with the requests, GPU type and image of its kind from ``resources:`` (tasks/resources.py).

raw videos -> curate -> compress (VAE + T5) -> pretrain stage 1 -> stage 2 ... -> SFT -> preference (Flow-DPO on
pairs) -> evaluate (vs the champion) -> register
"""
from __future__ import annotations

import os
from datetime import datetime
from typing import Optional

from flytekit import CronSchedule, LaunchPlan, dynamic, workflow
from flytekit.types.file import FlyteFile

from common.config import PipelineConfig
from tasks.compress.task import compress, fit_vae
from tasks.curate.task import curate, curate_shards, plan_curation, snapshot_inputs
from tasks.evaluate.task import evaluate
from tasks.lifecycle import fail_tracking, finish_tracking, load_pipeline_config, start_tracking
from tasks.preference.task import build_preference_pairs, pairs_source_hash
from tasks.register.task import current_champion, register
from tasks.resources import KINDS, defaults, overrides, with_launch_image
from tasks.train.task import curriculum, post_train, preference, pretrain


@workflow(on_failure=fail_tracking)   # a failed execution marks its MLflow parent run FAILED
def train_video_model(config: FlyteFile, kickoff_time: Optional[datetime] = None) -> str:
    """Raw footage to a registered, evaluated checkpoint. ``config`` is a YAML file (see configs/);
    ``kickoff_time`` is set by the weekly schedule (a manual run leaves it empty)."""
    cfg = load_pipeline_config(config=config)
    run = start_tracking(config=cfg, kickoff_time=kickoff_time)
    return run_pipeline(cfg=cfg, run=run)


@dynamic(**defaults("orchestration"))
def run_pipeline(cfg: PipelineConfig, run: str) -> str:
    """The DAG, built when the config is known so that every node gets the requests, GPU type and image of its kind
    from ``cfg.resources`` (``on``: flytekit ``with_overrides``, tasks/resources.py). Each node is cached as before."""
    on = {kind: overrides(getattr(cfg.resources, kind), cfg.train.launch)   # kind -> with_overrides arguments
          for kind in KINDS}   # (+ the shared volume of train.launch.volume_claim: folders pass by path)
    train = with_launch_image(cfg.train)   # train.launch.image "" -> the CUDA image's content-derived name
    shards = plan_curation(cfg=cfg.curate, inputs_fingerprint=snapshot_inputs(cfg=cfg.curate).with_overrides(
        **on["orchestration"]), tracking_cfg=cfg.tracking).with_overrides(**on["orchestration"])   # inputs -> shards
    manifest = curate(cfg=cfg.curate, shards=curate_shards(shard=shards).with_overrides(**on["curate_shard"]),
                      tracking_cfg=cfg.tracking, parent_run=run).with_overrides(**on["curate_merge"])
    # ^ map_task: one cached task per shard; then merge + report + MLflow "curate" run
    vae = fit_vae(cfg=cfg.compress, manifest=manifest, tracking_cfg=cfg.tracking,
                  parent_run=run).with_overrides(**on["fit_vae"])                  # fitted once, reused
    latents = compress(cfg=cfg.compress, manifest=manifest, tracking_cfg=cfg.tracking, parent_run=run,
                       vae=vae).with_overrides(**on["compress"])
    pretrained = pretrain(train=train, data=latents, register=cfg.register, tracking_cfg=cfg.tracking,
                          parent_run=run, launcher=cfg.resources.train_launcher).with_overrides(
                              **on["orchestration"])                                # Curriculum
    tuned = post_train(stage=train.post_train, dit=train.dit, flow=train.flow, launch=train.launch,
                       data=latents, init=pretrained.final, tracking_cfg=cfg.tracking,
                       parent_run=run).with_overrides(**on["train_launcher"])     # SFT
    pairs = build_preference_pairs(cfg=train.pairs, data=latents, tracking_cfg=cfg.tracking, parent_run=run,
                                   source_hash=pairs_source_hash(cfg=train.pairs).with_overrides(
                                       **on["orchestration"])).with_overrides(**on["preference_pairs"])
    aligned = preference(stage=train.preference, dit=train.dit, flow=train.flow, launch=train.launch,
                         pairs=pairs, init=tuned, tracking_cfg=cfg.tracking,
                         parent_run=run).with_overrides(**on["train_launcher"])   # Flow-DPO
    trained = curriculum(pretraining=pretrained.stages, post_training=[tuned, aligned]).with_overrides(
        **on["orchestration"])
    champion = current_champion(register=cfg.register, tracking_cfg=cfg.tracking,
                                candidate=trained.final).with_overrides(**on["orchestration"])
    report = evaluate(cfg=cfg.evaluate, dit=train.dit, flow=train.flow, data=latents, checkpoint=trained.final,
                      stages=trained.stages, register=cfg.register, tracking_cfg=cfg.tracking, parent_run=run,
                      champion=champion).with_overrides(**on["evaluate"])
    model = register(config=cfg, manifest=manifest, data=latents, checkpoint=trained.final, report=report,
                     parent_run=run, stages=trained.stages).with_overrides(**on["register"])
    return finish_tracking(config=cfg, parent_run=run, manifest=manifest, report=report,
                           model=model).with_overrides(**on["orchestration"])


# Weekly retraining on a cluster: the config file lives in object storage (VGEN_WEEKLY_CONFIG overrides it at
# registration). Declared here, activated with `pyflyte register` + `flytectl update launchplan --activate`.
weekly_retrain = LaunchPlan.get_or_create(
    train_video_model,
    name="train_video_model_weekly",
    schedule=CronSchedule(schedule="0 3 * * 1", kickoff_time_input_arg="kickoff_time"),   # Mondays 03:00 UTC
    default_inputs={"config": FlyteFile(os.environ.get("VGEN_WEEKLY_CONFIG", "s3://video-gen/configs/weekly.yaml"))},
)
