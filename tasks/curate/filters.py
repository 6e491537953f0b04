"""Clip quality filters, measured on source-resolution frames (docs/mugv.md §1.1).

- sharpness: mean over sampled frames of the OpenCV Laplacian variance of the grayscale frame; kept in
  [sharpness_min, sharpness_max] (the upper bound removes noise and over-texture).
- brightness: mean luma (BT.601 grayscale) in [0, 1]; kept in [brightness_min, brightness_max].
- motion: mean optical-flow magnitude on three frame pairs (``motion.py``), kept in [motion_min, motion_max].
- text_area: fraction of the frame covered by persistent text-like regions (``text_overlay.py``), <= text_area_max.
- aesthetic: LAION-style predictor on CLIP features (``aesthetic.py``), >= aesthetic.min_score; only when a scorer is
  given (NaN and not checked otherwise).
- score: the ranking score, higher is better: log-sharpness normalised to [0, 1] over the sharpness band
  (0 at sharpness_min, 1 at sharpness_max, clipped).

Each filter returns a ``FilterResult`` whose ``reason`` names the measured value ("sharpness 12.3 < 200") and whose
``key`` is the value-free form used to count reasons ("sharpness < 200"). Brightness is checked before sharpness:
a black frame is also blurry, and "too dark" is the more useful reason. Every filter is measured on every clip (the
manifest keeps all scores for histograms); the reason is the first failure in the order brightness, sharpness,
motion, text, aesthetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import cv2
import numpy as np

from common.config import CurateConfig

NUM_SAMPLED_FRAMES = 5


@dataclass(frozen=True)
class FilterResult:
    """Outcome of one filter: measured value, pass/fail, human reason and countable reason key ("" when passed)."""
    name: str
    value: float
    passed: bool
    reason: str = ""
    key: str = ""


@dataclass(frozen=True)
class QualityReport:
    """All filters for one clip window, plus the ranking score."""
    sharpness: float
    brightness: float
    score: float
    results: List[FilterResult]
    motion: float = float("nan")
    text_area: float = float("nan")
    aesthetic: float = float("nan")

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def first_failure(self) -> FilterResult | None:
        return next((r for r in self.results if not r.passed), None)


def sample_indices(num_frames: int, k: int = NUM_SAMPLED_FRAMES) -> List[int]:
    """Up to ``k`` evenly spaced frame indices in [0, num_frames), first and last included."""
    if num_frames < 1:
        raise ValueError(f"sample_indices: need num_frames >= 1, got {num_frames}")
    return sorted({int(round(i)) for i in np.linspace(0, num_frames - 1, min(k, num_frames))})


def _gray_HW(frame_HWC: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame_HWC), cv2.COLOR_RGB2GRAY)


def _sampled_gray(frames_THWC: np.ndarray) -> List[np.ndarray]:
    return [_gray_HW(frames_THWC[i]) for i in sample_indices(len(frames_THWC))]


def _laplacian_var(gray_HW: np.ndarray) -> float:
    # int16 holds the 3x3 Laplacian of uint8 exactly (|value| <= 4 * 255), and meanStdDev sums in double: the
    # variance of the float64 Laplacian, at half the cost
    _, std = cv2.meanStdDev(cv2.Laplacian(gray_HW, cv2.CV_16S))
    return float(std[0, 0]) ** 2


def sharpness_brightness(frames_THWC: np.ndarray) -> Tuple[float, float]:
    """(sharpness, brightness) of uint8 RGB frames [T,H,W,3] from one grayscale conversion of the sampled frames:
    the mean Laplacian variance, and the mean luma in [0, 1]."""
    grays = _sampled_gray(frames_THWC)
    return float(np.mean([_laplacian_var(g) for g in grays])), float(np.mean([g.mean() for g in grays]) / 255.0)


def _band(name: str, value: float, lo: float, hi: float, fmt: str) -> FilterResult:
    if value < lo:
        return FilterResult(name, value, False, f"{name} {value:{fmt}} < {lo:g}", f"{name} < {lo:g}")
    if value > hi:
        return FilterResult(name, value, False, f"{name} {value:{fmt}} > {hi:g}", f"{name} > {hi:g}")
    return FilterResult(name, value, True)


def sharpness_filter(value: float, cfg: CurateConfig) -> FilterResult:
    return _band("sharpness", value, cfg.sharpness_min, cfg.sharpness_max, ".1f")


def brightness_filter(value: float, cfg: CurateConfig) -> FilterResult:
    return _band("brightness", value, cfg.brightness_min, cfg.brightness_max, ".3f")


def quality_score(sharpness_value: float, cfg: CurateConfig) -> float:
    """Log-sharpness normalised over [sharpness_min, sharpness_max] and clipped to [0, 1]."""
    lo, hi = math.log(max(cfg.sharpness_min, 1e-6)), math.log(max(cfg.sharpness_max, 1e-6))
    if hi <= lo:
        return 1.0 if sharpness_value >= cfg.sharpness_min else 0.0
    return float(min(1.0, max(0.0, (math.log(max(sharpness_value, 1e-6)) - lo) / (hi - lo))))


def assess(frames_THWC: np.ndarray, cfg: CurateConfig, scorer: Optional[Any] = None,
           image: bool = False) -> QualityReport:
    """Run every filter on source-resolution frames uint8 [T,H,W,3] of one clip window (``scorer``: an
    ``aesthetic.AestheticScorer``, or None to skip the aesthetic filter). ``image``: one frame (an image file or a
    key frame): every filter but motion, which is NaN."""
    from tasks.curate.motion import motion_score
    from tasks.curate.text_overlay import text_area

    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3 or len(frames_THWC) == 0:
        raise ValueError(f"assess: need uint8 [T,H,W,3] with T >= 1, got {frames_THWC.shape}")
    sharp, bright = sharpness_brightness(frames_THWC)
    motion = float("nan") if image else motion_score(frames_THWC, cfg.motion_height)
    text = text_area(frames_THWC)
    results = [brightness_filter(bright, cfg), sharpness_filter(sharp, cfg)]
    if not image:
        results.append(_band("motion", motion, cfg.motion_min, cfg.motion_max, ".2f"))
    results.append(_band("text_area", text, 0.0, cfg.text_area_max, ".3f"))
    aes = float("nan")
    if scorer is not None:
        aes = scorer.score(frames_THWC)
        results.append(_band("aesthetic", aes, cfg.aesthetic.min_score, float("inf"), ".2f"))
    return QualityReport(sharpness=sharp, brightness=bright, score=quality_score(sharp, cfg), results=results,
                         motion=motion, text_area=text, aesthetic=aes)
