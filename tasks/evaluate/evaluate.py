"""Evaluate a checkpoint: held-out flow-matching loss, sampled videos and their statistics, an HTML report.

No Flyte here; ``tasks/evaluate/task.py`` adapts it. Metrics (all floats):
- ``heldout_flow_loss``: rectified-flow loss on the val split at fixed timesteps and fixed noise (so two
  checkpoints are compared on identical inputs); ``train_flow_loss`` the same on the train split.
- ``sample_pixel_mean/std``, ``sample_temporal_diff`` (mean |frame_t+1 - frame_t|, a motion proxy) of the sampled
  videos, and the same for VAE reconstructions of the held-out clips (``real_*``); ``stat_gap`` sums the absolute
  differences (0 = samples match real clips in these simple statistics).
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

from common.config import DiTConfig, EvalConfig, FlowConfig

EVAL_TIMESTEPS = (100.0, 300.0, 500.0, 700.0, 900.0)   # fixed grid: comparable across checkpoints


def load_dit(dit_cfg: DiTConfig, step_dir: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    from models.dit import MUGDiT

    model = MUGDiT(dit_cfg)
    missing, unexpected = model.load_state_dict(load_file(str(step_dir / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir} does not match the DiT config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


@torch.no_grad()
def flow_loss_on(model, reader, clip_ids: List[str], seed: int) -> float:
    from models import rectified_flow as rf

    losses = []
    for i, cid in enumerate(clip_ids):
        latent, text, mask = reader.load(cid)
        x0 = latent[None].float()
        g = torch.Generator().manual_seed(seed + i)
        noise = torch.randn(x0.shape, generator=g)
        for t_val in EVAL_TIMESTEPS:
            t = torch.tensor([t_val])
            v = model(rf.interpolate(x0, noise, t), t, text[None].float(), mask[None].bool())
            losses.append(float(rf.flow_loss(v, x0, noise).mean()))
    return float(np.mean(losses)) if losses else float("nan")


def video_stats(frames_TCHW: torch.Tensor) -> Dict[str, float]:
    """Statistics of one video in [0, 1]."""
    return {"pixel_mean": float(frames_TCHW.mean()), "pixel_std": float(frames_TCHW.std()),
            "temporal_diff": float((frames_TCHW[1:] - frames_TCHW[:-1]).abs().mean()) if len(frames_TCHW) > 1 else 0.0}


def to_uint8_THWC(x_CTHW: torch.Tensor) -> np.ndarray:
    x = ((x_CTHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def contact_sheet_png(frames_THWC: np.ndarray, path: Path, n: int = 6) -> None:
    import cv2  # OpenCV is already a curation dependency; PyAV has no PNG writer

    idx = np.linspace(0, len(frames_THWC) - 1, min(n, len(frames_THWC))).round().astype(int)
    strip = np.concatenate([frames_THWC[i] for i in idx], axis=1)
    cv2.imwrite(str(path), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))


@torch.no_grad()
def run_evaluation(cfg: EvalConfig, dit_cfg: DiTConfig, flow: FlowConfig, latents_dir: Path, step_dir: Path,
                   out_dir: Path, progress: Callable[[str], None] = print) -> Dict[str, float]:
    from common.latents import LatentReader
    from models import rectified_flow as rf
    from tasks.curate.decode import write_clip

    torch.manual_seed(cfg.seed)
    reader = LatentReader(latents_dir)
    model = load_dit(dit_cfg, step_dir)
    vae = reader.load_vae().eval()
    text_encoder = reader.load_text_encoder()
    null_text, null_mask = reader.null_text()
    val_ids, train_ids = reader.clip_ids("val"), reader.clip_ids("train")

    # 1. held-out flow-matching loss
    metrics: Dict[str, float] = {
        "heldout_flow_loss": flow_loss_on(model, reader, val_ids, cfg.seed),
        "train_flow_loss": flow_loss_on(model, reader, train_ids[:8], cfg.seed),
        "num_heldout_clips": float(len(val_ids)),
    }
    progress(f"held-out flow loss {metrics['heldout_flow_loss']:.4f} on {len(val_ids)} clips "
             f"(train {metrics['train_flow_loss']:.4f})")

    # 2. samples: Euler + CFG with the negative (null) prompt, decoded by the dataset's VAE
    c, _, h, w = reader.load(train_ids[0])[0].shape
    down = reader.vae_spatial_downsample   # pixels per latent cell
    t_lat = (cfg.num_frames - 1) // 8 + 1
    samples_dir = out_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    texts, masks = text_encoder.encode(list(cfg.prompts))
    sample_stats, entries = [], []
    for i, prompt in enumerate(cfg.prompts):
        g = torch.Generator().manual_seed(cfg.seed + i)
        noise = torch.randn((1, c, t_lat, h, w), generator=g)
        z = rf.euler_sample(lambda x, t, y, m, **kw: model(x, t, y, m, **kw), noise, texts[i:i + 1], masks[i:i + 1],
                            null_text[None], null_mask[None], steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale,
                            height_px=h * down, width_px=w * down, generator=g)
        video = vae.decode(reader.denormalize(z[0])[None], num_frames=cfg.num_frames)[0]   # (C, T, H, W) in [-1, 1]
        frames = to_uint8_THWC(video)
        path = samples_dir / f"sample_{i:02d}.mp4"
        write_clip(path, frames, cfg.fps)
        contact_sheet_png(frames, samples_dir / f"sample_{i:02d}.png")
        sample_stats.append(video_stats(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255))
        entries.append((prompt, path))
        progress(f"sample {i + 1}/{len(cfg.prompts)}: {path.name}")

    # 3. the same statistics on VAE reconstructions of held-out (or train) clips
    real_stats = []
    for cid in (val_ids or train_ids)[:4]:
        latent = reader.load(cid)[0]
        video = vae.decode(reader.denormalize(latent[None]), num_frames=cfg.num_frames)[0]
        real_stats.append(video_stats(torch.from_numpy(to_uint8_THWC(video)).permute(0, 3, 1, 2).float() / 255))
    gap = 0.0
    for k in ("pixel_mean", "pixel_std", "temporal_diff"):
        metrics[f"sample_{k}"] = float(np.mean([s[k] for s in sample_stats]))
        metrics[f"real_{k}"] = float(np.mean([s[k] for s in real_stats]))
        gap += abs(metrics[f"sample_{k}"] - metrics[f"real_{k}"])
    metrics["stat_gap"] = gap

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    (out_dir / "report.html").write_text(render_report(metrics, entries, step_dir))
    return metrics


def render_report(metrics: Dict[str, float], samples: List[tuple], step_dir: Path) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.5g}</td></tr>" for k, v in sorted(metrics.items()))
    cards = []
    for prompt, path in samples:
        video = base64.b64encode(Path(path).read_bytes()).decode()
        sheet = base64.b64encode(Path(path).with_suffix(".png").read_bytes()).decode()
        cards.append(f"<div><p><b>{html.escape(prompt)}</b></p>"
                     f"<video controls loop width=256 src='data:video/mp4;base64,{video}'></video><br>"
                     f"<img src='data:image/png;base64,{sheet}' height=64></div>")
    return ("<html><head><meta charset='utf-8'><title>Evaluation report</title></head><body>"
            f"<h2>Evaluation of {html.escape(str(step_dir))}</h2>"
            f"<table border=1 cellpadding=4><tr><th>metric</th><th>value</th></tr>{rows}</table>"
            f"<h3>Samples</h3>{''.join(cards)}</body></html>")
