"""Rectified flow as MUG-V trains and samples it (docs/mugv.md §4), as pure functions.

Convention: t in [0, 1000], t = 1000 is pure noise; x_t = (1 - t/1000) x0 + (t/1000) noise; the model predicts the
velocity v = x0 - noise, which points toward the data.

    g = torch.Generator().manual_seed(0)
    x_t, t, noise = training_step_inputs(x0_BCTHW, g, loc=0.0, scale=1.0, use_shift=True, cond_mask=cond_BT)
    v = model(x_t, t, text, text_mask, cond_BT)
    loss_B = flow_loss(v, x0_BCTHW, noise, frame_mask_BT=~cond_BT)       # per-sample mean over generated frames
    x0 = euler_sample(model, torch.randn(...), text, mask, null_text, null_mask, steps=25, cfg_scale=4.0,
                      height_px=720, width_px=1280, cond_latent=first_frame_BC1HW)
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

NUM_TIMESTEPS = 1000
VAE_SPATIAL = 8             # latent -> pixel size factor; the shift is defined on pixel H, W (docs/mugv.md §4.2)
SHIFT_BASE = 512 * 512      # a 512x512 single image gets no shift


def sample_t(n: int, generator: Optional[torch.Generator] = None, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Logit-normal timesteps 1000 * sigmoid(N(loc, scale)) -> [n] float32 on the generator's device."""
    device = generator.device if generator is not None else None
    n_B = torch.randn(n, generator=generator, device=device) * scale + loc
    return NUM_TIMESTEPS * torch.sigmoid(n_B)


def shift_t(t, height_px, width_px, num_frames, base: int = SHIFT_BASE):
    """Resolution/duration shift: s = sqrt(H*W/base) * sqrt(F), tau' = s*tau / (1 + (s-1)*tau), tau = t/1000.

    H, W are pixel sizes; F is the latent frame count (1 for images). Scalars or tensors broadcast.
    """
    s = (height_px * width_px / base) ** 0.5 * num_frames ** 0.5
    tau = t / NUM_TIMESTEPS
    return NUM_TIMESTEPS * s * tau / (1 + (s - 1) * tau)


def _per_sample(t_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t_B.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t/1000) x0 + (t/1000) noise, t per sample."""
    tau = _per_sample(t_B, x0) / NUM_TIMESTEPS
    return (1 - tau) * x0 + tau * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x0 - noise


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
              frame_mask_BT: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample MSE [B] in fp32 over the latent frames where frame_mask_BT is True (all frames if None).

    Equals sum over kept frames of the squared error / (kept frames * C * H * W); a sample with no kept frame gets 0.
    """
    err_BCTHW = (v_pred.float() - velocity_target(x0, noise).float()).pow(2)
    if frame_mask_BT is None:
        return err_BCTHW.flatten(1).mean(1)
    if frame_mask_BT.shape != (err_BCTHW.shape[0], err_BCTHW.shape[2]):
        raise ValueError(f"frame_mask must be [B, T] = {(err_BCTHW.shape[0], err_BCTHW.shape[2])}, "
                         f"got {tuple(frame_mask_BT.shape)}")
    per_frame_BT = err_BCTHW.mean(dim=(1, 3, 4))
    keep_BT = frame_mask_BT.to(per_frame_BT)
    return (per_frame_BT * keep_BT).sum(1) / keep_BT.sum(1).clamp_min(1)


