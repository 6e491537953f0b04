"""The 2D spatial stage of the MUG-V VAE: a diffusers ``AutoencoderKL`` (SDXL-VAE layout) run per frame.

Parameter names follow diffusers 0.29 (ResnetBlock2D, Attention, Down/UpEncoderBlock2D, UNetMidBlock2D) so the
released ``vae.pt`` loads by name; diffusers itself is not a dependency. See ``models/vae.py`` for the whole VAE.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.config import VAEConfig


class ResnetBlock2D(nn.Module):
    """GN -> SiLU -> conv3x3, twice, plus a 1x1 ``conv_shortcut`` when widths differ (GroupNorm eps 1e-6)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SelfAttention2D(nn.Module):
    """Single-head spatial self-attention with a GroupNorm in front and a residual: [N, C, h, w] -> same."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t_NLC = self.group_norm(x.view(n, c, h * w)).transpose(1, 2)
        q, k, v = (proj(t_NLC).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        o_NLC = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        o_NLC = self.to_out[1](self.to_out[0](o_NLC))
        return x + o_NLC.transpose(1, 2).reshape(n, c, h, w)


class MidBlock2D(nn.Module):
    """resnets[0] -> attentions[0] -> resnets[1] (diffusers UNetMidBlock2D without time embedding)."""

    def __init__(self, c: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention2D(c, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Resample2D(nn.Module):
    """``conv`` holder: stride-2 3x3 conv after a (0, 1, 0, 1) zero pad (down), or nearest x2 then 3x3 conv (up)."""

    def __init__(self, c: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0) if down else nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block2D(nn.Module):
    """``resnets`` then optional ``downsamplers``/``upsamplers`` (DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: Optional[str]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Resample2D(cout, down=True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Resample2D(cout, down=False)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder2D(nn.Module):
    """[N, 3, H, W] -> [N, spatial_channels[-1], H/8, W/8]: conv_in, down_blocks, mid_block (no output head)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs, g = cfg.spatial_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Block2D(chs[max(i - 1, 0)], c, cfg.spatial_layers_per_block, g, "down" if i < len(chs) - 1 else None)
            for i, c in enumerate(chs)])
        self.mid_block = MidBlock2D(chs[-1], g, cfg.spatial_mid_attention)
        # kept for strict state-dict compatibility with the released weights; truncated away in forward
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.spatial_latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.mid_block(x)


class Decoder2D(nn.Module):
    """[N, spatial_channels[-1], h, w] -> [N, 3, 8h, 8w]: mid_block, up_blocks, conv_norm_out, SiLU, conv_out."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        rev, g = list(reversed(cfg.spatial_channels)), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.spatial_latent_channels, rev[0], 3, padding=1)   # unused (released key)
        self.up_blocks = nn.ModuleList([
            Block2D(rev[max(i - 1, 0)], c, cfg.spatial_layers_per_block + 1, g, "up" if i < len(rev) - 1 else None)
            for i, c in enumerate(rev)])
        self.mid_block = MidBlock2D(rev[0], g, cfg.spatial_mid_attention)
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], 3, 3, padding=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(f)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL2D(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.encoder = Encoder2D(cfg)
        self.decoder = Decoder2D(cfg)


class SpatialVAE(nn.Module):
    """Per-frame 2D stage (reference ``MUGAutoencoderKL``): ``module`` is the AutoencoderKL."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.module = AutoencoderKL2D(cfg)
        self.scaling_factor = cfg.scaling_factor
        self.micro_batch_size = cfg.micro_batch_size

    def _per_frame(self, fn, x_BCTHW: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x_BCTHW.shape
        x_NCHW = x_BCTHW.transpose(1, 2).reshape(b * t, c, h, w)
        bs = self.micro_batch_size if (self.micro_batch_size > 0 and not torch.is_grad_enabled()) else b * t
        y_NCHW = torch.cat([fn(x_NCHW[i:i + bs]) for i in range(0, b * t, bs)])
        return y_NCHW.view(b, t, *y_NCHW.shape[1:]).transpose(1, 2)

    def encode(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> scaled features [B, F, T, H/8, W/8]."""
        return self._per_frame(lambda x: self.module.encoder(x) * self.scaling_factor, x_BCTHW)

    def decode(self, f_BFThw: torch.Tensor) -> torch.Tensor:
        """Scaled features [B, F, T, h, w] -> pixels [B, 3, T, 8h, 8w]."""
        return self._per_frame(lambda f: self.module.decoder(f / self.scaling_factor), f_BFThw)
