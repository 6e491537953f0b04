"""Motion amplitude: mean optical-flow magnitude on three frame pairs (docs/mugv.md §1.1: kept in [1, 20]).

The report uses RAFT; here OpenCV Farnebäck (no weights, CPU) on grayscale frames resized to ``motion_height``
(aspect kept; Open-Sora measures flow at 320x576). Pairs are consecutive clip frames at 1/4, 1/2 and 3/4 of the
clip. The magnitude is in pixels of the resized frame, per clip frame step.
"""
from __future__ import annotations

from typing import List, Tuple

import cv2
import numpy as np

NUM_PAIRS = 3


def frame_pairs(num_frames: int, k: int = NUM_PAIRS) -> List[Tuple[int, int]]:
    """Up to ``k`` pairs (i, i+1) centred at (j+1)/(k+1) of the clip."""
    if num_frames < 2:
        return []
    starts = sorted({min(num_frames - 2, int(num_frames * (j + 1) / (k + 1))) for j in range(k)})
    return [(s, s + 1) for s in starts]


def _gray(frame_HWC: np.ndarray, height: int) -> np.ndarray:
    h, w = frame_HWC.shape[:2]
    f = np.ascontiguousarray(frame_HWC)
    if h != height:   # resize first (fewer pixels to convert); INTER_LINEAR: the flow needs no anti-aliasing
        f = cv2.resize(f, (max(8, round(w * height / h)), height), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)


def flow_magnitude(a_HWC: np.ndarray, b_HWC: np.ndarray, height: int) -> float:
    """Mean Farnebäck flow magnitude between two frames at ``height`` rows."""
    flow = cv2.calcOpticalFlowFarneback(_gray(a_HWC, height), _gray(b_HWC, height), None, pyr_scale=0.5, levels=4,
                                        winsize=15, iterations=3, poly_n=5, poly_sigma=1.2,
                                        flags=0)  # type: ignore[call-overload]  # cv2's stubs: flow=None
    return float(np.linalg.norm(flow, axis=-1).mean())


def motion_score(frames_THWC: np.ndarray, height: int = 320) -> float:
    """Mean flow magnitude over the three frame pairs of a clip (uint8 RGB [T,H,W,3]); 0 for a 1-frame clip."""
    pairs = frame_pairs(len(frames_THWC))
    if not pairs:
        return 0.0
    return float(np.mean([flow_magnitude(frames_THWC[i], frames_THWC[j], height) for i, j in pairs]))
