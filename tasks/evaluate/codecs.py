"""What turns a model's latents into pixels and prompts into text features: the VAE, the text encoder, the null text
and the latent statistics, read from a LatentDataset folder or from a registered version's ``codecs/`` artifact
(the same files: meta.json, vae/, text_encoder/, null_text.safetensors; docs/artifacts.md).

    codecs = Codecs.load(latents_dir)
    z = codecs.encode_video(frames_THWC)        # normalised latent [C, t, h, w] (the DiT's space)
    frames = codecs.decode(z, num_frames)       # uint8 [num_frames, H, W, 3]; num_frames = 8 (t - 1) + 1 for clips
    text, mask = codecs.encode_text(["a cat"])  # [B, L, D], [B, L]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import torch

from common.latents import META, NULL_TEXT, TEXT_DIR, TEXT_MASK, VAE_CONFIG, VAE_DIR, VAE_WEIGHTS
from common.latents import TEXT as TEXT_KEY


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames of an 8k+1 clip whose latent has ``latent_frames`` frames: 8 (T - 1) + 1 (T = 14 -> 105)."""
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    return 8 * (latent_frames - 1) + 1


def to_uint8_THWC(x_CTHW: torch.Tensor) -> np.ndarray:
    """VAE output [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((x_CTHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def to_pixels_CTHW(frames_THWC: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames_THWC)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


@dataclass
class Codecs:
    root: Path
    vae: Any
    text_encoder: Any
    null_text: torch.Tensor         # [L, D]
    null_mask: torch.Tensor         # [L] bool
    mean: torch.Tensor              # [C]
    std: torch.Tensor               # [C]
    vae_identity: str               # sha256 of the VAE weights (meta.json)
    text_identity: str
    spatial_downsample: int

    @classmethod
    def load(cls, root: str | Path) -> "Codecs":
        from safetensors.torch import load_file

        from models.config import VAEConfig
        from models.text_encoder import TextEncoder
        from models.vae import VideoVAE, load_vae_state

        root = Path(root)
        if not (root / META).is_file():
            raise FileNotFoundError(f"{root / META} not found: {root} is neither a LatentDataset folder nor a "
                                    "registered version's codecs/ (docs/artifacts.md)")
        meta = json.loads((root / META).read_text())
        vae_cfg = VAEConfig(**json.loads((root / VAE_DIR / VAE_CONFIG).read_text()))
        vae = load_vae_state(VideoVAE(vae_cfg), load_file(str(root / VAE_DIR / VAE_WEIGHTS))).eval()
        null = load_file(str(root / NULL_TEXT))
        pretrained = meta["text_encoder"].get("pretrained", "")
        text = (TextEncoder.from_pretrained(pretrained, max_length=int(null[TEXT_MASK].numel())) if pretrained
                else TextEncoder.load(root / TEXT_DIR))
        return cls(root=root, vae=vae, text_encoder=text, null_text=null[TEXT_KEY].float(),
                   null_mask=null[TEXT_MASK].bool(), mean=torch.tensor(meta["latent_mean"], dtype=torch.float32),
                   std=torch.tensor(meta["latent_std"], dtype=torch.float32),
                   vae_identity=str(meta["vae"].get("weights_sha256", "")),
                   text_identity=str(meta["text_encoder"].get("weights_sha256", pretrained)),
                   spatial_downsample=int(vae_cfg.spatial_downsample))

    @property
    def latent_space(self) -> str:
        """Identity of the latent space a DiT trained on these codecs works in (VAE + normalisation + text)."""
        from common.hashing import sha256_json

        return sha256_json([self.vae_identity, self.text_identity, self.mean.tolist(), self.std.tolist()], n=16)

    def _stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.mean.view(-1, 1, 1, 1), self.std.view(-1, 1, 1, 1)

    @torch.no_grad()
    def encode_video(self, frames_THWC: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> normalised latent [C, ceil(T / 8), H / 8, W / 8] (posterior mode, as compress)."""
        z = self.vae.encode(to_pixels_CTHW(frames_THWC)[None]).mode()[0]
        mean, std = self._stats()
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latent_CTHW: torch.Tensor, num_frames: int) -> np.ndarray:
        """Normalised latent [C, T, h, w] -> uint8 [num_frames, H, W, 3]."""
        mean, std = self._stats()
        video = self.vae.decode((latent_CTHW * std + mean)[None], num_frames=num_frames)[0]
        return to_uint8_THWC(video)

    def encode_text(self, prompts: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder.encode(list(prompts))
