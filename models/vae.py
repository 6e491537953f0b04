"""The MUG-V video VAE (docs/mugv.md §2), written so the released MUG-V ``vae.pt`` loads into it by key name.

Layout (names are the reference's state-dict names, ``mug_v/encoder/vae/``):

* ``spatial_vae.module.{encoder,decoder}`` - a diffusers ``AutoencoderKL`` in the SDXL-VAE layout, run per frame.
  The encoder stops after ``mid_block`` and emits the ``spatial_channels[-1]``-wide (512) map at 1/8 size; the
  decoder starts at ``mid_block``. ``encoder.conv_norm_out/conv_out`` and ``decoder.conv_in`` exist (the released
  state dict has them) but are never run. No quant/post-quant convs. Features are multiplied by ``scaling_factor``
  (0.18215) after the encoder and divided by it before the decoder.
* ``temporal_vae`` - MUGVAETemporal: a 3D conv VAE on those features, x8 in time, no spatial resampling.
  ``encoder`` (conv_in, per-level ``block_res_blocks``, stride-2 ``conv_blocks``, ``res_blocks``, GN, SiLU, 1x1x1
  ``conv2`` to 2*24 moments), ``quant_conv``; ``post_quant_conv``, ``decoder`` (``conv1``, ``res_blocks``,
  ``upsample_block`` = nearest x2 in time + res convs, per-level ``block_res_blocks``, 3x3x3 ``conv_blocks`` to 2C
  then depth-to-space in time (levels 3 and 2), GN, SiLU, ``conv_out``).
* ``shift``/``scale`` buffers [1, 24, 1, 1, 1] (MUG-V's per-channel latent mean/std) and a scalar ``logvar``
  parameter (the reference's learned NLL variance; unused here).

Temporal conventions (exactly the reference's):

* "CausalConv3d" pads time with zeros, ``(k - 1) + (1 - stride)`` split ``//2`` front / rest back - so a k=3 s=1
  conv sees one frame on each side (not front-causal) and a k=3 s=2 conv pads only the back.
* Encoding: each 8-frame chunk is encoded on its own (chunks are folded into the batch), so latent frame i depends
  on pixel chunk i only. ``T % 8 == 1``: frame 0 is replicated 7 extra times first (latent frame 0 is an image
  latent); any other ``T % 8 != 0``: zero frames are padded at the front (reference ``temporal_vae.encode``).
* Decoding: the temporal decoder runs on windows of ``decode_window`` (6) latent frames; inside a window latent
  frames see their neighbours on both sides (symmetric zero padding), across windows nothing. The
  ``8 * t - num_frames`` surplus frames are dropped from the front of the whole video.

``encode`` returns the posterior over RAW z; latent normalisation ``(z - shift) / scale`` (what the reference
``MUGVAE.encode`` returns) is ``normalize`` here and is applied exactly once, by the compress stage.

Deviations from the reference, on purpose: (1) ``encode`` returns the posterior (the compress stage takes its mode)
where ``MUGVAE.encode`` returns a normalised sample; (2) the reference's windowed ``MUGVAE.decode`` hands each window
its own ``num_frames`` and so, for an 8k+1 clip longer than one window, drops the 7 surplus frames from the front of
the LAST window; here they are dropped from the front of the video. Both agree whenever the latents fit one window or
``num_frames`` is 8t (MUG-V inference decodes ``latents[1:]`` with 8t frames).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from models.config import VAEConfig, vae_mugv, vae_tiny
from models.vae2d import SpatialVAE
from models.weights import check_state_dict, read_state_dict, shapes_of, unwrap_state_dict

CHUNK = 8   # pixel frames per latent frame (temporal_downsample)

# Per-channel latent statistics of the released MUG-V VAE (reference MUGVAE(mean=..., std=...), docs/mugv.md §2.3).
MUGV_LATENT_MEAN: Tuple[float, ...] = (
    -0.0194091796875, 0.09619140625, -0.796875, 0.1591796875, -0.2578125, 0.359375, -0.3203125, -0.287109375,
    -0.0069580078125, 0.3046875, 0.310546875, -0.451171875, -0.1728515625, 0.369140625, 0.2177734375,
    -3.075599670410156e-05, 0.1630859375, -0.267578125, -0.1962890625, -0.1298828125, -0.28515625, -0.515625,
    0.5859375, -0.34375)
MUGV_LATENT_STD: Tuple[float, ...] = (
    0.8817, 0.6523, 0.9152, 1.2117, 3.3516, 0.7528, 0.8177, 0.8637, 0.9075, 2.8875, 0.8980, 1.1202, 1.0003, 2.5163,
    0.6652, 1.2573, 0.7279, 1.0777, 1.5159, 0.8680, 1.1859, 1.0484, 2.4750, 1.5881)


# ------------------------------------------------------------------------------------------------ temporal stage

class CausalConv3d(nn.Module):
    """Conv3d (stride only in time) with zero time padding ``(k-1) + (1-stride)`` split //2 front / rest back and
    'same' spatial padding; the weight lives in ``.conv`` (reference name)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride_t: int = 1, bias: bool = True) -> None:
        super().__init__()
        pad_t = (kernel - 1) + (1 - stride_t)
        self.pad = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, pad_t // 2, pad_t - pad_t // 2)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=(stride_t, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad) if any(self.pad) else x)


