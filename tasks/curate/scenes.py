"""Hard-cut scene splitting with PySceneDetect's ContentDetector, run on already-decoded frames.

Frames are fed one by one (RGB -> BGR, as OpenCV expects) to ``ContentDetector.process_frame`` in SUPPRESS mode, so
no end-of-stream flush is needed: a cut is reported at the first frame of the new scene, and no two cuts are closer
than ``min_scene_len`` frames. Scenes are half-open frame ranges [start, end) covering the whole video.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
from scenedetect import ContentDetector, FrameTimecode
from scenedetect.detector import FlashFilter

# Shorter than PySceneDetect's default (15) so that short shots are found and reported as "scene too short" instead
# of being merged into the neighbouring shot.
MIN_SCENE_LEN = 8


def detect_cuts(frames_THWC: np.ndarray, fps: float, threshold: float = 27.0,
                min_scene_len: int = MIN_SCENE_LEN) -> List[int]:
    """Frame indices where a new scene starts (never 0), from uint8 RGB frames [T,H,W,3]."""
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"detect_cuts: need [T,H,W,3] frames, got {frames_THWC.shape}")
    if fps <= 0:
        raise ValueError(f"detect_cuts: fps must be > 0, got {fps}")
    detector = ContentDetector(threshold=threshold, min_scene_len=min_scene_len,
                               filter_mode=FlashFilter.Mode.SUPPRESS)
    cuts: List[int] = []
    for i, frame_HWC in enumerate(frames_THWC):
        for tc in detector.process_frame(FrameTimecode(i, fps=fps), np.ascontiguousarray(frame_HWC[..., ::-1])):
            if 0 < tc.frame_num < len(frames_THWC):
                cuts.append(int(tc.frame_num))
    return sorted(set(cuts))


def cuts_to_scenes(cuts: List[int], num_frames: int) -> List[Tuple[int, int]]:
    """[start, end) ranges covering [0, num_frames) split at ``cuts``."""
    bounds = [0] + [c for c in sorted(set(cuts)) if 0 < c < num_frames] + [num_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def detect_scenes(frames_THWC: np.ndarray, fps: float, threshold: float = 27.0,
                  min_scene_len: int = MIN_SCENE_LEN) -> List[Tuple[int, int]]:
    """Scene [start, end) frame ranges of decoded frames uint8 RGB [T,H,W,3]."""
    return cuts_to_scenes(detect_cuts(frames_THWC, fps, threshold, min_scene_len), len(frames_THWC))


def detect_scenes_in_file(path: str | Path, threshold: float = 27.0,
                          min_scene_len: int = MIN_SCENE_LEN) -> List[Tuple[int, int]]:
    """Decode ``path`` (see decode.read_video) and split it into scenes."""
    from tasks.curate.decode import read_video

    frames_THWC, fps, _ = read_video(path)
    return detect_scenes(frames_THWC, fps, threshold, min_scene_len)
