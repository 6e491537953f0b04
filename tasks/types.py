"""Typed artifacts that flow between tasks (formats: docs/artifacts.md).

Each holds its folder, its content hash, the hashes of what it was made from, and the config that made it, so the
lineage (raw videos -> clips -> latents -> checkpoints -> samples -> model version) is in the types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from flytekit.types.directory import FlyteDirectory

from common.config import CompressConfig, CurateConfig, EvalConfig, StageConfig


@dataclass
class ClipManifest:
    folder: FlyteDirectory            # manifest.parquet, clips/, summary.json
    content_hash: str
    source_hashes: List[str]          # one per raw input video that decoded
    inputs: int
    kept: int
    rejected: int
    failed: int
    config: CurateConfig = field(default_factory=CurateConfig)
    processed: int = 0                # inputs decoded by this run (the rest were reused from the per-input store)
    reused: int = 0


@dataclass
class LatentDataset:
    folder: FlyteDirectory            # shards, index.parquet, meta.json, vae/, text_encoder/
    content_hash: str
    manifest_hash: str                # the ClipManifest it encodes
    vae_identity: str                 # sha of the VAE weights used
    text_encoder_identity: str
    num_train: int
    num_val: int
    config: CompressConfig = field(default_factory=CompressConfig)


@dataclass
class Checkpoint:
    folder: FlyteDirectory            # step_XXXXXXXX/ folders + latest + metrics.jsonl
    stage: str
    step: int
    content_hash: str                 # hash of the final step folder
    config_hash: str                  # hash of (stage, dit, flow) config
    data_hash: str                    # LatentDataset it trained on
    parent_hash: str                  # checkpoint it started from ("" = from scratch)
    mlflow_run_id: str
    final_loss: float
    config: StageConfig = field(default_factory=StageConfig)


@dataclass
class EvalReport:
    folder: FlyteDirectory            # report.html, metrics.json, samples/*.mp4
    metrics: Dict[str, float]
    checkpoint_hash: str
    mlflow_run_id: str
    config: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ModelVersion:
    name: str
    version: str
    alias: str
    checkpoint_hash: str
    mlflow_run_id: str
