"""Video VAE in the MUG-V layout (spec §2): a per-frame 2D spatial stage, then a causal temporal stage.

Encode: pixels x_BCTHW in [-1, 1] -> 2D encoder per frame (x8 spatial, ``feature_channels`` wide) -> temporal encoder on
independent 8-frame chunks (three stride-2 causal convs, x8 in time) -> DiagonalGaussian over ``latent_channels``.
For T = 8k+1 frame 0 is replicated 7 extra times first, so latent frame 0 encodes frame 0 alone (an image latent).
Decode mirrors it: every latent frame is decoded on its own into 8 feature frames, then per frame to RGB; the 7
replicated frames are dropped again. Latent normalisation (per-channel shift/scale) is done by the data pipeline,
not here: this module works on raw z.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.config import VAEConfig, vae_mugv, vae_tiny

CHUNK = 8   # pixel frames per latent frame (temporal_downsample)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class CausalConv3d(nn.Module):
    """Conv3d padded only at the front in time (by repeating frame 0) and 'same' in space.

    [N, Cin, T, H, W] -> [N, Cout, T // stride_t, H, W] for T divisible by stride_t.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride_t: int = 1) -> None:
        super().__init__()
        self.pad_t = kernel - stride_t
        self.conv = nn.Conv3d(cin, cout, kernel, stride=(stride_t, 1, 1), padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_t > 0:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.pad_t, -1, -1), x], dim=2)
        return self.conv(x)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a 1x1 shortcut when widths differ. 2D (spatial) or causal 3D."""

    def __init__(self, cin: int, cout: int, dims: int) -> None:
        super().__init__()
        conv = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if dims == 2 else (lambda i, o: CausalConv3d(i, o, 3))
        shortcut = nn.Conv2d if dims == 2 else nn.Conv3d
        self.norm1, self.conv1 = _norm(cin), conv(cin, cout)
        self.norm2, self.conv2 = _norm(cout), conv(cout, cout)
        self.shortcut = shortcut(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SpatialEncoder(nn.Module):
    """Per-frame 2D encoder: [N, 3, H, W] -> [N, feature_channels, H/8, W/8] (N = batch x frames)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs = cfg.spatial_channels
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        layers, prev = [], chs[0]
        for i, c in enumerate(chs):
            layers.append(ResBlock(prev, c, 2))
            if i < len(chs) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            prev = c
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(prev, prev, 2)
        self.proj = nn.Conv2d(prev, cfg.feature_channels, 1) if prev != cfg.feature_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mid(self.down(self.conv_in(x))))


class SpatialDecoder(nn.Module):
    """Per-frame 2D decoder: [N, feature_channels, h, w] -> [N, 3, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs = list(reversed(cfg.spatial_channels))
        self.proj = nn.Conv2d(cfg.feature_channels, chs[0], 1) if chs[0] != cfg.feature_channels else nn.Identity()
        self.mid = ResBlock(chs[0], chs[0], 2)
        layers, prev = [], chs[0]
        for i, c in enumerate(chs):
            layers.append(ResBlock(prev, c, 2))
            if i < len(chs) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
            prev = c
        self.up = nn.Sequential(*layers)
        self.norm_out, self.conv_out = _norm(prev), nn.Conv2d(prev, 3, 3, padding=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.up(self.mid(self.proj(f))))))


class TemporalEncoder(nn.Module):
    """Causal 3D encoder on one chunk: [N, feature_channels, 8, h, w] -> moments [N, 2*latent_channels, 1, h, w]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        c = cfg.temporal_channels
        self.conv_in = CausalConv3d(cfg.feature_channels, c, 3)
        layers = []
        for _ in range(int(math.log2(cfg.temporal_downsample))):
            layers += [ResBlock(c, c, 3), CausalConv3d(c, c, 3, stride_t=2)]
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(c, c, 3)
        self.norm_out, self.conv_out = _norm(c), nn.Conv3d(c, 2 * cfg.latent_channels, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.mid(self.down(self.conv_in(f))))))


