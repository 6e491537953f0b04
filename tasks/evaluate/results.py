"""What an evaluation produces, shared by the evaluator and the report: one model's figures and samples, the
champion's downloaded files, and the whole outcome."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from tasks.evaluate.metrics import Comparison, Metric
from tasks.evaluate.suite import Suite


@dataclass
class ModelEval:
    """One model's figures on the suite and its samples (case key -> uint8 [T, H, W, 3])."""
    label: str
    metrics: Dict[str, Metric]
    samples: Dict[str, np.ndarray] = field(default_factory=dict)

    def values(self) -> Dict[str, float]:
        return {k: m.value for k, m in self.metrics.items()}


@dataclass
class ChampionFiles:
    """A registered champion, downloaded: its step folder (model/ema.safetensors + meta.json) and its codecs."""
    version: str
    step_dir: Path
    codecs_dir: Path
    suite_hash: str = ""                                   # the suite it was evaluated on when registered
    metrics: Dict[str, float] = field(default_factory=dict)   # its registered metrics (then)


@dataclass
class EvalOutcome:
    suite: Suite
    metrics: Dict[str, Metric]                             # candidate, EMA weights: the main table
    raw: Dict[str, Metric]                                 # candidate, raw weights ({} if not evaluated)
    champion: Optional[ModelEval]
    champion_files: Optional[ChampionFiles]
    comparison: List[Comparison]                           # champion vs candidate ([] without a champion)
    files: Dict[str, str] = field(default_factory=dict)    # name -> path under out_dir

    @property
    def flat(self) -> Dict[str, float]:
        """Finite EMA values by name (EvalReport.metrics)."""
        return finite(self.metrics)


def finite(d: Dict[str, Metric]) -> Dict[str, float]:
    return {k: m.value for k, m in d.items() if math.isfinite(m.value)}


def json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
