"""Near-duplicate clips by perceptual hash (DCT pHash, numpy + OpenCV).

Each clip gets the 64-bit pHash of ``NUM_FRAMES`` evenly spaced frames (32x32 grayscale -> DCT -> top-left 8x8
low frequencies without DC compared to their median), written as one hex string. Two clips are near-duplicates when
the mean Hamming distance of their frame hashes is <= ``max_distance`` (of 64). ``find_duplicates`` keeps the first
clip in the given order and points every later near-duplicate at it; it compares every pair (fine for a shard's or a
run's thousands of clips; a cluster run would bucket by a hash prefix first).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

NUM_FRAMES = 3


def phash_frame(frame_HWC: np.ndarray) -> int:
    """64-bit DCT perceptual hash of one RGB frame."""
    gray = cv2.cvtColor(np.ascontiguousarray(frame_HWC), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low[1:] > np.median(low[1:])
    return int("".join("1" if b else "0" for b in np.concatenate([[False], bits])), 2)


def clip_phash(frames_THWC: np.ndarray, k: int = NUM_FRAMES) -> str:
    """Hex string of ``k`` frame hashes (16 hex digits each)."""
    idx = np.linspace(0, len(frames_THWC) - 1, min(k, len(frames_THWC))).round().astype(int)
    return "".join(f"{phash_frame(frames_THWC[i]):016x}" for i in idx)


def distance(a: str, b: str) -> float:
    """Mean Hamming distance of the frame hashes of two clip hashes (64 if either is empty)."""
    ha = [int(a[i:i + 16], 16) for i in range(0, len(a), 16)]
    hb = [int(b[i:i + 16], 16) for i in range(0, len(b), 16)]
    n = min(len(ha), len(hb))
    if n == 0:
        return 64.0
    return float(np.mean([bin(x ^ y).count("1") for x, y in zip(ha[:n], hb[:n])]))


def find_duplicates(items: Sequence[Tuple[str, str]], max_distance: float) -> Dict[str, Tuple[str, float]]:
    """{clip_id: (first clip_id it duplicates, distance)} for ``items`` = [(clip_id, phash)] in priority order."""
    kept: List[Tuple[str, str]] = []
    dups: Dict[str, Tuple[str, float]] = {}
    for cid, h in items:
        best = min(((distance(h, kh), kid) for kid, kh in kept), default=None)
        if best is not None and best[0] <= max_distance:
            dups[cid] = (best[1], best[0])
        else:
            kept.append((cid, h))
    return dups