class TimeUpsample(nn.Module):
    """Causal conv to 2C channels, then depth-to-space in time: [N, C, T, h, w] -> [N, C, 2T, h, w]."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(c, 2 * c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = x.shape
        y = self.conv(x).view(n, c, 2, t, h, w).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(n, c, 2 * t, h, w)


class TemporalDecoder(nn.Module):
    """Causal 3D decoder of one latent frame: [N, latent_channels, 1, h, w] -> [N, feature_channels, 8, h, w]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        c = cfg.temporal_channels
        self.conv_in = CausalConv3d(cfg.latent_channels, c, 3)
        self.mid = ResBlock(c, c, 3)
        layers = []
        for _ in range(int(math.log2(cfg.temporal_downsample))):
            layers += [ResBlock(c, c, 3), TimeUpsample(c)]
        self.up = nn.Sequential(*layers)
        self.norm_out, self.conv_out = _norm(c), CausalConv3d(c, cfg.feature_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.up(self.mid(self.conv_in(z))))))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2C, t, h, w]; logvar clamped to [-30, 20] (spec §2.2)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z_BCthw = mean + std * eps."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """z_BCthw = mean."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, t, h, w: [B]."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class VideoVAE(nn.Module):
    """2D spatial (x8) + causal temporal (x8) VAE; pixels [B, 3, T, H, W] <-> latents [B, C, ceil(T/8), H/8, W/8]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_encoder = SpatialEncoder(cfg)
        self.temporal_encoder = TemporalEncoder(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.temporal_decoder = TemporalDecoder(cfg)
        self.spatial_decoder = SpatialDecoder(cfg)

    @classmethod
    def tiny(cls, **kw) -> "VideoVAE":
        return cls(vae_tiny(**kw))

    @classmethod
    def mugv(cls, **kw) -> "VideoVAE":
        return cls(vae_mugv(**kw))

    @staticmethod
    def latent_frames(num_frames: int) -> int:
        """Latent frames for a clip of ``num_frames`` (8k -> k, 8k+1 -> k+1)."""
        return (num_frames + CHUNK - 1) // CHUNK

    def _check_pixels(self, x_BCTHW: torch.Tensor) -> None:
        s = self.cfg.spatial_downsample
        if x_BCTHW.dim() != 5 or x_BCTHW.shape[1] != 3:
            raise ValueError(f"VideoVAE.encode expects x [B, 3, T, H, W], got {list(x_BCTHW.shape)}")
        t, h, w = x_BCTHW.shape[2:]
        if t < 1 or t % CHUNK not in (0, 1):
            raise ValueError(f"VideoVAE.encode: T must be 8k or 8k+1, got T={t}")
        if h % s or w % s:
            raise ValueError(f"VideoVAE.encode: H and W must be multiples of {s}, got {h}x{w}")

    def encode(self, x_BCTHW: torch.Tensor) -> DiagonalGaussian:
        """x [B, 3, T, H, W] in [-1, 1], T = 8k or 8k+1 -> posterior over z [B, C, ceil(T/8), H/8, W/8].

        For 8k+1, frame 0 is repeated 7 extra times so latent frame 0 sees frame 0 only; each 8-frame chunk is
        encoded independently (chunks are folded into the batch).
        """
        self._check_pixels(x_BCTHW)
        b, _, t, hh, ww = x_BCTHW.shape
        f_NFhw = self.spatial_encoder(x_BCTHW.transpose(1, 2).reshape(b * t, 3, hh, ww))
        fc, h, w = f_NFhw.shape[1:]
        f_BTFhw = f_NFhw.view(b, t, fc, h, w)
        if t % CHUNK == 1:   # the 2D stage is per frame, so replicating its output equals replicating frame 0
            f_BTFhw = torch.cat([f_BTFhw[:, :1].expand(-1, CHUNK - 1, -1, -1, -1), f_BTFhw], dim=1)
        n = f_BTFhw.shape[1] // CHUNK
        f_NF8hw = f_BTFhw.reshape(b * n, CHUNK, fc, h, w).transpose(1, 2)
        moments_N = self.quant_conv(self.temporal_encoder(f_NF8hw))
        moments_BCthw = moments_N.view(b, n, -1, h, w).transpose(1, 2)
        return DiagonalGaussian(moments_BCthw)

    def decode(self, z_BCThw: torch.Tensor, num_frames: int) -> torch.Tensor:
        """z [B, C, t, h, w] -> x [B, 3, num_frames, 8h, 8w] (roughly [-1, 1]; clamp before saving pixels).

        ``num_frames`` must be 8t (all decoded frames) or 8(t-1)+1 (the 7 replicated copies of frame 0 are dropped).
        """
        if z_BCThw.dim() != 5 or z_BCThw.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"VideoVAE.decode expects z [B, {self.cfg.latent_channels}, t, h, w], "
                             f"got {list(z_BCThw.shape)}")
        b, c, t, h, w = z_BCThw.shape
        if num_frames not in (CHUNK * t, CHUNK * (t - 1) + 1):
            raise ValueError(f"VideoVAE.decode: num_frames must be {CHUNK * t} or {CHUNK * (t - 1) + 1} "
                             f"for {t} latent frames, got {num_frames}")
        z_NC1hw = self.post_quant_conv(z_BCThw).transpose(1, 2).reshape(b * t, c, 1, h, w)
        f_NF8hw = self.temporal_decoder(z_NC1hw)
        fc = f_NF8hw.shape[1]
        f_BTFhw = f_NF8hw.transpose(1, 2).reshape(b, t * CHUNK, fc, h, w)[:, CHUNK * t - num_frames:]
        x_M3HW = self.spatial_decoder(f_BTFhw.reshape(b * num_frames, fc, h, w))
        return x_M3HW.view(b, num_frames, 3, *x_M3HW.shape[2:]).transpose(1, 2)

    def forward(self, x_BCTHW: torch.Tensor, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: x [B, 3, T, H, W] -> (recon [B, 3, T, H, W], posterior)."""
        posterior = self.encode(x_BCTHW)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z, x_BCTHW.shape[2]), posterior


def tiny(**kw) -> VideoVAE:
    """The CPU-sized VAE (models.config.vae_tiny)."""
    return VideoVAE(vae_tiny(**kw))


def mugv(**kw) -> VideoVAE:
    """The MUG-V-sized VAE (models.config.vae_mugv); random init, weights import is separate."""
    return VideoVAE(vae_mugv(**kw))
