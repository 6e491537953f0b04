"""Typed artifacts that flow between tasks (formats: docs/artifacts.md).

Each holds its folder, its content hash, the hashes of what it was made from, and the config that made it, so the
lineage (raw videos -> clips -> latents -> checkpoints -> samples -> model version) is in the types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from flytekit.types.directory import FlyteDirectory

from common.config import CompressConfig, CurateConfig, EvalConfig, PairsConfig, StageConfig


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
class VAEModel:
    """The video VAE compression encodes with (docs/artifacts.md, "VAE folder"): fitted once on the clips of the
    first manifest it saw (or imported from MUG-V's vae.pt) and reused until ``compress.vae_refit`` is raised."""
    folder: FlyteDirectory            # vae.safetensors, config.json, meta.json
    identity: str                     # sha256 of the weights, first 16 hex digits (= LatentDataset.vae_identity)
    trained_steps: int                # 0: random init or imported
    random_init: bool
    config: CompressConfig = field(default_factory=CompressConfig)
    fit_manifest_hash: str = ""       # the ClipManifest whose kept clips it was fitted on ("" when none was read)


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
class PreferencePairs:
    folder: FlyteDirectory            # a LatentDataset folder of the pairs' clips + pairs.parquet + summary.json
    content_hash: str
    data_hash: str                    # the LatentDataset it was built from (its VAE, text encoder, latent space)
    num_pairs: int
    labels: str                       # "auto" (corrupted held-in clips, no human labels) | "human" (a pair table)
    dropped: int                      # table rows (auto: train clips) that gave no pair; reasons in summary.json
    config: PairsConfig = field(default_factory=PairsConfig)
    source_hash: str = ""             # fingerprint of the pair table and its videos ("" for auto)


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
class Curriculum:
    """The checkpoints of every training stage, in the order they trained; ``final`` is the last."""
    stages: List[Checkpoint]
    final: Checkpoint


@dataclass
class EvalReport:
    folder: FlyteDirectory            # report.html, metrics.json, loss curves, samples/ (docs/evaluation.md)
    metrics: Dict[str, float]         # the candidate's EMA weights, finite values by metric name
    checkpoint_hash: str
    mlflow_run_id: str
    config: EvalConfig = field(default_factory=EvalConfig)
    suite_hash: str = ""              # reports compare only when their suite hashes match (docs/evaluation.md)
    directions: Dict[str, str] = field(default_factory=dict)        # metric -> "higher" | "lower" (is better)
    raw_metrics: Dict[str, float] = field(default_factory=dict)     # the same checkpoint's raw (non-EMA) weights
    champion_version: str = ""        # the registered champion compared against ("" = none: the first model)
    champion_metrics: Dict[str, float] = field(default_factory=dict)   # the champion on this same suite
    deltas: Dict[str, float] = field(default_factory=dict)          # candidate - champion


@dataclass
class ModelVersion:
    name: str
    version: str
    alias: str
    checkpoint_hash: str
    mlflow_run_id: str
