"""The fixed evaluation suite: what is sampled (prompts, I2V images, seeds, sizes), which held-out clips are measured,
and its hash. The candidate and the champion are evaluated on the same suite; two reports compare only when their
suite hashes match (docs/evaluation.md).

    suite = build_suite(cfg, reader, codecs, feature_identity="vae:...", clip_identity="clip:...")
    suite.heldout            # clip ids from the "val" split, chosen by hash (never a train clip: asserted)
    suite.cases              # SampleCase per (prompt or image) x seed
    suite.hash               # sha256_json of suite.describe(): cases, held-out ids, sampler, metric code, codecs
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from common.config import EvalConfig
from common.hashing import code_version, sha256_bytes, sha256_file, sha256_json

EVAL_TIMESTEPS = (100.0, 300.0, 500.0, 700.0, 900.0)   # the held-out flow loss's fixed timestep grid
METRIC_CODE = ("tasks/evaluate/metrics.py", "tasks/evaluate/features.py")   # a metric's definition is in the hash


@dataclass
class SampleCase:
    """One generated video: T2V (prompt) or I2V (conditioning image: a path, or held-out clip ``clip_id``'s first
    frame). ``num_frames`` x ``height`` x ``width`` in pixels."""
    key: str                 # file stem, e.g. "t2v00_s42", "i2v00_s42"
    task: str                # "t2v" | "i2v"
    prompt: str
    seed: int
    num_frames: int
    height: int
    width: int
    image: str = ""          # i2v: the image path, "" = the first frame of held-out clip ``clip_id``
    clip_id: str = ""


@dataclass
class Suite:
    cases: List[SampleCase]
    heldout: List[str]                                    # held-out clip ids (val split)
    pixels: Dict[str, np.ndarray]                         # held-out clip id -> uint8 [T, H, W, 3] (real or decoded)
    pixels_source: str                                    # "clips" (the ClipManifest's mp4s) | "vae_decoded"
    cond_images: Dict[str, np.ndarray] = field(default_factory=dict)   # i2v case key -> uint8 [H, W, 3]
    description: Dict[str, Any] = field(default_factory=dict)
    hash: str = ""


def heldout_order(clip_id: str) -> str:
    """The held-out clips are the first ``heldout_clips`` val clips in this order: sha256 of the id, so the choice
    does not depend on the index order and adding clips keeps earlier choices when their hashes sort first."""
    return sha256_bytes(clip_id.encode(), n=16)


def select_heldout(reader: Any, n: int) -> List[str]:
    """``n`` clip ids of the dataset's "val" split by hash; raises if there is none, asserts none is a train clip."""
    val, train = reader.primary_clip_ids("val"), set(reader.clip_ids("train"))
    if not val:
        raise ValueError(f"{reader.root}: the LatentDataset has no held-out ('val') clips; set compress."
                         "holdout_fraction > 0 (and at least 2 clips) so evaluation never measures train clips")
    chosen = sorted(val, key=heldout_order)[:n]
    leaked = sorted(set(chosen) & train)
    assert not leaked, f"held-out suite contains train clips {leaked}"
    return chosen


