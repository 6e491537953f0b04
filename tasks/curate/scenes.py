"""Scene splitting over a stream of frames: hard cuts (PySceneDetect content + adaptive detectors) and gradual
transitions (fades, dissolves), holding a bounded window of small analysis frames, never the video.

    stream = SceneStream(fps, cfg)
    for frame_HWC in frames:          # decoded uint8 RGB [H,W,3], in order
        stream.push(frame_HWC)
        stream.settled()              # the scenes whose bounds can no longer change (a prefix of the final ones)
    result = stream.finish()          # SceneAnalysis: cuts, transitions, scenes, changes
    result = analyse(frames_THWC, fps, cfg)   # the same, for frames already in one array

Each frame is first downscaled to at most ``analysis_width`` columns (as PySceneDetect's own ``downscale`` does);
every colour conversion runs on the small frame.
- Hard cuts: PySceneDetect's ``ContentDetector`` and ``AdaptiveDetector`` (SUPPRESS flash filter, so no
  end-of-stream flush is needed); a cut is the first frame of the new scene, the union of both detectors' cuts is
  used, and cuts closer than ``min_scene_len`` frames are merged. Both detectors score a frame the same way (the mean
  HSV change from the previous frame, default weights): the score is computed once per frame here
  (``content_score``, one RGB -> HSV conversion, the numbers PySceneDetect 0.7 computes) and given to both, which
  keep their own thresholds, flash filter and rolling average.
- Gradual transitions (the report pairs PySceneDetect with a Color-Struct SVM for these; this is a model-free test):
  over a window [a, b] of ``gradual_window`` frames, a fade or dissolve makes every middle frame a blend
  ``alpha * F(a) + (1 - alpha) * F(b)`` with alpha falling steadily from 1 to 0. A window is a transition when
  ``mean|F(b) - F(a)| >= gradual_min_change``, the blend fit's mean residual is <= ``gradual_max_residual`` of that
  change, and alpha never jumps by more than 0.5 in one frame (that would be a hard cut). Overlapping windows merge
  into one transition [start, end); its frames belong to no scene. The test runs on ``GRADUAL_SIZE``-column frames,
  of which the last ``gradual_window + 1`` are kept.
Scenes are half-open [start, end) ranges between cuts and transitions. ``changes`` is the per-frame mean HSV change
(on the same tiny frames) that ``curate`` uses to drop clips that still contain a cut. What grows with the video's
length is a few numbers per frame (changes) and per cut.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Deque, List, Optional, Tuple

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode
from scenedetect.detector import FlashFilter

from common.config import CurateConfig

if TYPE_CHECKING:
    from tasks.curate.decode import VideoInfo

# Shorter than PySceneDetect's default (15) so that short shots are found and reported as "scene too short" instead
# of being merged into the neighbouring shot.
MIN_SCENE_LEN = 8
GRADUAL_SIZE = 48     # columns of the frames the blend test runs on
# the content score's weights (hue, saturation, luma, edges): PySceneDetect's defaults, without edges (so no Canny)
WEIGHTS = ContentDetector.DEFAULT_COMPONENT_WEIGHTS
assert WEIGHTS.delta_edges == 0.0, "content_score does not compute edges"


@dataclass
class SceneAnalysis:
    cuts: List[int] = field(default_factory=list)                   # first frames of new scenes (hard cuts)
    transitions: List[Tuple[int, int]] = field(default_factory=list)  # gradual transitions [start, end)
    scenes: List[Tuple[int, int]] = field(default_factory=list)       # [start, end) ranges outside transitions
    changes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [T] mean HSV change from the previous frame


def downscale(frames_THWC: np.ndarray, width: int) -> np.ndarray:
    """Frames [T,H,W,3] resized to ``width`` columns (aspect kept); unchanged when not wider."""
    if frames_THWC.shape[2] <= width:
        return frames_THWC
    return np.stack([_downscale_frame(f, width) for f in frames_THWC])


def _downscale_frame(frame_HWC: np.ndarray, width: int) -> np.ndarray:
    h, w, _ = frame_HWC.shape
    if w <= width:
        return frame_HWC
    size = (width, max(2, round(h * width / w)))
    # INTER_LINEAR (as PySceneDetect's own downscale): several times cheaper than INTER_AREA, fine for analysis
    return cv2.resize(np.ascontiguousarray(frame_HWC), size, interpolation=cv2.INTER_LINEAR)


def _hsv_N(tiny_HWC: np.ndarray) -> np.ndarray:
    """float32 HSV of a tiny frame (0-255 scale, hue doubled), for the per-frame change."""
    hsv = cv2.cvtColor(np.ascontiguousarray(tiny_HWC), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] *= 255.0 / 180.0
    return hsv


def content_score(hsv_HWC: np.ndarray, prev_hsv_HWC: np.ndarray) -> float:
    """PySceneDetect's content score of a frame: the weighted mean of the mean absolute hue, saturation and luma
    changes (uint8 HSV [H,W,3] of this frame and of the previous one), with the same arithmetic (exact integer sums,
    one division each, then the weighted sum in the same order), so the same float."""
    num_pixels = float(hsv_HWC.shape[0] * hsv_HWC.shape[1])
    sums = cv2.sumElems(cv2.absdiff(hsv_HWC, prev_hsv_HWC))   # (hue, sat, lum, 0): integers, exact in float64
    components = (sums[0] / num_pixels, sums[1] / num_pixels, sums[2] / num_pixels, 0.0)
    return sum(c * w for c, w in zip(components, WEIGHTS)) / sum(abs(w) for w in WEIGHTS)


class _GivenScore:
    """A PySceneDetect content detector whose frame score is set from outside (``score``) before each
    ``process_frame`` instead of being computed from the frame (``ContentDetector._calculate_frame_score``)."""
    score = 0.0

    def _calculate_frame_score(self, timecode: FrameTimecode, frame_img: np.ndarray) -> float:
        return self.score


class _ScoredContentDetector(_GivenScore, ContentDetector):
    pass


class _ScoredAdaptiveDetector(_GivenScore, AdaptiveDetector):
    pass


def _is_blend(window_xN: Deque[np.ndarray], min_change: float, max_residual: float) -> bool:
    """Whether the window of flattened tiny frames [window+1 of (N,)] is a fade/dissolve (module docstring)."""
    d = window_xN[0] - window_xN[-1]
    change = float(np.abs(d).mean())
    if change < min_change:
        return False
    mid = np.stack(list(window_xN)[1:-1]) - window_xN[-1]      # (window-1, N)
    alpha = mid @ d / float(d @ d)
    resid = np.abs(mid - alpha[:, None] * d[None]).mean(axis=1)
    steps = -np.diff(np.concatenate([[1.0], alpha, [0.0]]))
    return bool(resid.max() <= max_residual * change and steps.max() <= 0.5 and steps.min() >= -0.15)


class SceneStream:
    """Scene analysis one frame at a time (module docstring): ``push`` every frame in order, then ``finish``."""

    def __init__(self, fps: float, cfg: CurateConfig, min_scene_len: int = MIN_SCENE_LEN) -> None:
        if fps <= 0:
            raise ValueError(f"SceneStream: fps must be > 0, got {fps}")
        self.fps, self.cfg, self.min_scene_len = fps, cfg, min_scene_len
        self.detectors: List[_ScoredContentDetector | _ScoredAdaptiveDetector] = [_ScoredContentDetector(
            threshold=cfg.scene_threshold, min_scene_len=min_scene_len, filter_mode=FlashFilter.Mode.SUPPRESS)]
        if cfg.adaptive_threshold > 0:
            self.detectors.append(_ScoredAdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold,
                                                          min_scene_len=min_scene_len))
        self.num_frames = 0
        self.found: List[int] = []                           # detector cuts, unmerged
        self.flagged: List[Tuple[int, int]] = []             # gradual windows [a, b + 1), merged as they come
        self.window_xN: Deque[np.ndarray] = deque(maxlen=cfg.gradual_window + 1)   # last tiny frames, flattened
        self.changes: List[float] = []
        self.prev_hsv: Optional[np.ndarray] = None          # float HSV of the previous tiny frame
        self.prev_small_hsv: Optional[np.ndarray] = None    # uint8 HSV of the previous analysis frame

    def push(self, frame_HWC: np.ndarray) -> None:
        """Analyse the next frame, uint8 RGB [H,W,3]."""
        i = self.num_frames
        # 1. hard cuts on the analysis-size frame: one HSV conversion, one score for both detectors
        small_HWC = np.ascontiguousarray(_downscale_frame(frame_HWC, self.cfg.analysis_width))
        small_hsv_HWC = cv2.cvtColor(small_HWC, cv2.COLOR_RGB2HSV)
        score = 0.0 if self.prev_small_hsv is None else content_score(small_hsv_HWC, self.prev_small_hsv)
        self.prev_small_hsv = small_hsv_HWC
        for det in self.detectors:
            det.score = score
            self.found += [int(tc.frame_num) for tc in det.process_frame(FrameTimecode(i, fps=self.fps),
                                                                         small_hsv_HWC)]
        # 2. per-frame change and the gradual window on the tiny frame
        tiny_HWC = _downscale_frame(small_HWC, GRADUAL_SIZE)
        hsv = _hsv_N(tiny_HWC)
        self.changes.append(0.0 if self.prev_hsv is None else float(np.abs(hsv - self.prev_hsv).mean()))
        self.prev_hsv = hsv
        self.window_xN.append(tiny_HWC.reshape(-1).astype(np.float32))
        window = self.cfg.gradual_window
        if i >= window and _is_blend(self.window_xN, self.cfg.gradual_min_change,
                                     self.cfg.gradual_max_residual):
            a, end = i - window, i + 1
            if self.flagged and a <= self.flagged[-1][1]:
                self.flagged[-1] = (self.flagged[-1][0], max(end, self.flagged[-1][1]))
            else:
                self.flagged.append((a, end))
        self.num_frames += 1

    def finish(self) -> SceneAnalysis:
        """Cuts, transitions, scenes and changes of the frames pushed."""
        cuts, transitions = self._bounds()
        return SceneAnalysis(cuts, transitions, split_scenes(cuts, transitions, self.num_frames),
                             np.asarray(self.changes, np.float32))

    @property
    def settle_lag(self) -> int:
        """Frames pushed after a scene's end before its bounds are final: a detector reports a cut up to
        ``event_buffer_length`` frames late (AdaptiveDetector: its window_width), a fade or dissolve is flagged on
        the window's last frame but starts ``gradual_window`` frames back (removing the cuts it covers), plus one."""
        return max(det.event_buffer_length for det in self.detectors) + self.cfg.gradual_window + 1

    def settled(self) -> List[Tuple[int, int]]:
        """The scenes already final, a prefix of ``finish().scenes``: those ending ``settle_lag`` frames or more
        before the last frame pushed. Later frames only add cuts and transitions after that point (cuts merge
        forward, a transition only grows at its end), so these scenes keep their bounds."""
        limit = self.num_frames - self.settle_lag
        if limit <= 0:
            return []
        cuts, transitions = self._bounds()
        return [(s, e) for s, e in split_scenes(cuts, transitions, self.num_frames) if e <= limit]

    def _bounds(self) -> Tuple[List[int], List[Tuple[int, int]]]:
        """(cuts, transitions) of the frames pushed: detector cuts merged (closer than ``min_scene_len`` to the
        previous kept cut: dropped), those inside a transition removed."""
        merged: List[int] = []
        for c in sorted({c for c in self.found if 0 < c < self.num_frames}):
            if not merged or c - merged[-1] >= self.min_scene_len:
                merged.append(c)
        transitions = list(self.flagged)
        union = _union(transitions)
        starts = [s for s, _ in union]
        return [c for c in merged if (j := bisect.bisect_right(starts, c) - 1) < 0 or c >= union[j][1]], transitions


