"""Model configs: plain dataclasses, importable without torch.

One class per model family; every size is a one-line factory over it (``tiny()``, ``mugv_10b()``).
Facts behind the numbers: docs/mugv.md §2 (VAE) and §3 (DiT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class DiTConfig:
    in_channels: int = 24          # VAE latent channels (docs/mugv.md §2.3)
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])  # (t, h, w); MUG-V has no temporal patching
    hidden_size: int = 144         # tiny: 144 = 2 heads x 72 (RoPE needs head_dim % 6 == 0, docs/mugv.md §9.3)
    depth: int = 2
    num_heads: int = 2
    caption_channels: int = 64     # text-encoder width (T5-XXL: 4096)
    mlp_ratio: float = 4.0
    caption_dropout_prob: float = 0.1   # CFG dropout: caption replaced by a learned null embedding
    max_text_len: int = 32         # length of the null-caption buffer (MUG-V: 300)

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"dit.patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"dit.hidden_size ({self.hidden_size}) must be divisible by dit.num_heads "
                             f"({self.num_heads})")
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
    return DiTConfig(**{**dict(hidden_size=3456, depth=56, num_heads=48, caption_channels=4096, max_text_len=300),
                        **kw})


@dataclass
class VAEConfig:
    """MUG-V video VAE (docs/mugv.md §2): a per-frame 2D AutoencoderKL trunk (x8 spatial), then a temporal VAE
    (x8 time).

    ``vae_mugv()`` is the released architecture (SDXL-VAE 2D stage + MUGVAETemporal, ~412 M parameters); the default
    (``vae_tiny()``) is the same module graph with small widths and fewer blocks for CPU tests and the demo.
    """
    latent_channels: int = 24
    # 2D stage (diffusers AutoencoderKL layout): block_out_channels, resnets per encoder block (decoder: +1)
    spatial_channels: List[int] = field(default_factory=lambda: [16, 16, 32, 32])   # MUG-V/SDXL: 128, 256, 512, 512
    spatial_layers_per_block: int = 1                 # MUG-V/SDXL: 2
    spatial_latent_channels: int = 4                  # SDXL z channels: only sizes the unused encoder.conv_out /
    #                                                   decoder.conv_in, kept so the released state dict loads strictly
    spatial_mid_attention: bool = True                # single-head self-attention in both mid blocks
    scaling_factor: float = 0.18215                   # multiplied into the 2D features, divided out before decoding
    # temporal stage (MUGVAETemporal): widths temporal_channels * temporal_multipliers, res blocks per level
    temporal_channels: int = 8                        # MUG-V: 128 ("filters")
    temporal_multipliers: List[int] = field(default_factory=lambda: [1, 2, 2, 4])
    temporal_res_blocks: int = 1                      # MUG-V: 4
    norm_groups: int = 8                              # GroupNorm groups everywhere (MUG-V: 32); must divide widths
    spatial_downsample: int = 8
    temporal_downsample: int = 8
    decode_window: int = 6                            # latent frames per temporal-decoder call (MUG-V: 48 / 8)
    micro_batch_size: int = 0                         # frames per 2D-stage call at inference; 0 = all (MUG-V: 4)
    latent_stats: str = "dataset"                     # compress normalisation: "dataset" (train-split per-channel
    #                                                   stats) | "mugv" (the published constants in the VAE's buffers)

    def __post_init__(self) -> None:
        self.spatial_channels = list(self.spatial_channels)
        self.temporal_multipliers = list(self.temporal_multipliers)
        if self.spatial_downsample != 2 ** (len(self.spatial_channels) - 1):
            raise ValueError(
                f"vae.spatial_channels has {len(self.spatial_channels)} levels, giving "
                f"x{2 ** (len(self.spatial_channels) - 1)} "
                f"downsampling, but vae.spatial_downsample is {self.spatial_downsample}")
        if self.temporal_downsample != 8:
            raise ValueError("vae.temporal_downsample must be 8 (MUG-V's 8-frame independent chunks)")
        if len(self.temporal_multipliers) != 4:
            raise ValueError("vae.temporal_multipliers must have 4 levels (3 stride-2 stages = x8 in time), "
                             f"got {self.temporal_multipliers}")
        widths = self.spatial_channels + [self.temporal_channels * m for m in self.temporal_multipliers]
        bad = sorted({c for c in widths if c % self.norm_groups})
        if bad:
            raise ValueError(f"vae.norm_groups ({self.norm_groups}) must divide every block width; it does not "
                             f"divide {bad}")
        if min(self.spatial_layers_per_block, self.temporal_res_blocks, self.decode_window) < 1:
            raise ValueError("vae.spatial_layers_per_block, vae.temporal_res_blocks and vae.decode_window must be >= 1")
        if self.latent_stats not in ("dataset", "mugv"):
            raise ValueError(f"vae.latent_stats must be 'dataset' or 'mugv', got {self.latent_stats!r}")

    @property
    def feature_channels(self) -> int:
        """Width of the 2D-stage feature map the temporal stage works on (MUG-V: 512)."""
        return self.spatial_channels[-1]


def vae_tiny(**kw) -> VAEConfig:
    return VAEConfig(**kw)


def vae_mugv(**kw) -> VAEConfig:
    return VAEConfig(**{**dict(spatial_channels=[128, 256, 512, 512], spatial_layers_per_block=2, temporal_channels=128,
                               temporal_res_blocks=4, norm_groups=32, micro_batch_size=4, latent_stats="mugv"), **kw})
