"""Near-duplicate clips by perceptual hash (DCT pHash, numpy + OpenCV).

Each clip gets the 64-bit pHash of ``NUM_FRAMES`` evenly spaced frames (32x32 grayscale -> DCT -> top-left 8x8
low frequencies without DC compared to their median), written as one hex string. Two clips are near-duplicates when
the mean Hamming distance of their frame hashes is <= ``max_distance`` (of 64). ``find_duplicates`` keeps the first
clip in the given order and points every later near-duplicate at the closest kept clip (ties: the smallest clip_id).

    dups = find_duplicates([(clip_id, phash), ...], max_distance=8)   # {later clip_id: (kept clip_id, distance)}

It does not compare all pairs: kept clips go into a multi-index over their hash bits (``HashIndex``), which is exact
for every threshold (the proof is in ``HashIndex``), so its result equals ``find_duplicates_all_pairs``, the
reference that compares every clip with every kept one (tests/test_dedup.py checks equality on random and
adversarial sets; bench/dedup.py times both).
"""
from __future__ import annotations

import math
import string
from itertools import combinations
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

NUM_FRAMES = 3
FRAME_BITS = 64
MAX_FLIP_RADIUS = 2   # bands are probed within this Hamming radius at most (C(w, 3) keys per band is too many)
_HEX = frozenset(string.hexdigits)


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


def find_duplicates_all_pairs(items: Sequence[Tuple[str, str]],
                              max_distance: float) -> Dict[str, Tuple[str, float]]:
    """The reference: every clip against every kept one (O(N * kept)). Same arguments and result as
    ``find_duplicates``."""
    kept: List[Tuple[str, str]] = []
    dups: Dict[str, Tuple[str, float]] = {}
    for cid, h in items:
        best = min(((distance(h, kh), kid) for kid, kh in kept), default=None)
        if best is not None and best[0] <= max_distance:
            dups[cid] = (best[1], best[0])
        else:
            kept.append((cid, h))
    return dups


def max_bit_distance(frames: int, max_distance: float) -> int:
    """The largest total Hamming distance S over ``frames`` frame hashes whose mean ``S / frames`` (the float that
    ``distance`` computes) is <= ``max_distance``; -1 when none is."""
    top = FRAME_BITS * frames
    r = max(-1, min(top, math.floor(max_distance * frames))) if math.isfinite(max_distance) else \
        (top if max_distance > 0 else -1)
    while r < top and (r + 1) / frames <= max_distance:   # the float comparison decides, as in find_duplicates
        r += 1
    while r >= 0 and not r / frames <= max_distance:
        r -= 1
    return r


