"""Typed pipeline configuration, loaded strictly from YAML; every name is imported from ``common.config``.

One module per section: ``curate.py`` (``curate:``), ``compress.py`` (``compress:``), ``train.py`` (``train:``: the
stages, post-training), ``cluster.py`` (``train.launch:``, ``resources:``), ``evaluate.py`` (``evaluate:``,
``register:``, ``tracking:``); here the ``PipelineConfig`` that holds them, its cross-section rules and the loader.
Defaults live in those dataclasses, once. ``load_config(path)`` rejects unknown keys and wrong types with the key's
path in the message (``"train.stages[1].tensor_parallel: expected int, got str"``). Cross-field rules are checked in
``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from common.config.cluster import LaunchConfig, ResourcesConfig, SecretEnv, TaskResources
from common.config.compress import CompressConfig, TextEncoderConfig
from common.config.curate import AestheticConfig, CaptionConfig, CurateConfig, Resolution
from common.config.evaluate import EvalConfig, GateConfig, GateMetric, RegisterConfig, TrackingConfig
from common.config.train import (
    ASPECT_TOLERANCE,
    TASKS,
    DataSelection,
    FlowConfig,
    PairsConfig,
    QualityRanking,
    StageConfig,
    TaskShare,
    TrainConfig,
    aspect_matches,
    check_stage_layout,
)
from common.hashing import sha256_json
from models.config import DiTConfig, VAEConfig

__all__ = [
    "AestheticConfig", "CaptionConfig", "Resolution", "CurateConfig",                       # curate.py
    "TextEncoderConfig", "CompressConfig",                                                  # compress.py
    "FlowConfig", "TASKS", "TaskShare", "QualityRanking", "ASPECT_TOLERANCE", "aspect_matches", "DataSelection",
    "StageConfig", "PairsConfig", "TrainConfig", "check_stage_layout",                      # train.py
    "SecretEnv", "LaunchConfig", "TaskResources", "ResourcesConfig",                        # cluster.py
    "EvalConfig", "GateMetric", "GateConfig", "RegisterConfig", "TrackingConfig",           # evaluate.py
    "DiTConfig", "VAEConfig",                                                               # models/config.py
    "PipelineConfig", "check_selection", "from_dict", "load_config", "to_dict", "config_hash",   # here
]


@dataclass
class PipelineConfig:
    name: str = "tiny"
    curate: CurateConfig = field(default_factory=CurateConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)   # per kind of Flyte task (cluster)

    def __post_init__(self) -> None:
        if self.compress.vae.latent_channels != self.train.dit.in_channels:
            raise ValueError(f"train.dit.in_channels ({self.train.dit.in_channels}) must equal "
                             f"compress.vae.latent_channels ({self.compress.vae.latent_channels})")
        if not self.compress.text.pretrained and self.compress.text.d_model != self.train.dit.caption_channels:
            raise ValueError(f"train.dit.caption_channels ({self.train.dit.caption_channels}) must equal "
                             f"compress.text.d_model ({self.compress.text.d_model})")
        if self.evaluate.num_frames % 8 != 1:
            raise ValueError(f"evaluate.num_frames must be 8k+1, got {self.evaluate.num_frames}")
        named = [(f"train.stages[{i}]", s) for i, s in enumerate(self.train.stages)]
        for where, stage in named + [("train.post_train", self.train.post_train)]:
            check_selection(stage, self.curate, where)


def check_selection(stage: StageConfig, curate: CurateConfig, where: str) -> None:
    """A stage's data selection against what curation and compression will produce (the config-time half; the
    pretrain task checks the LatentDataset itself before any stage runs): known resolution names, clip lengths
    curation cuts (or 1: images and key frames), aspect ratios some selected size has."""
    sel, resolutions = stage.data, curate.resolution_list
    known = [r.name for r in resolutions]
    missing = [r for r in sel.resolutions if r not in known]
    if missing:
        raise ValueError(f"{where}.data.resolutions ('{stage.name}'): {missing} not among curate.resolutions "
                         f"{known}")
    lengths = curate.frame_buckets
    bad = [f for f in sel.frames if f != 1 and f not in lengths]
    if bad:
        raise ValueError(f"{where}.data.frames ('{stage.name}'): {bad} not among the clip lengths curation cuts "
                         f"{lengths} (curate.clip_frames, curate.bucket_frames) or 1 (images)")
    sizes = [hw for r in resolutions if not sel.resolutions or r.name in sel.resolutions for hw in r.sizes]
    for a in sel.aspect_ratios:
        if not any(aspect_matches(h, w, a) for h, w in sizes):
            raise ValueError(f"{where}.data.aspect_ratios ('{stage.name}'): no selected size has aspect {a} "
                             f"(sizes {sizes})")


# ---------------------------------------------------------------- strict loading

def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
    """The pipeline config of a YAML file; every problem is one ValueError/FileNotFoundError naming the file (and the
    line and column of a YAML syntax error, the key of a wrong value)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p} (start from configs/tiny.yaml)")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise ValueError(f"{p}: the file is empty; a config names at least the pipeline (`name: ...`) and lists what "
                         "differs from the defaults (configs/tiny.yaml shows every key)")
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level must be a mapping of sections (name, curate, compress, train, ...), "
                         f"got a {type(data).__name__}")
    try:
        return from_dict(PipelineConfig, data)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from None


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """Stable content hash of a config (sha256 of canonical JSON), first 16 hex digits."""
    return sha256_json(to_dict(cfg), n=16)
