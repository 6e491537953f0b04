"""Model configs: plain dataclasses, importable without torch.

One class per model family; every size is a one-line factory over it (``tiny()``, ``mugv_10b()``).
Facts behind the numbers: ../shared/notes/mugv_spec.md §2 (VAE) and §3 (DiT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class DiTConfig:
    in_channels: int = 24          # VAE latent channels (spec §2.3)
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w); MUG-V has no temporal patching
    hidden_size: int = 144         # tiny: 144 = 2 heads x 72 (RoPE needs head_dim % 6 == 0, spec §9.3)
    depth: int = 2
    num_heads: int = 2
    caption_channels: int = 64     # text-encoder width (T5-XXL: 4096)
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    caption_dropout_prob: float = 0.1   # CFG dropout: caption replaced by a learned null embedding
    max_text_len: int = 32         # length of the null-caption buffer (MUG-V: 300)

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"dit.patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"dit.hidden_size ({self.hidden_size}) must be divisible by dit.num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 6:
            raise ValueError(
                f"dit head_dim = hidden_size/num_heads = {self.hidden_size // self.num_heads} must be a multiple of 6 "
                "(3D RoPE splits it into t/h/w pairs)")
        if not 0.0 <= self.caption_dropout_prob < 1.0:
            raise ValueError(f"dit.caption_dropout_prob must be in [0, 1), got {self.caption_dropout_prob}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def dit_tiny(**kw) -> DiTConfig:
    return DiTConfig(**kw)


def dit_mugv_10b(**kw) -> DiTConfig:
    return DiTConfig(**{**dict(hidden_size=3456, depth=56, num_heads=48, caption_channels=4096, max_text_len=300), **kw})


@dataclass
class VAEConfig:
    """2D spatial (x8) + causal temporal (x8) video VAE, MUG-V layout in miniature (spec §2)."""
    latent_channels: int = 24
    spatial_channels: List[int] = field(default_factory=lambda: [16, 32, 32, 32])  # per 2D level; 3 stride-2 stages
    feature_channels: int = 32     # 2D-stage output width (MUG-V: 512)
    temporal_channels: int = 32    # temporal-stage width (MUG-V: 128 x (1,2,2,4))
    spatial_downsample: int = 8
    temporal_downsample: int = 8

    def __post_init__(self) -> None:
        if self.spatial_downsample != 2 ** (len(self.spatial_channels) - 1):
            raise ValueError(
                f"vae.spatial_channels has {len(self.spatial_channels)} levels, giving x{2 ** (len(self.spatial_channels) - 1)} "
                f"downsampling, but vae.spatial_downsample is {self.spatial_downsample}")
        if self.temporal_downsample != 8:
            raise ValueError("vae.temporal_downsample must be 8 (MUG-V's 8-frame independent chunks)")


def vae_tiny(**kw) -> VAEConfig:
    return VAEConfig(**kw)


def vae_mugv(**kw) -> VAEConfig:
    return VAEConfig(**{**dict(spatial_channels=[128, 256, 512, 512], feature_channels=512, temporal_channels=128), **kw})
