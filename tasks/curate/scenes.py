"""Scene splitting on already-decoded frames: hard cuts (PySceneDetect content + adaptive detectors) and gradual
transitions (fades, dissolves).

Frames are first downscaled to at most ``analysis_width`` columns (as PySceneDetect's own ``downscale`` does).
- Hard cuts: every frame goes (RGB -> BGR) to ``ContentDetector`` and ``AdaptiveDetector`` ``process_frame``
  (SUPPRESS flash filter, so no end-of-stream flush is needed); a cut is the first frame of the new scene, the union
  of both detectors' cuts is used, and cuts closer than ``min_scene_len`` frames are merged.
- Gradual transitions (the report pairs PySceneDetect with a Color-Struct SVM for these; this is a model-free test):
  over a window [a, b] of ``gradual_window`` frames, a fade or dissolve makes every middle frame a blend
  ``alpha * F(a) + (1 - alpha) * F(b)`` with alpha falling steadily from 1 to 0. A window is a transition when
  ``mean|F(b) - F(a)| >= gradual_min_change``, the blend fit's mean residual is <= ``gradual_max_residual`` of that
  change, and alpha never jumps by more than 0.5 in one frame (that would be a hard cut). Overlapping windows merge
  into one transition [start, end); its frames belong to no scene.
Scenes are half-open [start, end) ranges between cuts and transitions. ``frame_changes`` gives the per-frame mean
HSV change that ``curate`` uses to drop clips that still contain a cut.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode
from scenedetect.detector import FlashFilter

from common.config import CurateConfig

# Shorter than PySceneDetect's default (15) so that short shots are found and reported as "scene too short" instead
# of being merged into the neighbouring shot.
MIN_SCENE_LEN = 8
GRADUAL_SIZE = 48     # columns of the frames the blend test runs on


@dataclass
class SceneAnalysis:
    cuts: List[int] = field(default_factory=list)                   # first frames of new scenes (hard cuts)
    transitions: List[Tuple[int, int]] = field(default_factory=list)  # gradual transitions [start, end)
    scenes: List[Tuple[int, int]] = field(default_factory=list)       # [start, end) ranges outside transitions
    changes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [T] mean HSV change from the previous frame


def downscale(frames_THWC: np.ndarray, width: int) -> np.ndarray:
    t, h, w, _ = frames_THWC.shape
    if w <= width:
        return frames_THWC
    size = (width, max(2, round(h * width / w)))
    # INTER_LINEAR (as PySceneDetect's own downscale): several times cheaper than INTER_AREA, fine for analysis
    return np.stack([cv2.resize(np.ascontiguousarray(f), size, interpolation=cv2.INTER_LINEAR) for f in frames_THWC])


def detect_cuts(frames_THWC: np.ndarray, fps: float, threshold: float = 27.0, min_scene_len: int = MIN_SCENE_LEN,
                adaptive_threshold: float = 3.0) -> List[int]:
    """Frame indices where a new scene starts (never 0), from uint8 RGB frames [T,H,W,3]."""
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"detect_cuts: need [T,H,W,3] frames, got {frames_THWC.shape}")
    if fps <= 0:
        raise ValueError(f"detect_cuts: fps must be > 0, got {fps}")
    detectors = [ContentDetector(threshold=threshold, min_scene_len=min_scene_len,
                                 filter_mode=FlashFilter.Mode.SUPPRESS)]
    if adaptive_threshold > 0:
        detectors.append(AdaptiveDetector(adaptive_threshold=adaptive_threshold, min_scene_len=min_scene_len))
    found: List[int] = []
    for i, frame_HWC in enumerate(frames_THWC):
        bgr = np.ascontiguousarray(frame_HWC[..., ::-1])
        for det in detectors:
            for tc in det.process_frame(FrameTimecode(i, fps=fps), bgr):
                if 0 < tc.frame_num < len(frames_THWC):
                    found.append(int(tc.frame_num))
    merged: List[int] = []
    for c in sorted(set(found)):
        if not merged or c - merged[-1] >= min_scene_len:
            merged.append(c)
    return merged


def frame_changes(frames_THWC: np.ndarray) -> np.ndarray:
    """[T] mean absolute HSV difference (0-255 scale, hue doubled) to the previous frame; 0 for frame 0."""
    hsv = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2HSV) for f in frames_THWC]).astype(np.float32)
    hsv[..., 0] *= 255.0 / 180.0
    out = np.zeros(len(frames_THWC), np.float32)
    if len(frames_THWC) > 1:
        out[1:] = np.abs(np.diff(hsv, axis=0)).mean(axis=(1, 2, 3))
    return out


def detect_gradual(frames_THWC: np.ndarray, window: int = 8, min_change: float = 30.0,
                   max_residual: float = 0.25) -> List[Tuple[int, int]]:
    """Fade/dissolve ranges [start, end) by the blend test in the module docstring."""
    t = len(frames_THWC)
    if t <= window:
        return []
    x = downscale(frames_THWC, GRADUAL_SIZE).reshape(t, -1).astype(np.float32)   # (T, N)
    flagged: List[Tuple[int, int]] = []
    for a in range(0, t - window):
        b = a + window
        d = x[a] - x[b]
        change = float(np.abs(d).mean())
        if change < min_change:
            continue
        mid = x[a + 1:b] - x[b]                                  # (window-1, N)
        alpha = mid @ d / float(d @ d)
        resid = np.abs(mid - alpha[:, None] * d[None]).mean(axis=1)
        steps = -np.diff(np.concatenate([[1.0], alpha, [0.0]]))
        if resid.max() <= max_residual * change and steps.max() <= 0.5 and steps.min() >= -0.15:
            flagged.append((a, b + 1))
    merged: List[Tuple[int, int]] = []
    for s, e in flagged:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def split_scenes(cuts: List[int], transitions: List[Tuple[int, int]], num_frames: int) -> List[Tuple[int, int]]:
    """[start, end) ranges of [0, num_frames) split at ``cuts`` and with the ``transitions`` frames removed."""
    bounds = sorted({0, num_frames, *[c for c in cuts if 0 < c < num_frames]})
    scenes = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces = [(a, b)]
        for ts, te in transitions:
            pieces = [p for s, e in pieces for p in ((s, min(e, ts)), (max(s, te), e)) if p[1] > p[0]] \
                if any(s < te and ts < e for s, e in pieces) else pieces
        scenes.extend(pieces)
    return scenes


def cuts_to_scenes(cuts: List[int], num_frames: int) -> List[Tuple[int, int]]:
    """[start, end) ranges covering [0, num_frames) split at ``cuts``."""
    return split_scenes(cuts, [], num_frames)


def analyse(frames_THWC: np.ndarray, fps: float, cfg: CurateConfig,
            min_scene_len: int = MIN_SCENE_LEN) -> SceneAnalysis:
    """Cuts, gradual transitions, scenes and per-frame changes of decoded frames uint8 RGB [T,H,W,3], with the
    detector settings of ``cfg`` (scene_threshold, adaptive_threshold, analysis_width, gradual_*)."""
    small = downscale(frames_THWC, cfg.analysis_width)
    cuts = detect_cuts(small, fps, cfg.scene_threshold, min_scene_len, cfg.adaptive_threshold)
    transitions = detect_gradual(small, cfg.gradual_window, cfg.gradual_min_change, cfg.gradual_max_residual)
    cuts = [c for c in cuts if not any(s <= c < e for s, e in transitions)]
    tiny = downscale(small, GRADUAL_SIZE)   # the cut check's mean HSV change needs no detail
    return SceneAnalysis(cuts, transitions, split_scenes(cuts, transitions, len(frames_THWC)), frame_changes(tiny))


def detect_scenes(frames_THWC: np.ndarray, fps: float, threshold: float = 27.0,
                  min_scene_len: int = MIN_SCENE_LEN) -> List[Tuple[int, int]]:
    """Scene [start, end) frame ranges of decoded frames uint8 RGB [T,H,W,3] (default detector settings but the
    content threshold)."""
    return analyse(frames_THWC, fps, CurateConfig(scene_threshold=threshold), min_scene_len).scenes


def detect_scenes_in_file(path: str | Path, threshold: float = 27.0,
                          min_scene_len: int = MIN_SCENE_LEN) -> List[Tuple[int, int]]:
    """Decode ``path`` (see decode.read_video) and split it into scenes."""
    from tasks.curate.decode import read_video

    frames_THWC, fps, _ = read_video(path)
    return detect_scenes(frames_THWC, fps, threshold, min_scene_len)