class HashIndex:
    """Kept hashes of ``frames`` frames (their first ``prefix`` frames indexed), searched within total Hamming
    distance ``radius`` over those ``prefix * 64`` bits.

    Multi-index hashing: the bits are cut into ``bands`` contiguous bands and each kept hash is filed under its value
    in every band; a query probes, in every band, every value within Hamming distance ``flips`` of its own. With
    ``bands * (flips + 1) > radius`` this is exact: if two hashes differ in at most ``radius`` bits, some band holds
    at most ``flips`` of them (otherwise the bands would hold >= bands * (flips + 1) > radius), so every hash within
    ``radius`` is among the candidates (pigeonhole). Candidates are then checked exactly (``int.bit_count``).
    ``flips`` is picked per index from a cost estimate (probes + expected bucket sizes); exactness does not depend
    on it.
    """

    def __init__(self, prefix: int, radius: int, expected: int) -> None:
        self.prefix, self.radius = prefix, radius
        bits = FRAME_BITS * prefix
        best = (0.0, 0, 0) if radius < 0 else None   # nothing is within a negative radius: no bands, no candidates
        for flips in range(0, MAX_FLIP_RADIUS + 1 if radius >= 0 else 0):
            bands = min(bits, radius // (flips + 1) + 1)
            if bands * (flips + 1) <= radius:   # too few bits to split: cannot be exact with this many flips
                continue
            width = bits / bands
            probes = sum(math.comb(math.ceil(width), k) for k in range(flips + 1))
            cost = bands * probes * (1.0 + expected / 2.0 ** width)
            if best is None or cost < best[0]:
                best = (cost, flips, bands)
        if best is None:
            raise ValueError(f"HashIndex: radius {radius} cannot be indexed over {bits} bits")
        _, self.flips, bands = best
        edges = [round(i * bits / bands) for i in range(bands + 1)] if bands else [0]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]   # (shift, mask)
        self.probe_masks = [[sum(1 << b for b in bs) for k in range(self.flips + 1)
                             for bs in combinations(range(hi - lo), k)] for lo, hi in zip(edges, edges[1:])]
        self.tables: List[Dict[int, List[int]]] = [{} for _ in self.bands]
        self.values: List[int] = []   # the indexed prefix of each kept hash, as one integer
        self.slots: List[int] = []    # its position in the caller's kept list

    def add(self, value: int, slot: int) -> None:
        n = len(self.values)
        self.values.append(value)
        self.slots.append(slot)
        for (shift, mask), table in zip(self.bands, self.tables):
            table.setdefault((value >> shift) & mask, []).append(n)

    def search(self, value: int) -> List[Tuple[int, int]]:
        """[(slot, total Hamming distance)] of every indexed hash within ``radius`` of ``value`` (each once)."""
        seen = set()
        for (shift, mask), table, probes in zip(self.bands, self.tables, self.probe_masks):
            for hit in map(table.get, map(((value >> shift) & mask).__xor__, probes)):
                if hit:
                    seen.update(hit)
        values, r = self.values, self.radius
        return [(self.slots[n], d) for n in seen if (d := (values[n] ^ value).bit_count()) <= r]


def _frames(h: str) -> int:
    return len(h) // 16


def find_duplicates(items: Sequence[Tuple[str, str]], max_distance: float) -> Dict[str, Tuple[str, float]]:
    """{clip_id: (kept clip_id it duplicates, distance)} for ``items`` = [(clip_id, phash)] in priority order.

    The same result as ``find_duplicates_all_pairs`` (same kept clip, same distance float): each clip is searched
    for in ``HashIndex``es of the kept clips (one per (kept frame count, compared frame count), usually a single
    one), the candidates within the exact bit radius get ``distance`` and the smallest (distance, clip_id) wins.
    Hashes that are not 16-hex-digit frame hashes, or a threshold >= 64 (every pair matches), take the reference.
    """
    if not max_distance < FRAME_BITS or any(len(h) % 16 or not _HEX.issuperset(h) for _, h in items):
        return find_duplicates_all_pairs(items, max_distance)
    kept: List[Tuple[str, str]] = []
    by_frames: Dict[int, List[int]] = {}              # frame count -> kept slots
    indexes: Dict[Tuple[int, int], HashIndex] = {}    # (kept frame count, compared frames) -> index
    dups: Dict[str, Tuple[str, float]] = {}
    for cid, h in items:
        n = _frames(h)
        best = None
        if n:
            for length, slots in by_frames.items():
                if not length:   # an empty hash is 64 from everything
                    continue
                p = min(n, length)
                index = indexes.get((length, p))
                if index is None:   # built on first use from the kept clips of that length
                    index = indexes[(length, p)] = HashIndex(p, max_bit_distance(p, max_distance), len(items))
                    for s in slots:
                        index.add(int(kept[s][1][:16 * p], 16), s)
                for s, _ in index.search(int(h[:16 * p], 16)):
                    cand = (distance(h, kept[s][1]), kept[s][0])
                    if best is None or cand < best:
                        best = cand
        if best is not None and best[0] <= max_distance:
            dups[cid] = (best[1], best[0])
            continue
        slot = len(kept)
        kept.append((cid, h))
        by_frames.setdefault(n, []).append(slot)
        for (length, p), index in indexes.items():
            if length == n:
                index.add(int(h[:16 * p], 16), slot)
    return dups
