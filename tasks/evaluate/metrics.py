"""The evaluation metrics as pure functions, and the one table that declares them (docs/evaluation.md).

Every metric has a direction ("higher" or "lower" is better) and a flag saying whether its figure can be set beside
published numbers (same definition and the same published model). Videos are uint8 RGB ``[T, H, W, 3]``.

    from tasks.evaluate.metrics import METRICS, Metric, compare, temporal_flickering, dynamic_degree
    temporal_flickering(frames_THWC)              # 1.0 for a static video (VBench's definition)
    is_dynamic(frames_THWC, fps=8)                # VBench's rule, on OpenCV Farnebäck flow
    motion_smoothness(frames_THWC)                # ~1.0 for a static video; flow-warp substitute for VBench's AMT
    psnr(a_HWC, b_HWC), ssim(a_HWC, b_HWC)        # PSNR capped at PSNR_CAP dB for identical images; SSIM 1.0
    frechet_distance(feats_ND, feats_MD, eps=1e-6)   # 0 for identical sets; regularised sqrtm
    clip_alignment(text_D, frames_FD)             # mean cosine between a text and frame embeddings
    rows = compare(champion_values, candidate_values)   # delta and better/worse per metric, from METRICS
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional

import cv2
import numpy as np

PSNR_CAP = 100.0          # dB for identical images (MSE 0): finite, so it can be averaged, logged and compared
SAME_TOLERANCE = 1e-9     # |delta| <= this * max(1, |value|): "same"

# OpenCV Farnebäck with the parameters curation uses (tasks/curate/motion.py: flow_magnitude); a test keeps the
# two equal, so "motion" means the same thing when clips are filtered and when samples are scored
FARNEBACK = dict(pyr_scale=0.5, levels=4, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)

# VBench dynamic degree (vbench/dynamic_degree.py): a flow pair "moves" when the mean of its top 5% magnitudes
# exceeds 6 px at a 256 px short side (scaled to the resolution, x max(1, 8 / fps)); a video is dynamic when
# round(4 * frames / 16) pairs move (frames after sampling the video at ~8 fps)
DYNAMIC_TOP_FRACTION = 0.05
DYNAMIC_THRESHOLD_PX = 6.0
DYNAMIC_REFERENCE_SIDE = 256.0


@dataclass(frozen=True)
class MetricSpec:
    direction: str            # "higher" | "lower": which way is better
    comparable: bool          # computed as published work computes it (same definition and model)
    description: str
    note: str = ""            # why it is not comparable, or what to watch


@dataclass
class Metric:
    """One figure of a report: ``name`` is a key of ``METRICS``; ``value`` NaN = not measurable here (``note``)."""
    name: str
    value: float
    direction: str
    comparable: bool
    note: str = ""
    reference: float = math.nan   # the same measure on the held-out clips, where it applies (context, not compared)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


# The table of metrics: direction, comparability to published numbers, and what each measures.
METRICS: Dict[str, MetricSpec] = {
    "heldout_flow_loss": MetricSpec(
        "lower", False, "rectified-flow loss on held-out latents at fixed timesteps and fixed noise",
        "project-specific: depends on our VAE latent space and the timestep grid"),
    "temporal_flickering": MetricSpec(
        "higher", True, "1 - mean |frame(t+1) - frame(t)| / 255 (VBench's definition)",
        "VBench's formula; VBench scores it on its static-scene prompts only, this on the suite's samples"),
    "motion_smoothness": MetricSpec(
        "higher", False, "1 - mean |odd frame - flow interpolation of its neighbours| / 255",
        "substitute: Farnebäck flow warping instead of VBench's AMT frame-interpolation model"),
    "dynamic_degree": MetricSpec(
        "higher", False, "fraction of videos that move (VBench's rule on Farnebäck flow)",
        "VBench uses RAFT flow; Farnebäck magnitudes differ; our prompts"),
    "i2v_first_frame_psnr": MetricSpec(
        "higher", True, "PSNR (dB) of the generated first frame vs the conditioning image",
        f"identical frames are capped at {PSNR_CAP:g} dB"),
    "i2v_first_frame_ssim": MetricSpec(
        "higher", True, "SSIM of the generated first frame vs the conditioning image"),
    "vae_recon_psnr": MetricSpec(
        "higher", True, "PSNR (dB) of held-out clips vs their VAE reconstruction"),
    "vae_recon_ssim": MetricSpec(
        "higher", True, "SSIM of held-out clips vs their VAE reconstruction"),
    "frechet_distance": MetricSpec(
        "lower", True, "Fréchet distance between held-out and generated clips in a video feature space",
        "FVD with the I3D torchscript weights (features 'i3d'); few samples bias it upwards"),
    "clip_alignment": MetricSpec(
        "higher", True, "mean cosine between the prompt's CLIP text embedding and the frames' image embeddings",
        "CLIPSIM's definition; comparable only with a pretrained CLIP"),
}


def make_metric(name: str, value: float, comparable: Optional[bool] = None, note: str = "",
                reference: float = math.nan) -> Metric:
    """A ``Metric`` with the direction from ``METRICS``; ``comparable`` defaults to the table's (a figure from a
    random or substitute model passes False), ``note`` to the table's."""
    spec = METRICS[name]
    return Metric(name, float(value), spec.direction, spec.comparable if comparable is None else comparable,
                  note or spec.note, float(reference))