def training_step_inputs(x0: torch.Tensor, generator: Optional[torch.Generator], loc: float, scale: float,
                         use_shift: bool, cond_mask: Optional[torch.Tensor] = None, vae_spatial: int = VAE_SPATIAL
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t [B], noise) for one training step on latents x0 [B, C, T, H, W]: the trainer's inputs.

    Draws from ``generator``, in this order: the noise (x0's shape), then t ~ logit-normal(loc, scale), shifted for
    the clip's pixel size (latent x ``vae_spatial``, the VAE's downsampling factor) and latent frame count when
    use_shift. Both are drawn on the generator's device and moved to x0's, so a CPU generator gives the same inputs
    on any device. Conditioning frames (cond_mask [B, T] True) stay clean (t0 = 0).
    """
    b, _, frames, h, w = x0.shape
    gen_device = generator.device if generator is not None else None
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    t_B = sample_t(b, generator, loc, scale)
    if use_shift:
        t_B = shift_t(t_B, h * vae_spatial, w * vae_spatial, frames)
    t_B = t_B.to(x0.device)
    x_t = interpolate(x0, noise, t_B)
    if cond_mask is not None:
        x_t = torch.where(cond_mask.to(x0.device, torch.bool)[:, None, :, None, None], x0, x_t)
    return x_t, t_B, noise


def _pad_text(text_BSD: torch.Tensor, mask_BS: torch.Tensor, length: int, batch: int):
    text_BSD, mask_BS = text_BSD.expand(batch, -1, -1), mask_BS.expand(batch, -1).bool()
    pad = length - text_BSD.shape[1]
    return F.pad(text_BSD, (0, 0, 0, pad)), F.pad(mask_BS, (0, pad), value=False)


def euler_sample(model_fn: Callable, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                 null_text: torch.Tensor, null_mask: torch.Tensor, steps: int, cfg_scale: float,
                 height_px: int, width_px: int, cond_latent: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Euler CFG sampler from t = 1000 to 0 (MUG-V: 25 steps, cfg 4.0) -> x0 [B, C, T, H, W].

    model_fn(x, t, text, text_mask) -> v (a MUGDiT works as is) is called once per step on the batch [cond, uncond];
    null_text is the unconditional (negative-prompt) text, batch B or 1, padded to text's length.
    tau_i = shift(1 - i/steps), dt = tau_i - tau_{i+1} (last step to 0), z <- z + v dt with
    v = v_u + cfg_scale (v_c - v_u). I2V: cond_latent [B, C, Tc, H, W] is re-imposed on the first Tc frames every
    step, and those frames are passed as model_fn(..., cond_mask_BT=[2B, T] bool).
    generator: unused, since the Euler update is deterministic given `noise`; accepted so that callers can hand the
    same seeded generator to every sampler.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b, _, frames, _, _ = noise.shape
    taus = [shift_t(NUM_TIMESTEPS * (1 - i / steps), height_px, width_px, frames) / NUM_TIMESTEPS
            for i in range(steps)] + [0.0]
    length = max(text.shape[1], null_text.shape[1])
    text_c, mask_c = _pad_text(text, text_mask, length, b)
    text_u, mask_u = _pad_text(null_text, null_mask, length, b)
    text_2B, mask_2B = torch.cat([text_c, text_u]), torch.cat([mask_c, mask_u])
    cond_2BT, keep_BT11, cond_full = None, None, None
    if cond_latent is not None:
        if cond_latent.shape[0] != b or cond_latent.shape[2] > frames or cond_latent.shape[3:] != noise.shape[3:]:
            raise ValueError(f"cond_latent must be [B, C, Tc <= {frames}, H, W] like noise {tuple(noise.shape)}, "
                             f"got {tuple(cond_latent.shape)}")
        cond_BT = (torch.arange(frames, device=noise.device) < cond_latent.shape[2]).expand(b, frames)
        cond_2BT = torch.cat([cond_BT, cond_BT])
        keep_BT11 = cond_BT[:, None, :, None, None]
        cond_full = F.pad(cond_latent, (0, 0, 0, 0, 0, frames - cond_latent.shape[2])).to(noise.dtype)

    z = noise
    for i in range(steps):
        if cond_latent is not None:
            z = torch.where(keep_BT11, cond_full, z)
        t_2B = torch.full((2 * b,), taus[i] * NUM_TIMESTEPS, device=noise.device)
        cond_kw = {} if cond_2BT is None else {"cond_mask_BT": cond_2BT}
        v_c, v_u = model_fn(torch.cat([z, z]), t_2B, text_2B, mask_2B, **cond_kw).to(z.dtype).chunk(2)
        z = z + (v_u + cfg_scale * (v_c - v_u)) * (taus[i] - taus[i + 1])
    if cond_latent is not None:
        z = torch.where(keep_BT11, cond_full, z)
    return z