def split_scenes(cuts: List[int], transitions: List[Tuple[int, int]], num_frames: int) -> List[Tuple[int, int]]:
    """[start, end) ranges of [0, num_frames) split at ``cuts`` and with the ``transitions`` frames removed."""
    bounds = sorted({0, num_frames, *[c for c in cuts if 0 < c < num_frames]})
    union = _union(transitions)   # sorted and disjoint, so their ends are sorted too: a bisect finds the first that
    ends = [e for _, e in union]  # can overlap each range (what the settled check, every few frames, needs)
    scenes = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        at = a
        for ts, te in union[bisect.bisect_right(ends, a):]:
            if ts >= b:
                break
            if ts > at:
                scenes.append((at, ts))
            at = max(at, te)
        if b > at:
            scenes.append((at, b))
    return scenes


def _union(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The union of half-open ranges as sorted, disjoint, non-adjacent ranges."""
    out: List[Tuple[int, int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def cuts_to_scenes(cuts: List[int], num_frames: int) -> List[Tuple[int, int]]:
    """[start, end) ranges covering [0, num_frames) split at ``cuts``."""
    return split_scenes(cuts, [], num_frames)


def analyse(frames_THWC: np.ndarray, fps: float, cfg: CurateConfig,
            min_scene_len: int = MIN_SCENE_LEN) -> SceneAnalysis:
    """Cuts, gradual transitions, scenes and per-frame changes of decoded frames uint8 RGB [T,H,W,3], with the
    detector settings of ``cfg`` (scene_threshold, adaptive_threshold, analysis_width, gradual_*)."""
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
        raise ValueError(f"analyse: need [T,H,W,3] frames, got {frames_THWC.shape}")
    stream = SceneStream(fps, cfg, min_scene_len)
    for frame_HWC in frames_THWC:
        stream.push(frame_HWC)
    return stream.finish()


def detect_scenes(frames_THWC: np.ndarray, fps: float, threshold: float = 27.0,
                  min_scene_len: int = MIN_SCENE_LEN) -> List[Tuple[int, int]]:
    """Scene [start, end) frame ranges of decoded frames uint8 RGB [T,H,W,3] (default detector settings but the
    content threshold)."""
    return analyse(frames_THWC, fps, CurateConfig(scene_threshold=threshold), min_scene_len).scenes


def scan_scenes(path: str | Path, cfg: CurateConfig, max_pixels: int = 0, max_frames: int = 0,
                min_scene_len: int = MIN_SCENE_LEN) -> Tuple["VideoInfo", SceneAnalysis]:
    """(video info, scene analysis) of the video ``path``, streaming: the analysis runs during the decoder's first
    pass (``decode.scan_video``); a variable-rate input is decoded a second time to analyse its constant-rate
    frames. Raises DecodeError as ``scan_video`` does."""
    from tasks.curate.decode import scan_video

    streams: List[SceneStream] = []

    def start(fps: float) -> Callable[[np.ndarray], None]:
        if fps <= 0:   # scan_video refuses the file ("stream has no frame rate") once decoded
            return lambda frame_HWC: None
        streams[:] = [SceneStream(fps, cfg, min_scene_len)]
        return streams[0].push

    info = scan_video(path, start, max_pixels, max_frames, backend=cfg.decoder)
    if info.meta["vfr"]:   # the first pass saw the source frames: analyse the constant-rate ones
        return info, rescan_scenes(info, cfg, min_scene_len)
    return info, streams[0].finish()


def rescan_scenes(info: "VideoInfo", cfg: CurateConfig, min_scene_len: int = MIN_SCENE_LEN) -> SceneAnalysis:
    """Scene analysis of a scanned video's constant-rate frames, in a later pass (``decode.read_frames``): for a
    variable-rate input, whose first pass saw the source frames."""
    from tasks.curate.decode import read_frames

    stream = SceneStream(info.fps, cfg, min_scene_len)
    for _, frame_HWC in read_frames(info):
        stream.push(frame_HWC)
    return stream.finish()


def detect_scenes_in_file(path: str | Path, threshold: float = 27.0,
                          min_scene_len: int = MIN_SCENE_LEN) -> List[Tuple[int, int]]:
    """Scene [start, end) frame ranges of the video ``path``, streaming (default detector settings but the content
    threshold)."""
    return scan_scenes(path, CurateConfig(scene_threshold=threshold), min_scene_len=min_scene_len)[1].scenes
