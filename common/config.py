"""Typed pipeline configuration, loaded strictly from YAML.

Defaults live here, once. ``load_config(path)`` rejects unknown keys and wrong types with the key's path in the
message (``"train.stages[1].tensor_parallel: expected int, got str"``). Cross-field rules are checked in
``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from models.config import DiTConfig, VAEConfig


@dataclass
class CurateConfig:
    input_uri: str = "data/demo"          # a folder, or s3://bucket/prefix (read with the minio client)
    clip_frames: int = 17                 # frames per clip; 8k+1 so the VAE's first frame is an image latent
    frame_stride: int = 1                 # keep every n-th source frame
    max_clips_per_scene: int = 2
    height: int = 64                      # output clip size (center crop to this aspect, then resize)
    width: int = 64
    scene_threshold: float = 27.0         # PySceneDetect ContentDetector threshold (its default)
    sharpness_min: float = 200.0          # Laplacian variance bounds, MUG-V report §1.1 (on source frames)
    sharpness_max: float = 2000.0
    brightness_min: float = 0.05          # mean luma in [0, 1]; black frames are rejected
    brightness_max: float = 0.95
    default_caption: str = "a video"      # used when no sidecar <video>.txt exists

    def __post_init__(self) -> None:
        if self.clip_frames % 8 != 1:
            raise ValueError(f"curate.clip_frames must be 8k+1 (e.g. 17, 33), got {self.clip_frames}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"curate.height/width must be multiples of 16 (VAE x8, DiT patch 2), got {self.height}x{self.width}")
        if self.sharpness_min > self.sharpness_max:
            raise ValueError("curate.sharpness_min must be <= curate.sharpness_max")
        if self.frame_stride < 1 or self.max_clips_per_scene < 1:
            raise ValueError("curate.frame_stride and curate.max_clips_per_scene must be >= 1")


@dataclass
class TextEncoderConfig:
    pretrained: str = ""       # local dir or hub id of a T5 encoder (cluster: DeepFloyd/t5-v1_1-xxl); "" = tiny random
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128
    max_length: int = 32       # MUG-V: 300
    seed: int = 0


@dataclass
class CompressConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_pretrained: str = ""   # path to VAE weights; "" = build from config and train briefly on the clips
    vae_train_steps: int = 40  # 0 = keep random init (recorded in the LatentDataset identity)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    holdout_fraction: float = 0.25   # clips held out for evaluation, chosen by clip-id hash
    shard_size: int = 64             # samples per safetensors shard
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"compress.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass
class FlowConfig:
    """Rectified flow as MUG-V trains it (spec §4): t ~ 1000*sigmoid(N(loc, scale)), resolution shift."""
    t_loc: float = 0.0
    t_scale: float = 1.0
    use_shift: bool = True


@dataclass
class StageConfig:
    name: str = "stage1"
    steps: int = 10
    lr: float = 3e-4            # tiny model from scratch; the released MUG-V fine-tune uses 1e-5 (spec §5.2)
    warmup_steps: int = 2
    micro_batch_size: int = 2   # per data-parallel rank
    tensor_parallel: int = 1
    data_parallel: int = 2
    nnodes: int = 1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    checkpoint_interval: int = 5
    keep_checkpoints: int = 2
    top_fraction: float = 1.0   # train on the best-scored fraction of clips (post-training uses < 1)
    seed: int = 1234

    def __post_init__(self) -> None:
        for k in ("steps", "micro_batch_size", "tensor_parallel", "data_parallel", "nnodes", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, k) < 1:
                raise ValueError(f"stage '{self.name}': {k} must be >= 1, got {getattr(self, k)}")
        if (self.tensor_parallel * self.data_parallel) % self.nnodes:
            raise ValueError(f"stage '{self.name}': tensor_parallel*data_parallel must be divisible by nnodes")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"stage '{self.name}': top_fraction must be in (0, 1], got {self.top_fraction}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.data_parallel

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes


@dataclass
class LaunchConfig:
    scheduler: str = "local_cwd"       # "local_cwd" (this machine) or "kubernetes" (Volcano)
    image: str = "ghcr.io/video-gen/trainer:latest"   # used by kubernetes only
    queue: str = "default"             # Volcano queue
    namespace: str = "default"
    cpu: int = 2                       # per replica (node) on kubernetes
    gpu: int = 0
    memory_mb: int = 8192
    timeout_s: int = 1800              # a stage that runs longer is stopped and reported

    def __post_init__(self) -> None:
        if self.scheduler not in ("local_cwd", "kubernetes"):
            raise ValueError(f"train.launch.scheduler must be 'local_cwd' or 'kubernetes', got '{self.scheduler}'")


@dataclass
class TrainConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    stages: List[StageConfig] = field(default_factory=lambda: [
        StageConfig(name="stage1_dp2", data_parallel=2, tensor_parallel=1),
        StageConfig(name="stage2_tp2", data_parallel=1, tensor_parallel=2),
    ])
    post_train: StageConfig = field(default_factory=lambda: StageConfig(
        name="post_train_sft", steps=5, lr=1e-4, warmup_steps=0, top_fraction=0.5))
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("train.stages must list at least one stage")
        names = [s.name for s in self.stages] + [self.post_train.name]
        if len(set(names)) != len(names):
            raise ValueError(f"train.stages: stage names must be unique, got {names}")
        for i, s in enumerate(self.stages + [self.post_train]):
            where = f"train.stages[{i}]" if i < len(self.stages) else "train.post_train"
            if self.dit.hidden_size % s.tensor_parallel or self.dit.num_heads % s.tensor_parallel:
                raise ValueError(f"{where}.tensor_parallel ({s.tensor_parallel}) must divide dit.num_heads "
                                 f"({self.dit.num_heads}) and dit.hidden_size")


@dataclass
class EvalConfig:
    prompts: List[str] = field(default_factory=lambda: [
        "a red square moving across a blue background", "a calm landscape with slow camera motion"])
    sample_steps: int = 8          # Euler steps (MUG-V inference: 25)
    cfg_scale: float = 4.0         # MUG-V inference default
    num_frames: int = 17
    seed: int = 42
    fps: int = 8


@dataclass
class RegisterConfig:
    model_name: str = "video-dit-tiny"
    alias: str = "candidate"


@dataclass
class TrackingConfig:
    experiment: str = "video-gen"
    root: str = "runs"   # SQLite store + artifacts go here when MLFLOW_TRACKING_URI is not set


@dataclass
class PipelineConfig:
    name: str = "tiny"
    curate: CurateConfig = field(default_factory=CurateConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.compress.vae.latent_channels != self.train.dit.in_channels:
            raise ValueError(f"train.dit.in_channels ({self.train.dit.in_channels}) must equal "
                             f"compress.vae.latent_channels ({self.compress.vae.latent_channels})")
        if not self.compress.text.pretrained and self.compress.text.d_model != self.train.dit.caption_channels:
            raise ValueError(f"train.dit.caption_channels ({self.train.dit.caption_channels}) must equal "
                             f"compress.text.d_model ({self.compress.text.d_model})")
        if self.evaluate.num_frames % 8 != 1:
            raise ValueError(f"evaluate.num_frames must be 8k+1, got {self.evaluate.num_frames}")


# ---------------------------------------------------------------- strict loading

def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{path or '<root>'}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ValueError(f"{path}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
        return value
    raise TypeError(f"{path}: unsupported config type {tp}")


def from_dict(cls: type, data: Dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ValueError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"{where}{unknown[0]}: unknown config key (valid keys: {', '.join(sorted(fields))})")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path and not str(e).startswith(path) else str(e)) from None


def load_config(path: str | Path) -> PipelineConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level must be a mapping")
    return from_dict(PipelineConfig, data)


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """Stable content hash of a config (sha256 of canonical JSON), first 16 hex digits."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