# ------------------------------------------------------------------------------------------------ pixel metrics

def _check_video(frames_THWC: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames_THWC)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB video [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames


def temporal_flickering(frames_THWC: np.ndarray) -> float:
    """VBench temporal flickering: 1 - mean over consecutive pairs of mean |f(t+1) - f(t)| / 255; higher is better,
    1.0 for a static (or one-frame) video.

        temporal_flickering(np.zeros((17, 32, 32, 3), np.uint8))   # 1.0
    """
    f = _check_video(frames_THWC).astype(np.float32)
    if len(f) < 2:
        return 1.0
    mae_T = np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))
    return float((255.0 - mae_T.mean()) / 255.0)


def _gray(frame_HWC: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(frame_HWC), cv2.COLOR_RGB2GRAY)


def farneback_flow(a_HWC: np.ndarray, b_HWC: np.ndarray) -> np.ndarray:
    """Dense flow [H, W, 2] (dx, dy) from frame a to frame b at full resolution: a(p) ~ b(p + flow(p))."""
    return cv2.calcOpticalFlowFarneback(_gray(a_HWC), _gray(b_HWC), None,  # type: ignore[call-overload]
                                        **FARNEBACK)


def _warp(frame_HWC: np.ndarray, flow_HW2: np.ndarray, scale: float) -> np.ndarray:
    """Backward warp: out(p) = frame(p + scale * flow(p)), bilinear, borders replicated."""
    h, w = flow_HW2.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx = gx + scale * flow_HW2[..., 0]
    my = gy + scale * flow_HW2[..., 1]
    return cv2.remap(np.ascontiguousarray(frame_HWC), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def interpolate_middle(prev_HWC: np.ndarray, next_HWC: np.ndarray) -> np.ndarray:
    """The frame halfway between two frames by flow warping (linear motion): flow F from prev to next, both
    neighbours warped half-way toward the middle and averaged. Exact for a uniform translation (away from borders).
    Returns float32 [H, W, 3] in 0..255."""
    flow = farneback_flow(prev_HWC, next_HWC)
    from_prev = _warp(prev_HWC, flow, -0.5).astype(np.float32)   # prev(p - F/2)
    from_next = _warp(next_HWC, flow, 0.5).astype(np.float32)    # next(p + F/2)
    return 0.5 * (from_prev + from_next)


def motion_smoothness(frames_THWC: np.ndarray) -> float:
    """Flow-based substitute for VBench motion smoothness: each odd frame t (with t+1 in the video) is predicted
    from frames t-1 and t+1 by ``interpolate_middle``; score 1 - mean |prediction - frame t| / 255, higher is
    better. VBench interpolates the odd frames from the even ones with the AMT model the same way; this uses
    Farnebäck flow instead, so the figure is not comparable to VBench's. A static video scores 1.0 up to Farnebäck's
    sub-pixel noise (~1e-6), fewer than 3 frames 1.0.

        motion_smoothness(np.zeros((9, 32, 32, 3), np.uint8))     # 1.0
    """
    f = _check_video(frames_THWC)
    errors = [np.abs(interpolate_middle(f[t - 1], f[t + 1]) - f[t].astype(np.float32)).mean()
              for t in range(1, len(f) - 1, 2)]
    if not errors:
        return 1.0
    return float((255.0 - float(np.mean(errors))) / 255.0)


def top_flow_magnitude(flow_HW2: np.ndarray, fraction: float = DYNAMIC_TOP_FRACTION) -> float:
    """Mean of the largest ``fraction`` of the flow magnitudes (VBench dynamic degree's per-pair score)."""
    mag = np.sqrt((flow_HW2.astype(np.float64) ** 2).sum(-1)).ravel()
    k = max(1, int(mag.size * fraction))
    return float(np.sort(mag)[-k:].mean())


def is_dynamic(frames_THWC: np.ndarray, fps: float) -> bool:
    """VBench's dynamic-degree rule on Farnebäck flow: frames taken every round(fps / 8) (about 8 fps); a pair moves
    when ``top_flow_magnitude`` > max(1, 8 / fps) * 6 * min(H, W) / 256; the video is dynamic when at least
    max(1, round(4 * frames / 16)) pairs move (VBench has no max(1, .), which calls every very short video dynamic).

        is_dynamic(np.zeros((17, 64, 64, 3), np.uint8), fps=8)   # False
    """
    f = _check_video(frames_THWC)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    f = f[::max(1, round(fps / 8))]
    if len(f) < 2:
        return False
    thres = max(1.0, 8.0 / fps) * DYNAMIC_THRESHOLD_PX * min(f.shape[1:3]) / DYNAMIC_REFERENCE_SIDE
    need = max(1, round(4 * len(f) / 16))
    moving = sum(top_flow_magnitude(farneback_flow(a, b)) > thres for a, b in zip(f[:-1], f[1:]))
    return moving >= need


def dynamic_degree(videos: List[np.ndarray], fps: float) -> float:
    """Fraction of ``videos`` that ``is_dynamic`` (VBench dynamic degree); higher = more motion; NaN for none."""
    return float(np.mean([is_dynamic(v, fps) for v in videos])) if videos else math.nan


def psnr(a_HWC: np.ndarray, b_HWC: np.ndarray, cap: float = PSNR_CAP) -> float:
    """PSNR in dB of two uint8 images (or videos) of the same shape, 10 log10(255^2 / MSE), at most ``cap``
    (identical inputs give ``cap``)."""
    a, b = np.asarray(a_HWC, np.float64), np.asarray(b_HWC, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    mse = float(((a - b) ** 2).mean())
    if mse == 0.0:
        return cap
    return float(min(cap, 10.0 * math.log10(255.0 ** 2 / mse)))


def ssim(a_HWC: np.ndarray, b_HWC: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, L 255) of two uint8 RGB images,
    the mean SSIM map averaged over channels; 1.0 for identical images."""
    a, b = np.asarray(a_HWC, np.float64), np.asarray(b_HWC, np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim: need two [H, W, C] images of one shape, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    values = []
    for c in range(a.shape[2]):
        x, y = a[..., c], b[..., c]
        mx, my = blur(x), blur(y)
        sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


def video_psnr_ssim(a_THWC: np.ndarray, b_THWC: np.ndarray) -> tuple:
    """(mean PSNR, mean SSIM) over the frames of two videos of one shape."""
    a, b = _check_video(a_THWC), _check_video(b_THWC)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    return (float(np.mean([psnr(x, y) for x, y in zip(a, b)])), float(np.mean([ssim(x, y) for x, y in zip(a, b)])))


# ------------------------------------------------------------------------------------------- distribution metrics

def _mean_cov(feats_ND: np.ndarray) -> tuple:
    x = np.asarray(feats_ND, np.float64)
    if x.ndim != 2 or len(x) < 1:
        raise ValueError(f"features must be [N >= 1, D], got {x.shape}")
    cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    return x.mean(0), np.atleast_2d(cov)


def frechet_distance(feats_a_ND: np.ndarray, feats_b_MD: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID/FVD's formula):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), lower is better, 0 for identical sets.

    With few samples (N <= D) the covariances are singular and sqrtm of their product is ill-conditioned: both get
    ``eps * I`` added first (the ridge pytorch-fid adds when sqrtm fails; here always, so the value does not jump
    when it starts to fail), sqrtm is scipy.linalg.sqrtm, its tiny imaginary part dropped, and the result clamped
    at 0. One sample: covariance 0.
    """
    from scipy import linalg

    mu_a, s_a = _mean_cov(feats_a_ND)
    mu_b, s_b = _mean_cov(feats_b_MD)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    ridge = eps * np.eye(len(mu_a))
    s_a, s_b = s_a + ridge, s_b + ridge
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = np.real(covmean)
    if not np.isfinite(covmean).all():
        raise ValueError("frechet_distance: sqrtm is not finite; raise evaluate.fd_eps")
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(0.0, value)


def clip_alignment(text_D: np.ndarray, frames_FD: np.ndarray) -> float:
    """Mean cosine similarity between one text embedding and F frame embeddings (CLIPSIM-style), in [-1, 1]."""
    t = np.asarray(text_D, np.float64).ravel()
    f = np.atleast_2d(np.asarray(frames_FD, np.float64))
    t = t / max(float(np.linalg.norm(t)), 1e-12)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return float((f @ t).mean())


# -------------------------------------------------------------------------------------------------- comparison

ARROWS = {"higher": "↑", "lower": "↓"}


@dataclass
class Comparison:
    """One row of the champion-vs-candidate table: delta = candidate - champion; verdict "better" | "worse" |
    "same" | "n/a" (a value missing or NaN)."""
    name: str
    direction: str
    champion: float
    candidate: float
    delta: float
    verdict: str


def verdict(direction: str, champion: float, candidate: float) -> str:
    """"better" / "worse" / "same" for the candidate, given the metric's direction; "n/a" if either is NaN."""
    if not (math.isfinite(champion) and math.isfinite(candidate)):
        return "n/a"
    delta = candidate - champion
    if abs(delta) <= SAME_TOLERANCE * max(1.0, abs(champion)):
        return "same"
    return "better" if (delta > 0) == (direction == "higher") else "worse"


def compare(champion: Mapping[str, float], candidate: Mapping[str, float]) -> List[Comparison]:
    """A row per metric of ``METRICS`` present in either mapping, in the table's order."""
    rows = []
    for name, spec in METRICS.items():
        if name not in champion and name not in candidate:
            continue
        a, b = float(champion.get(name, math.nan)), float(candidate.get(name, math.nan))
        rows.append(Comparison(name, spec.direction, a, b, b - a if math.isfinite(a) and math.isfinite(b)
                               else math.nan, verdict(spec.direction, a, b)))
    return rows
