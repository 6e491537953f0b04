"""LAION-style aesthetic score: an MLP head on L2-normalised CLIP image embeddings (docs/mugv.md §1.1, < 4.5 dropped).

``AestheticScorer(cfg)`` loads a CLIP vision tower (``CLIPVisionModelWithProjection``) from ``cfg.pretrained`` and
the LAION "improved aesthetic predictor" head (``layers.0 .. layers.7``, e.g. sac+logos+ava1-l14-linearMSE.pth) from
``cfg.head``. Either left "" is built from a config and randomly initialised with ``cfg.seed``; then the scores are
noise and ``identity`` says so ("clip=tiny-random(seed=0) head=random(seed=0)"), which the manifest and MLflow record.
The random head's last bias is 5.0, the middle of the LAION scale, so random scores sit around the real ones.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from common.config import AestheticConfig

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def laion_head(dim: int):
    """The LAION improved-aesthetic-predictor MLP (dropouts are no-ops at eval; indices match its state dict)."""
    from torch import nn

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x_BD):
            return self.layers(x_BD)[:, 0]   # (B,)

    return Head()


class AestheticScorer:
    """``score(frames_THWC) -> float``: mean predicted aesthetic score of ``cfg.num_frames`` evenly spaced frames."""

    def __init__(self, cfg: AestheticConfig) -> None:
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        if cfg.pretrained:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(cfg.pretrained).eval()
            clip_id = cfg.pretrained
        else:
            self.clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden, num_hidden_layers=cfg.tiny_layers,
                num_attention_heads=4, image_size=cfg.tiny_image_size, patch_size=8,
                projection_dim=cfg.tiny_hidden)).eval()
            clip_id = f"tiny-random(seed={cfg.seed})"
        self.image_size = int(self.clip.config.image_size)
        self.head = laion_head(int(self.clip.config.projection_dim)).eval()
        if cfg.head:
            self.head.load_state_dict(_load_state(cfg.head))
            head_id = Path(cfg.head).name
        else:
            with torch.no_grad():
                self.head.layers[-1].bias.fill_(5.0)
            head_id = f"random(seed={cfg.seed})"
        self.random = not (cfg.pretrained and cfg.head)
        self.identity = f"clip={clip_id} head={head_id}"

    def preprocess(self, frames_THWC: np.ndarray):
        """uint8 [T,H,W,3] -> CLIP input float [T,3,S,S] (``clip_preprocess``, bilinear)."""
        return clip_preprocess(frames_THWC, self.image_size, cv2.INTER_LINEAR)

    def score(self, frames_THWC: np.ndarray) -> float:
        import torch

        idx = np.linspace(0, len(frames_THWC) - 1, min(self.cfg.num_frames, len(frames_THWC))).round().astype(int)
        with torch.inference_mode(), one_thread(not self.cfg.pretrained):
            emb_BD = self.clip(pixel_values=self.preprocess(frames_THWC[idx])).image_embeds
            emb_BD = emb_BD / emb_BD.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return float(self.head(emb_BD).mean())


@contextlib.contextmanager
def one_thread(enabled: bool) -> Iterator[None]:
    """Run a tiny model single-threaded: on shared cores, intra-op threads cost more than such small matmuls."""
    import torch

    prev = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _load_state(path: str):
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def clip_preprocess(frames_THWC: np.ndarray, size: int, interpolation: int):
    """uint8 [T,H,W,3] -> CLIP input float [T,3,S,S]: resize the short side to ``size`` (``interpolation``, an OpenCV
    flag), centre crop, CLIP's normalisation. Curation's aesthetic scorer and evaluation's CLIP alignment use it."""
    import torch

    s, out = size, []
    for f in frames_THWC:
        h, w = f.shape[:2]
        k = s / min(h, w)
        r = cv2.resize(np.ascontiguousarray(f), (max(s, round(w * k)), max(s, round(h * k))),
                       interpolation=interpolation)
        y0, x0 = (r.shape[0] - s) // 2, (r.shape[1] - s) // 2
        out.append((r[y0:y0 + s, x0:x0 + s].astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(out).transpose(0, 3, 1, 2).copy())
