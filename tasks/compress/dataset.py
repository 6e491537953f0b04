"""Reader for the LatentDataset folder (docs/artifacts.md), used by the trainer and the evaluator.

Latents in the shards are normalised, ``(z - latent_mean) / latent_std`` per channel; ``denormalize`` undoes it before
``VideoVAE.decode``. No Flyte or MLflow here: it reads a plain folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.config import VAEConfig
from models.text_encoder import TextEncoder
from models.vae import VideoVAE, load_vae_state

INDEX, META, NULL_TEXT, VAE_DIR, TEXT_DIR = "index.parquet", "meta.json", "null_text.safetensors", "vae", "text_encoder"
VAE_WEIGHTS, VAE_CONFIG = "vae.safetensors", "config.json"


def content_hash(root: str | Path, meta: Dict[str, Any]) -> str:
    """sha256 over every file under ``root`` except meta.json (sorted relative path + bytes), then over ``meta``
    without its "content_hash" key (canonical JSON). Identical inputs and seeds give the same hash."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.relative_to(root).as_posix() != META):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    body = {k: v for k, v in meta.items() if k != "content_hash"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


class LatentDatasetReader:
    """``LatentDatasetReader(dir)``: ``.index`` (DataFrame), ``.meta`` (dict), per-clip ``load`` and the models."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for name in (INDEX, META):
            if not (self.root / name).is_file():
                raise FileNotFoundError(f"not a LatentDataset folder: {self.root} has no {name}")
        self.index: pd.DataFrame = pd.read_parquet(self.root / INDEX)
        self.meta: Dict[str, Any] = json.loads((self.root / META).read_text())
        self._shard = dict(zip(self.index["clip_id"], self.index["shard"]))
        self.latent_mean = torch.tensor(self.meta["latent_mean"], dtype=torch.float32)
        self.latent_std = torch.tensor(self.meta["latent_std"], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.index)

    def clip_ids(self, split: Optional[str] = None) -> List[str]:
        """Clip ids in index order, optionally only those of ``split`` ("train" | "val")."""
        rows = self.index if split is None else self.index[self.index["split"] == split]
        return list(rows["clip_id"])

    def load(self, clip_id: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (latent_CTHW float32 normalised, text_LD float32, text_mask_L bool)."""
        if clip_id not in self._shard:
            raise KeyError(f"clip {clip_id!r} is not in {self.root / INDEX}")
        with safe_open(str(self.root / self._shard[clip_id]), framework="pt") as f:
            latent = f.get_tensor(f"{clip_id}/latent")
            text = f.get_tensor(f"{clip_id}/text")
            mask = f.get_tensor(f"{clip_id}/text_mask").bool()
        return latent, text, mask

    def null_text(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoding of "" -> (text_LD float32, mask_L bool)."""
        t = load_file(str(self.root / NULL_TEXT))
        return t["text"], t["text_mask"].bool()

    def _stats(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c = self.latent_mean.numel()
        if x.dim() not in (4, 5) or x.shape[-4] != c:
            raise ValueError(f"expected a latent [C, T, H, W] or [B, C, T, H, W] with C={c}, got {list(x.shape)}")
        shape = (c, 1, 1, 1)
        return (self.latent_mean.view(shape).to(x.device, x.dtype), self.latent_std.view(shape).to(x.device, x.dtype))

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Stored (normalised) latent [C,T,H,W] or [B,C,T,H,W] -> raw z for ``VideoVAE.decode``."""
        mean, std = self._stats(latent)
        return latent * std + mean

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE z [C,T,H,W] or [B,C,T,H,W] -> the normalised space the shards and the DiT use."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def load_vae(self) -> VideoVAE:
        """The VAE that produced the latents (eval mode, CPU)."""
        cfg = VAEConfig(**json.loads((self.root / VAE_DIR / VAE_CONFIG).read_text()))
        return load_vae_state(VideoVAE(cfg), load_file(str(self.root / VAE_DIR / VAE_WEIGHTS))).eval()

    def load_text_encoder(self) -> TextEncoder:
        """The caption encoder: the copied tiny one, or the referenced pretrained one (same max_length)."""
        pretrained = self.meta["text_encoder"].get("pretrained", "")
        if pretrained:
            return TextEncoder.from_pretrained(pretrained, max_length=int(self.null_text()[1].numel()))
        return TextEncoder.load(self.root / TEXT_DIR)
