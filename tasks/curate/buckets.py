"""Buckets: resolution x aspect x length per clip (docs/mugv.md §1.5: the 720p buckets, 8k+1 frames).

A clip's size bucket is the [H, W] of ``cfg.sizes`` whose aspect (W/H) is closest in log scale to the source's;
its length bucket is the longest of ``clip_frames`` and ``bucket_frames`` that fits the scene (with the stride) and
``max_clip_s``, and is at least ``min_clip_s`` long. The bucket name is "HxWxT", e.g. "720x1280x105".

Resolutions (``cfg.resolution_list``, the curriculum's, e.g. 360p and 720p): ``covered`` lists, largest first, the
resolutions whose closest-aspect size the source covers after the center crop (never upscaled); the clip is cut at
the first. ``variants`` are what compress encodes of a kept clip: every covered resolution (its size closest to the
clip's aspect, no larger than the clip) x every allowed length up to the clip's (its first n frames); an image has
one frame.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

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


def _nearest(sizes: List[List[int]], h: int, w: int) -> Tuple[int, int]:
    a = math.log(w / h)
    bh, bw = min(sizes, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - a), -hw[0] * hw[1]))
    return int(bh), int(bw)


def covers(src_h: int, src_w: int, h: int, w: int) -> bool:
    """Whether a src_h x src_w frame, center-cropped to the aspect w/h, is at least h x w (no upscaling)."""
    crop_h, crop_w = (src_h, src_h * w / h) if src_w * h >= src_h * w else (src_w * h / w, src_w)
    return crop_h >= h - 1e-6 and crop_w >= w - 1e-6


def covered(src_h: int, src_w: int, cfg: CurateConfig) -> List[Tuple[str, int, int]]:
    """[(resolution name, H, W)] of every resolution the source covers at its closest-aspect size, largest first."""
    out = []
    for r in reversed(cfg.resolution_list):
        h, w = _nearest(r.sizes, src_h, src_w)
        if covers(src_h, src_w, h, w):
            out.append((r.name, h, w))
    return out


def variants(clip_h: int, clip_w: int, num_frames: int, cfg: CurateConfig, fps: float) -> List[List[Any]]:
    """[[resolution, H, W, frames], ...] compress encodes of a kept clip (or an image: ``num_frames`` 1) cut at
    clip_h x clip_w: every resolution whose closest-aspect size is no larger than the clip, x every allowed length up
    to ``num_frames`` (its first n frames). The first entry is the clip itself."""
    sizes = [(r.name, *_nearest(r.sizes, clip_h, clip_w)) for r in reversed(cfg.resolution_list)]
    sizes = [(n, h, w) for n, h, w in sizes if h <= clip_h and w <= clip_w]
    frames = [num_frames] if num_frames == 1 else \
        [num_frames] + [n for n in lengths(cfg, fps) if n < num_frames]
    return [[n, h, w, f] for n, h, w in sizes for f in frames]


def smallest_size(cfg: CurateConfig) -> Tuple[int, int]:
    """The smallest [H, W] of any resolution (for the "too small" message)."""
    h, w = min((hw for r in cfg.resolution_list for hw in r.sizes), key=lambda hw: hw[0] * hw[1])
    return int(h), int(w)
