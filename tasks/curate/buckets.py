"""Buckets: resolution x aspect x length per clip (docs/mugv.md §1.5: the 720p buckets, 8k+1 frames).

A clip's size bucket is the [H, W] of ``cfg.sizes`` whose aspect (W/H) is closest in log scale to the source's;
its length bucket is the longest of ``clip_frames`` and ``bucket_frames`` that fits the scene (with the stride) and
``max_clip_s``, and is at least ``min_clip_s`` long. The bucket name is "HxWxT", e.g. "720x1280x105".
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

from common.config import CurateConfig

# docs/mugv.md §1.5, (H, W): the inference repo's 720p buckets (~0.92 Mpx)
MUGV_720P = [[720, 1280], [832, 1110], [960, 960], [1108, 832], [1280, 720]]   # as published; configs round to /16


def size_bucket(src_h: int, src_w: int, cfg: CurateConfig) -> Tuple[int, int]:
    """The [H, W] of ``cfg.sizes`` with the aspect closest to src_w/src_h (the larger one on a tie)."""
    a = math.log(src_w / src_h)
    h, w = min(cfg.sizes, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - a), -hw[0] * hw[1]))
    return int(h), int(w)


def lengths(cfg: CurateConfig, fps: float) -> List[int]:
    """Allowed clip lengths in frames (8k+1), longest first, within [min_clip_s, max_clip_s] at output ``fps``."""
    out = sorted({cfg.clip_frames, *cfg.bucket_frames}, reverse=True)
    if cfg.max_clip_s > 0:
        out = [n for n in out if n / fps <= cfg.max_clip_s + 1e-9]
    return [n for n in out if n / fps >= cfg.min_clip_s - 1e-9]


def length_bucket(scene_frames: int, cfg: CurateConfig, fps: float) -> Optional[int]:
    """Longest allowed length whose source span fits ``scene_frames``; None when none fits."""
    for n in lengths(cfg, fps):
        if (n - 1) * cfg.frame_stride + 1 <= scene_frames:
            return n
    return None


def bucket_name(h: int, w: int, t: int) -> str:
    return f"{h}x{w}x{t}"
