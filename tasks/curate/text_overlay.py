"""Text/overlay area: the fraction of the frame covered by text-like regions (captions, titles, watermarks).

The report leaves overlays to its MLLM filter (thresholds unknown); this is the classic edge-based detector:
morphological gradient -> threshold -> horizontal closing (letters fuse into words/lines) -> connected components
kept when text-shaped (wider than tall, 6-25 % of the frame height tall, dense in strong edges). Overlays persist,
so the per-frame masks of the sampled frames are intersected (moving content drops out) and the area of what remains
is the score.
"""
from __future__ import annotations

import cv2
import numpy as np

NUM_FRAMES = 3
EDGE_MIN = 128         # morphological-gradient level (0-255) of a text stroke edge: high-contrast lettering
ANALYSIS_HEIGHT = 240  # frames are analysed at this height so the geometry rules are resolution independent


def text_mask(frame_HWC: np.ndarray) -> np.ndarray:
    """uint8 {0,1} mask [h,w] of text-like regions of one frame (at ANALYSIS_HEIGHT rows)."""
    h, w = frame_HWC.shape[:2]
    gray = cv2.cvtColor(np.ascontiguousarray(frame_HWC), cv2.COLOR_RGB2GRAY)
    scale = ANALYSIS_HEIGHT / h
    gray = cv2.resize(gray, (max(16, round(w * scale)), ANALYSIS_HEIGHT), interpolation=cv2.INTER_AREA)
    hh, ww = gray.shape
    grad = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    edges = (grad >= EDGE_MIN).astype(np.uint8)
    closed = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, ww // 25), 5)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    mask = np.zeros((hh, ww), np.uint8)
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if bw < 1.5 * bh or not 0.03 * hh <= bh <= 0.25 * hh or bw < 0.05 * ww:
            continue
        density = edges[y:y + bh, x:x + bw].mean()
        if density >= 0.12 and area >= 0.3 * bw * bh:
            mask[y:y + bh, x:x + bw] = 1
    return mask


def text_area(frames_THWC: np.ndarray, k: int = NUM_FRAMES) -> float:
    """Fraction of the frame where every one of ``k`` evenly spaced frames has a text-like region."""
    idx = np.linspace(0, len(frames_THWC) - 1, min(k, len(frames_THWC))).round().astype(int)
    mask = None
    for i in idx:
        m = text_mask(frames_THWC[i])
        mask = m if mask is None else mask & m
    return float(mask.mean()) if mask is not None else 0.0
