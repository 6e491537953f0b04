"""Synthetic test videos with known ground truth (hard-cut positions, which scenes the filters must reject).

Scene kinds:
- ``texture``: a static blurred-noise texture tinted with the scene's hue, plus a textured square that moves a few
  pixels per frame. Laplacian variance ~650 (inside the default [200, 2000] band), mean luma 0.2-0.4.
- ``flat``: a smooth colour gradient with a soft moving blob; Laplacian variance ~0, fails the sharpness filter.
- ``dark``: a faint texture at ~3 % luma; fails the brightness filter.
- ``static``: the texture without the moving square (motion ~0; fails the motion filter).
- ``shaky``: the texture scene translated by a random offset of up to +-``SHAKE`` px every frame (camera shake; large
  optical flow, fails the motion filter's upper bound).
A scene may carry burnt-in ``text`` (white lettering with a dark outline across the lower third) for the overlay
filter. ``render_video`` can join scenes with gradual transitions (("dissolve" | "fade", frames)) instead of cuts.
Consecutive scenes differ in hue, brightness and texture, so ContentDetector scores a cut at ~40-50 while
within-scene frame differences stay ~1-2 (threshold 27).

``make_image`` writes one frame of a scene as an image file (jpg, png or webp): the image inputs of the curriculum's
image stage, with the same ground truth (a ``flat`` image fails the sharpness filter).

CLI: ``python -m tasks.curate.synthetic --out DIR [--sample real.mp4] [--image real.png]`` writes the demo input set.
"""
from __future__ import annotations

import argparse
import colorsys
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import av
import cv2
import numpy as np

from tasks.curate.decode import X264_OPTIONS, write_clip

KINDS = ("texture", "flat", "dark", "static", "shaky")
SHAKE = 10
_PALETTE = ((0.08, 0.55), (0.33, 0.35), (0.60, 0.60), (0.80, 0.40))  # (hue, level) cycled over scenes
_TEXTURE_AMP = 27.0


@dataclass(frozen=True)
class SceneSpec:
    """One scene: ``kind`` in KINDS, length in frames; hue/level in [0, 1] (None: cycled palette)."""
    kind: str = "texture"
    frames: int = 20
    hue: Optional[float] = None
    level: Optional[float] = None
    seed: int = 0
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SceneSpec.kind must be one of {KINDS}, got '{self.kind}'")
        if self.frames < 1:
            raise ValueError(f"SceneSpec.frames must be >= 1, got {self.frames}")


def _unit_noise_HW(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    noise_HW = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigma)
    return noise_HW / max(float(noise_HW.std()), 1e-6)