class ResBlock3D(nn.Module):
    """GN -> SiLU -> conv3^3 (no bias), twice, plus a 1x1x1 ``conv3`` shortcut when widths differ; with
    ``upsample`` the input is first repeated x2 in time (the reference's UpsampleBlock)."""

    def __init__(self, cin: int, cout: int, groups: int, upsample: bool = False) -> None:
        super().__init__()
        self.upsample = upsample
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        if cin != cout:
            self.conv3 = CausalConv3d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = x.repeat_interleave(2, dim=2)
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.conv3(x) if hasattr(self, "conv3") else x) + h


def _res_chain(cin: int, cout: int, n: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResBlock3D(cin if i == 0 else cout, cout, groups) for i in range(n)])


class TemporalEncoder(nn.Module):
    """One 8-frame chunk [N, F, 8, h, w] -> moments [N, 2*latent, 1, h, w] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, g, n = [cfg.temporal_channels * m for m in cfg.temporal_multipliers], cfg.norm_groups, \
            cfg.temporal_res_blocks
        self.conv_in = CausalConv3d(cfg.feature_channels, widths[0], 3, bias=False)
        ins = [widths[0]] + widths[:-1]
        self.block_res_blocks = nn.ModuleList([_res_chain(ci, co, n, g) for ci, co in zip(ins, widths)])
        self.conv_blocks = nn.ModuleList([CausalConv3d(c, c, 3, stride_t=2) for c in widths[:-1]])
        self.res_blocks = _res_chain(widths[-1], widths[-1], n, g)
        self.norm1 = nn.GroupNorm(g, widths[-1])
        self.conv2 = CausalConv3d(widths[-1], 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.block_res_blocks):
            for blk in level:
                x = blk(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for blk in self.res_blocks:
            x = blk(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    """Latents [N, latent, t, h, w] -> features [N, F, 8t, h, w]: x2 in ``upsample_block``, x2 twice by
    depth-to-space after ``conv_blocks[2]`` and ``conv_blocks[1]`` (``conv_blocks[0]`` is an identity)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths, g, n = [cfg.temporal_channels * m for m in cfg.temporal_multipliers], cfg.norm_groups, \
            cfg.temporal_res_blocks
        top = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_channels, top, 3, bias=True)
        self.res_blocks = _res_chain(top, top, n, g)
        self.upsample_block = ResBlock3D(top, top, g, upsample=True)
        ins = widths[1:] + [top]                  # level i takes the output width of level i + 1
        self.block_res_blocks = nn.ModuleList([_res_chain(ci, co, n, g) for ci, co in zip(ins, widths)])
        self.d2s = [False] + [True] * (len(widths) - 2)    # reference decoder temporal_downsample (False, True, True)
        self.conv_blocks = nn.ModuleList([CausalConv3d(c, 2 * c, 3) if up else nn.Identity()
                                          for c, up in zip(widths[1:], self.d2s)])
        self.norm1 = nn.GroupNorm(g, widths[0])
        self.conv_out = CausalConv3d(widths[0], cfg.feature_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for blk in self.res_blocks:
            x = blk(x)
        x = self.upsample_block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for blk in self.block_res_blocks[i]:
                x = blk(x)
            if i > 0 and self.d2s[i - 1]:
                y = self.conv_blocks[i - 1](x)                     # channel index = c * 2 + time phase
                n, c2, t, h, w = y.shape
                x = y.view(n, c2 // 2, 2, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(n, c2 // 2, 2 * t, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """Reference ``MUGVAETemporal``: encoder + quant_conv, post_quant_conv + decoder."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        c = cfg.latent_channels
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * c, 2 * c, 1)
        self.post_quant_conv = CausalConv3d(c, c, 1)
        self.decoder = TemporalDecoder(cfg)

    def encode_chunks(self, f_BFThw: torch.Tensor, group: int = 0) -> torch.Tensor:
        """Features [B, F, 8n, h, w] -> moments [B, 2C, n, h, w]; every 8-frame chunk on its own."""
        b, fc, t, h, w = f_BFThw.shape
        n = t // CHUNK
        f_NF8hw = f_BFThw.view(b, fc, n, CHUNK, h, w).transpose(1, 2).reshape(b * n, fc, CHUNK, h, w)
        g = group if group > 0 else b * n
        m = torch.cat([self.quant_conv(self.encoder(f_NF8hw[i:i + g])) for i in range(0, b * n, g)])
        return m.view(b, n, -1, h, w).transpose(1, 2)

    def decode_window(self, z_BCthw: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, t, h, w] (one window) -> features [B, F, 8t, h, w]."""
        return self.decoder(self.post_quant_conv(z_BCthw))


# --------------------------------------------------------------------------------------------------- the video VAE

class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2C, t, h, w]; logvar clamped to [-30, 20] (docs/mugv.md §2.2)."""

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
    """2D spatial (x8) + temporal (x8) VAE; pixels [B, 3, T, H, W] in [-1, 1] <-> raw latents
    [B, C, ceil(T/8), H/8, W/8]. State-dict names and shapes equal the reference ``MUGAutoencoderPipeline``'s."""

    PIXEL_TOLERANCE = 1e-3   # encode accepts pixels in [-1 - tol, 1 + tol]

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_vae = SpatialVAE(cfg)
        self.temporal_vae = TemporalVAE(cfg)
        c = cfg.latent_channels
        if cfg.latent_stats == "mugv":
            if c != len(MUGV_LATENT_MEAN):
                raise ValueError(f"vae.latent_stats='mugv' needs latent_channels={len(MUGV_LATENT_MEAN)}, got {c}")
            shift, scale = torch.tensor(MUGV_LATENT_MEAN), torch.tensor(MUGV_LATENT_STD)
        else:
            shift, scale = torch.zeros(c), torch.ones(c)
        self.register_buffer("scale", scale.view(1, c, 1, 1, 1))
        self.register_buffer("shift", shift.view(1, c, 1, 1, 1))
        self.logvar = nn.Parameter(torch.full((), 4.0))

    @classmethod
    def tiny(cls, **kw) -> "VideoVAE":
        return cls(vae_tiny(**kw))

    @classmethod
    def mugv(cls, **kw) -> "VideoVAE":
        return cls(vae_mugv(**kw))

    @staticmethod
    def latent_frames(num_frames: int) -> int:
        """Latent frames for a clip of ``num_frames`` (8k -> k, 8k+1 -> k+1; in general ceil(T/8))."""
        return (num_frames + CHUNK - 1) // CHUNK

    # ------------------------------------------------------------------ normalisation (the reference's shift/scale)
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw z [B, C, t, h, w] -> (z - shift) / scale (what the reference ``MUGVAE.encode`` returns)."""
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize`` (the first step of the reference ``MUGVAE.decode``)."""
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)

    # ------------------------------------------------------------------------------------------------------ encode
    def _check_pixels(self, x_BCTHW: torch.Tensor) -> None:
        s = self.cfg.spatial_downsample
        if x_BCTHW.dim() != 5 or x_BCTHW.shape[1] != 3:
            raise ValueError(f"VideoVAE.encode expects x [B, 3, T, H, W], got {list(x_BCTHW.shape)}")
        t, h, w = x_BCTHW.shape[2:]
        if t < 1:
            raise ValueError("VideoVAE.encode: T must be >= 1")
        if h % s or w % s:
            raise ValueError(f"VideoVAE.encode: H and W must be multiples of {s}, got {h}x{w}")
        if x_BCTHW.device.type != "meta" and x_BCTHW.numel():
            lo, hi = float(x_BCTHW.min()), float(x_BCTHW.max())
            if lo < -1 - self.PIXEL_TOLERANCE or hi > 1 + self.PIXEL_TOLERANCE:
                raise ValueError(f"VideoVAE.encode expects pixels in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def encode(self, x_BCTHW: torch.Tensor) -> DiagonalGaussian:
        """x [B, 3, T, H, W] in [-1, 1] -> posterior over raw z [B, C, ceil(T/8), H/8, W/8].

        T % 8 == 1: frame 0 is replicated 7 extra times (latent frame 0 = image latent); other T % 8 != 0: zero
        feature frames are padded at the front. Every 8-frame chunk is encoded independently.
        """
        self._check_pixels(x_BCTHW)
        f = self.spatial_vae.encode(x_BCTHW)
        t = f.shape[2]
        if t % CHUNK == 1:
            f = torch.cat([f[:, :, :1].expand(-1, -1, CHUNK - 1, -1, -1), f], dim=2)
        elif t % CHUNK:
            f = F.pad(f, (0, 0, 0, 0, CHUNK - t % CHUNK, 0))
        group = self.cfg.decode_window if (self.cfg.micro_batch_size > 0 and not torch.is_grad_enabled()) else 0
        return DiagonalGaussian(self.temporal_vae.encode_chunks(f, group))

    # ------------------------------------------------------------------------------------------------------ decode
    def _check_latents(self, z_BCThw: torch.Tensor, num_frames: int) -> None:
        if z_BCThw.dim() != 5 or z_BCThw.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"VideoVAE.decode expects z [B, {self.cfg.latent_channels}, t, h, w], "
                             f"got {list(z_BCThw.shape)}")
        t = z_BCThw.shape[2]
        if not CHUNK * (t - 1) < num_frames <= CHUNK * t:
            raise ValueError(f"VideoVAE.decode: num_frames must be in [{CHUNK * (t - 1) + 1}, {CHUNK * t}] "
                             f"for {t} latent frames (8t, or 8(t-1)+1 for an image-led clip), got {num_frames}")

    def _temporal_decode(self, z_BCThw: torch.Tensor, num_frames: int, window: int) -> torch.Tensor:
        t = z_BCThw.shape[2]
        f = torch.cat([self.temporal_vae.decode_window(z_BCThw[:, :, i:i + window]) for i in range(0, t, window)],
                      dim=2)
        return f[:, :, CHUNK * t - num_frames:]

    def decode(self, z_BCThw: torch.Tensor, num_frames: int, clamp: bool = False) -> torch.Tensor:
        """Raw z [B, C, t, h, w] -> x [B, 3, num_frames, 8h, 8w], roughly in [-1, 1] (``clamp=True`` clamps).

        ``num_frames`` in (8(t-1), 8t]: the first ``8t - num_frames`` decoded frames are dropped (for 8k+1 clips
        the 7 replicated copies of frame 0). The temporal decoder runs on ``cfg.decode_window``-latent windows.
        """
        self._check_latents(z_BCThw, num_frames)
        x = self.spatial_vae.decode(self._temporal_decode(z_BCThw, num_frames, self.cfg.decode_window))
        return x.clamp(-1.0, 1.0) if clamp else x

    def decode_tiled(self, z_BCThw: torch.Tensor, num_frames: int, tile_latent_frames: Optional[int] = None,
                     tile_hw: Optional[Union[int, Tuple[int, int]]] = None, overlap: Optional[int] = None,
                     clamp: bool = False) -> torch.Tensor:
        """Memory-bounded ``decode`` for long / large videos.

        Time: the temporal decoder runs on windows of ``tile_latent_frames`` latent frames (default
        ``cfg.decode_window``, MUG-V's 6), and the 2D decoder per frame. Space: with ``tile_hw`` (latent pixels,
        int or (h, w)) the latent plane is cut into tiles that overlap by ``overlap`` latent pixels (default a
        quarter of the tile), each tile is decoded on its own (temporal + 2D) and the pixel tiles are blended with
        linear ramps across the overlaps. With ``tile_hw=None`` (or tiles covering the plane) and the default
        window this is exactly ``decode``; with real tiling it differs slightly, because the 2D mid-block
        attention and the convolutions' receptive fields stop at tile edges.
        """
        self._check_latents(z_BCThw, num_frames)
        window = tile_latent_frames or self.cfg.decode_window
        b, _, t, h, w = z_BCThw.shape
        th, tw = (h, w) if tile_hw is None else ((tile_hw, tile_hw) if isinstance(tile_hw, int) else tuple(tile_hw))
        th, tw = min(th, h), min(tw, w)
        if th == h and tw == w:
            x = self.spatial_vae.decode(self._temporal_decode(z_BCThw, num_frames, window))
            return x.clamp(-1.0, 1.0) if clamp else x
        s = self.cfg.spatial_downsample
        oh = min(th // 4 if overlap is None else overlap, th - 1)
        ow = min(tw // 4 if overlap is None else overlap, tw - 1)
        out = torch.zeros(b, 3, num_frames, h * s, w * s, device=z_BCThw.device, dtype=z_BCThw.dtype)
        weight = torch.zeros(1, 1, 1, h * s, w * s, device=z_BCThw.device, dtype=z_BCThw.dtype)
        for y0 in _tile_starts(h, th, oh):
            for x0 in _tile_starts(w, tw, ow):
                tile = z_BCThw[:, :, :, y0:y0 + th, x0:x0 + tw].contiguous()
                px = self.spatial_vae.decode(self._temporal_decode(tile, num_frames, window))
                wy = _ramp(y0, th, h, oh, s, px)
                wx = _ramp(x0, tw, w, ow, s, px)
                wt = (wy[:, None] * wx[None, :]).view(1, 1, 1, th * s, tw * s)
                out[..., y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += px * wt
                weight[..., y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += wt
        x = out / weight
        return x.clamp(-1.0, 1.0) if clamp else x

    def forward(self, x_BCTHW: torch.Tensor, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: x [B, 3, T, H, W] -> (recon [B, 3, T, H, W], posterior)."""
        posterior = self.encode(x_BCTHW)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z, x_BCTHW.shape[2]), posterior


def _tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Tile origins covering [0, size) with stride tile - overlap; the last tile is aligned to the end."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(start: int, tile: int, size: int, overlap: int, scale: int, like: torch.Tensor) -> torch.Tensor:
    """1D blending weight of one tile in pixels: linear ramp up over ``overlap`` at an interior leading edge and
    down at an interior trailing edge (weights of two neighbours sum to 1 across a nominal overlap), 1 elsewhere."""
    n, o = tile * scale, overlap * scale
    pos = torch.arange(n, device=like.device, dtype=torch.float32)
    wgt = torch.ones(n, device=like.device, dtype=torch.float32)
    if o > 0 and start > 0:
        wgt = torch.minimum(wgt, (pos + 1) / (o + 1))
    if o > 0 and start + tile < size:
        wgt = torch.minimum(wgt, (n - pos) / (o + 1))
    return wgt.to(like.dtype)


# ------------------------------------------------------------------------------------------------------- loading

def load_vae_state(vae: VideoVAE, source: Union[str, Path, Mapping[str, torch.Tensor]]) -> VideoVAE:
    """Strictly load weights (a path to .pt/.pth/.safetensors, or a possibly nested state dict) into ``vae``."""
    state = read_state_dict(source) if isinstance(source, (str, Path)) else unwrap_state_dict(source)
    check_state_dict(shapes_of(vae), state, what="VAE state dict")
    vae.load_state_dict(state, strict=True)
    return vae


def load_mugv_vae(source: Union[str, Path, Mapping[str, torch.Tensor]], cfg: Optional[VAEConfig] = None,
                  dtype: Optional[torch.dtype] = torch.float32) -> VideoVAE:
    """A ``VideoVAE`` (eval mode, CPU) holding MUG-V weights: ``source`` is the released ``vae.pt`` (the flat
    ``MUGAutoencoderPipeline`` state dict), any checkpoint nesting it, or the dict itself; ``cfg`` defaults to
    ``vae_mugv()``. Loading is strict; a mismatch raises ValueError listing missing / unexpected / misshaped keys.
    The module is built on the meta device and the checkpoint tensors are assigned (no 1.6 GB random init);
    ``dtype`` (default float32, None = keep the file's) converts them afterwards."""
    cfg = cfg or vae_mugv()
    state = read_state_dict(source) if isinstance(source, (str, Path)) else unwrap_state_dict(source)
    with torch.device("meta"):
        vae = VideoVAE(cfg)
    check_state_dict(shapes_of(vae), state, what="MUG-V VAE state dict")
    vae.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        vae = vae.to(dtype)
    return vae.eval()


def tiny(**kw) -> VideoVAE:
    """The CPU-sized VAE (models.config.vae_tiny)."""
    return VideoVAE(vae_tiny(**kw))


def mugv(**kw) -> VideoVAE:
    """The MUG-V VAE architecture (models.config.vae_mugv); random init - use ``load_mugv_vae`` for the weights."""
    return VideoVAE(vae_mugv(**kw))