def read_clip_pixels(path: Path, num_frames: int) -> np.ndarray:
    """The first ``num_frames`` frames of an mp4 -> uint8 [T, H, W, 3]."""
    from tasks.compress.encode import read_clip

    x = read_clip(path, num_frames)                       # [3, T, H, W] in [-1, 1]
    return ((x + 1.0) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file -> uint8 RGB [height, width, 3]: centre-cropped to the aspect, then resized (area)."""
    import cv2

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"evaluate.i2v_images: cannot read image {path}")
    h, w = bgr.shape[:2]
    if h * width > w * height:                            # too tall: crop rows
        ch = round(w * height / width)
        bgr = bgr[(h - ch) // 2:(h - ch) // 2 + ch]
    else:
        cw = round(h * width / height)
        bgr = bgr[:, (w - cw) // 2:(w - cw) // 2 + cw]
    bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def clip_captions(reader: Any) -> Dict[str, str]:
    """clip id -> caption from the dataset index ("" where there is none)."""
    if "caption" not in reader.index:
        return {}
    return {str(c): p if isinstance(p, str) else "" for c, p in zip(reader.index["clip_id"], reader.index["caption"])}


def build_suite(cfg: EvalConfig, reader: Any, codecs: Any, feature_identity: str, clip_identity: str,
                clips_dir: Optional[Path] = None, load_pixels: bool = True) -> Suite:
    """The suite of ``cfg`` on the dataset of ``reader`` (``common.latents.LatentReader``) with its ``codecs``.

    Held-out pixels: ``clips_dir/clips/<clip_id>.mp4`` (a ClipManifest folder) when every held-out clip is there,
    else the held-out latents decoded by the dataset's VAE, each at its own length 8 (T - 1) + 1. With
    ``load_pixels=False`` only the cases, the description and the hash are made (no decoding).
    """
    from tasks.evaluate.codecs import pixel_frames

    heldout = select_heldout(reader, cfg.heldout_clips)
    frames = {cid: pixel_frames(reader.latent_shape(cid)[1]) for cid in heldout}
    down = reader.vae_spatial_downsample
    sizes = {cid: (reader.latent_shape(cid)[2] * down, reader.latent_shape(cid)[3] * down) for cid in heldout}
    paths = {cid: clips_dir / "clips" / f"{cid}.mp4" for cid in heldout} if clips_dir else {}
    source = "clips" if paths and all(p.is_file() for p in paths.values()) else "vae_decoded"
    pixels: Dict[str, np.ndarray] = {}
    if load_pixels and source == "clips":
        pixels = {cid: read_clip_pixels(paths[cid], frames[cid]) for cid in heldout}
    elif load_pixels:
        pixels = {cid: codecs.decode(reader.load(cid)[0], frames[cid]) for cid in heldout}

    height, width = (cfg.height, cfg.width) if cfg.height and cfg.width else sizes[heldout[0]]
    captions = clip_captions(reader)
    cases: List[SampleCase] = []
    for i, prompt in enumerate(cfg.prompts):
        for seed in cfg.seeds:
            cases.append(SampleCase(f"t2v{i:02d}_s{seed}", "t2v", prompt, seed, cfg.num_frames, height, width))
    cond_images: Dict[str, np.ndarray] = {}
    image_hashes: Dict[str, str] = {}
    k = 0
    for i, image in enumerate(cfg.i2v_images):
        given = cfg.i2v_prompts[i] if cfg.i2v_prompts else ""
        if image:
            img = load_image(image, height, width) if load_pixels else None
            image_hashes[image] = sha256_file(image, n=16)
            shape, clip_id, prompt = (cfg.num_frames, height, width), "", given
        else:
            clip_id = heldout[k % len(heldout)]
            k += 1
            img = pixels[clip_id][0] if load_pixels else None
            shape = (frames[clip_id], *sizes[clip_id])
            prompt = given or captions.get(clip_id, "")
        for seed in cfg.seeds:
            case = SampleCase(f"i2v{i:02d}_s{seed}", "i2v", prompt, seed, *shape, image=image, clip_id=clip_id)
            cases.append(case)
            if img is not None:
                cond_images[case.key] = img

    description = {
        "cases": [asdict(c) for c in cases],
        "image_sha256": image_hashes,
        "heldout": heldout,
        "heldout_frames": frames,
        "pixels_source": source,
        "sample_steps": cfg.sample_steps, "cfg_scale": cfg.cfg_scale, "fps": cfg.fps,
        "flow_loss": {"seed": cfg.seed, "timesteps": list(EVAL_TIMESTEPS)},
        "features": feature_identity, "fd_eps": cfg.fd_eps,
        "clip": clip_identity, "clip_frames": cfg.clip_frames,
        # clip ids hash the clips' pixels; the latent space (VAE, text encoder, normalisation) makes their latents
        "latent_space": codecs.latent_space,
        "metric_code": code_version(*METRIC_CODE),
    }
    return Suite(cases=cases, heldout=heldout, pixels=pixels, pixels_source=source, cond_images=cond_images,
                 description=description, hash=sha256_json(description, n=16))