def render_scene(spec: SceneSpec, width: int, height: int, index: int = 0) -> np.ndarray:
    """Frames uint8 [T,H,W,3] of one scene; ``index`` picks the palette entry when hue/level are None."""
    rng = np.random.default_rng(spec.seed * 1009 + index)
    hue = spec.hue if spec.hue is not None else _PALETTE[index % len(_PALETTE)][0]
    level = spec.level if spec.level is not None else _PALETTE[index % len(_PALETTE)][1]
    amp = _TEXTURE_AMP
    if spec.kind == "dark":
        level, amp = 0.05, 2.0
    colour_C = np.array(colorsys.hsv_to_rgb(hue, 0.7, 1.0), np.float32) * 255.0 * level
    side = max(4, min(height, width) // 4)
    if spec.kind == "flat":
        ramp_W = np.linspace(0.8, 1.2, width, dtype=np.float32)
        background_HWC = np.broadcast_to(colour_C * ramp_W[:, None], (height, width, 3)).copy()
        yy, xx = np.mgrid[:side, :side].astype(np.float32) - (side - 1) / 2
        object_HW = 40.0 * np.exp(-(yy ** 2 + xx ** 2) / (2 * (side / 4) ** 2))
    else:
        background_HWC = colour_C + amp * _unit_noise_HW(rng, height, width, 1.2)[..., None]
        object_HW = amp * _unit_noise_HW(rng, side, side, 1.0) + (60.0 if spec.kind == "texture" else 3.0)
    span_y, span_x = max(1, height - side), max(1, width - side)
    frames = []
    for t in range(spec.frames):
        frame_HWC = background_HWC.copy()
        if spec.kind != "static":
            y, x = (2 * t) % span_y, (3 * t) % span_x
            frame_HWC[y:y + side, x:x + side] += object_HW[..., None]
        if spec.kind == "shaky":
            dx, dy = rng.integers(-SHAKE, SHAKE + 1, 2)
            shift_23 = np.array([[1, 0, dx], [0, 1, dy]], dtype=np.float32)
            frame_HWC = cv2.warpAffine(frame_HWC, shift_23, (width, height),
                                       borderMode=cv2.BORDER_REFLECT)
        frame = np.clip(frame_HWC, 0, 255).astype(np.uint8)
        if spec.text:
            scale = height / 120
            org = (max(2, width // 16), int(height * 0.85))
            cv2.putText(frame, spec.text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), max(2, round(4 * scale)),
                        cv2.LINE_AA)
            cv2.putText(frame, spec.text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                        max(1, round(2 * scale)), cv2.LINE_AA)
        frames.append(frame)
    return np.stack(frames)


def render_video(scenes: Sequence[SceneSpec], width: int = 128, height: int = 96,
                 transitions: Optional[Sequence[Optional[Tuple[str, int]]]] = None):
    """(frames [T,H,W,3], hard cuts, gradual ranges [start, end)); ``transitions[i]`` joins scene i and i+1:
    None = hard cut, ("dissolve", n) = n cross-faded frames, ("fade", n) = n frames to black and n back."""
    rendered = [render_scene(s, width, height, i) for i, s in enumerate(scenes)]
    transitions = list(transitions or []) + [None] * len(scenes)
    parts, cuts, ranges, t = [rendered[0]], [], [], len(rendered[0])
    for i in range(1, len(rendered)):
        a, b, tr = rendered[i - 1][-1].astype(np.float32), rendered[i][0].astype(np.float32), transitions[i - 1]
        if tr is None:
            cuts.append(t)
        else:
            kind, n = tr
            w = np.linspace(0, 1, n + 2)[1:-1]
            if kind == "dissolve":
                extra = [(1 - x) * a + x * b for x in w]
            elif kind == "fade":
                extra = [(1 - x) * a for x in w] + [np.zeros_like(a)] + [x * b for x in w]
            else:
                raise ValueError(f"render_video: transition must be 'dissolve' or 'fade', got '{kind}'")
            parts.append(np.clip(np.stack(extra), 0, 255).astype(np.uint8))
            ranges.append((t, t + len(extra)))
            t += len(extra)
        parts.append(rendered[i])
        t += len(rendered[i])
    return np.concatenate(parts), cuts, ranges


def make_scenes_video(path: str | Path, scenes: Sequence[SceneSpec], width: int = 128, height: int = 96,
                      fps: float = 8) -> List[int]:
    """Write the scenes back to back as H.264 MP4; return the cut frame indices (first frame of scenes 2..n)."""
    if not scenes:
        raise ValueError("make_scenes_video: need at least one scene")
    frames_THWC = np.concatenate([render_scene(s, width, height, i) for i, s in enumerate(scenes)])
    write_clip(path, frames_THWC, fps)
    return [int(c) for c in np.cumsum([s.frames for s in scenes])[:-1]]


def _reencode(src: Path, dst: Path, width: int, height: int, max_frames: int) -> None:
    """Downscale a real video (keeps its frame rate) so the shipped copy stays small."""
    frames = []
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        for frame in container.decode(stream):
            frames.append(cv2.resize(frame.to_ndarray(format="rgb24"), (width, height), interpolation=cv2.INTER_AREA))
            if len(frames) == max_frames:
                break
    write_clip(dst, np.stack(frames), fps, crf=23)


_SAMPLE_CAPTION = ("a woman with long curly dark hair, wearing a white crop top and a tiered white maxi skirt, stands "
                   "facing the camera against a plain beige studio background; full-body shot, stationary camera")
_ATTRIBUTION = """# Attribution

`mugv_i2v_sample.mp4` is a downscaled (288x512) re-encode of the image-to-video sample video from the
Shopee-MUG/MUG-V repository (https://github.com/Shopee-MUG/MUG-V), licensed under the Apache License 2.0.
`mugv_i2v_sample.txt` is our caption for it.

`mugv_i2v_reference.webp` is a downscaled (256 rows) re-encode of the image-to-video reference image of the same
repository (Apache License 2.0); `mugv_i2v_reference.txt` is our caption for it.

All other videos and images here are synthetic, generated by `python -m tasks.curate.synthetic --out data/demo`.
`empty.mp4` (0 bytes) and `corrupt.mp4` (random bytes) are deliberately broken inputs.
"""


# a variable-frame-rate stream: presentation times in 1/16 s ticks with irregular gaps (intervals 1, 2, 3 ticks)
VFR_TICKS_PER_S = 16
VFR_PTS = (0, 1, 2, 4, 5, 8, 9, 10, 12, 13, 16, 17, 18, 20, 21, 24, 25, 26, 28, 29, 32, 33, 34, 36)


VFR_SCENE = SceneSpec("texture", len(VFR_PTS))


def make_vfr_video(path: str | Path, spec: SceneSpec = VFR_SCENE, size: int = 64,
                   pts: Sequence[int] = VFR_PTS, frames_THWC: Optional[np.ndarray] = None) -> List[int]:
    """An H.264 MP4 of ``spec``'s frames (or ``frames_THWC`` [T, size, size, 3]) at the irregular times ``pts``
    (ticks of 1/``VFR_TICKS_PER_S`` s): the decoder's variable-rate resampling has a known answer. Returns the pts
    written."""
    frames_THWC = render_scene(spec, size, size) if frames_THWC is None else frames_THWC
    tb = Fraction(1, VFR_TICKS_PER_S)
    with av.open(str(path), mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=VFR_TICKS_PER_S)
        s.width, s.height, s.pix_fmt, s.codec_context.time_base = size, size, "yuv420p", tb
        s.options = dict(X264_OPTIONS)
        for p, f in zip(pts, frames_THWC):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = p, tb
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return list(pts)


def make_image(path: str | Path, spec: SceneSpec, width: int = 128, height: int = 96) -> Path:
    """Write the first frame of ``spec`` as an image file (format from the suffix: .jpg, .png, .webp)."""
    frame_HWC = render_scene(spec, width, height)[0]
    path = Path(path)
    if not cv2.imwrite(str(path), np.ascontiguousarray(frame_HWC[..., ::-1])):
        raise ValueError(f"OpenCV cannot write {path} (suffix {path.suffix}): use .jpg, .png or .webp")
    return path


def _downscale_image(src: Path, dst: Path, height: int) -> None:
    bgr = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {src}")
    width = max(16, round(bgr.shape[1] * height / bgr.shape[0]))
    cv2.imwrite(str(dst), cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA))


def write_demo_set(out_dir: str | Path, sample: Optional[str | Path] = None, seed: int = 0,
                   image: Optional[str | Path] = None) -> List[Path]:
    """Write the demo inputs into ``out_dir``; ``sample`` is an optional real video to ship downscaled, ``image`` an
    optional real image (shipped as a 256-row webp)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_scenes_video(out / "synthetic_a.mp4", [SceneSpec("texture", 20, seed=seed + i) for i in range(3)])
    (out / "synthetic_a.txt").write_text("a small textured square drifting over a coloured noise pattern, "
                                         "three shots in different colours\n")
    make_scenes_video(out / "synthetic_b.mp4", [SceneSpec("texture", 40, seed=seed), SceneSpec("flat", 20, seed=seed)])
    (out / "synthetic_b.txt").write_text("a textured square moving diagonally over an orange noise pattern\n")
    # every scene of synthetic_c is rejected (too dark, too short, too blurry); width 112 takes the PyAV path
    make_scenes_video(out / "synthetic_c.mp4", [SceneSpec("dark", 20, seed=seed), SceneSpec("texture", 10, seed=seed),
                                                 SceneSpec("flat", 20, seed=seed)], width=112, height=80)
    make_image(out / "synthetic_d.jpg", SceneSpec("texture", 1, seed=seed + 7))   # kept: an image sample
    (out / "synthetic_d.txt").write_text("a textured square on a coloured noise pattern, a still image\n")
    make_image(out / "synthetic_e.png", SceneSpec("flat", 1, seed=seed))   # rejected: too blurry (sharpness)
    (out / "empty.mp4").write_bytes(b"")
    (out / "corrupt.mp4").write_bytes(np.random.default_rng(seed).bytes(4096))
    if sample is not None:
        _reencode(Path(sample), out / "mugv_i2v_sample.mp4", 288, 512, max_frames=110)
        (out / "mugv_i2v_sample.txt").write_text(_SAMPLE_CAPTION + "\n")
        (out / "ATTRIBUTION.md").write_text(_ATTRIBUTION)
    if image is not None:
        _downscale_image(Path(image), out / "mugv_i2v_reference.webp", 256)
        (out / "mugv_i2v_reference.txt").write_text(_SAMPLE_CAPTION + " The first frame, as a still image.\n")
    return sorted(p for p in out.iterdir() if p.is_file())


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--sample", default=None, help="optional real video to include (downscaled to 288x512)")
    parser.add_argument("--image", default=None, help="optional real image to include (downscaled to 256 rows)")
    parser.add_argument("--clean", action="store_true", help="delete the output folder first")
    args = parser.parse_args(argv)
    if args.clean and Path(args.out).exists():
        shutil.rmtree(args.out)
    for p in write_demo_set(args.out, args.sample, image=args.image):
        print(f"{p}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
