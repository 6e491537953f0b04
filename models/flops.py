"""Model FLOPs of MUGDiT, exactly the training repo's MFU formula (docs/mugv.md §6.5, ``model_flops_utilization.py``).

    from models.flops import dit_train_flops, mfu
    f = dit_train_flops(dit_mugv_10b(), (1, 14, 90, 160))      # 720p 5 s latent -> 8.7686e15 FLOPs per sample
    print(mfu(f, step_seconds=22.2, peak_flops_per_s=989e12))  # ~0.40

Per DiT layer and per video token, the GEMMs of one forward cost 4·h²·(7 + L/h + C/L + C/h) FLOPs:
self-attention projections 8h² (+ QKᵀ and AV, 4·L·h), cross-attention q/out 4h² (+ k/v of the C text tokens,
4·C·h²/L, + scores 4·C·h) and the 4h MLP 16h². Training multiplies the forward by 3 (E = 12 instead of 4), and by 4
when every layer is recomputed (E = 16: the count then includes the recompute, an HFU rather than an MFU).
Not counted, as in the reference: embedders, final layer, start/end tokens, norms/elementwise ops; and C is the fixed
context length 300, not the real caption length.
"""
from __future__ import annotations

import math
from typing import Sequence

CONTEXT_LEN = 300     # the reference formula's fixed text length (T5 max length)


def video_tokens(cfg, latent_shape: Sequence[int]) -> tuple[int, int]:
    """(batch b, video tokens L) from a latent shape (B, C, T, H, W) or (b, t, h_lat, w_lat)."""
    if len(latent_shape) == 5:
        b, _, t, h, w = latent_shape
    elif len(latent_shape) == 4:
        b, t, h, w = latent_shape
    else:
        raise ValueError(f"latent shape must be (B, C, T, H, W) or (b, t, h_lat, w_lat), got {tuple(latent_shape)}")
    pt, ph, pw = cfg.patch_size
    return b, (t * h * w) // (pt * ph * pw)


def _flops(cfg, latent_shape, context_len: int, expansion: int, batch: int) -> float:
    b, L = video_tokens(cfg, latent_shape)
    h, n, C = cfg.hidden_size, cfg.depth, context_len
    r = (cfg.hidden_size // cfg.num_heads) * cfg.num_heads / h      # kv_channels * heads / hidden (= 1)
    g_a = 1.0                                                        # query groups / heads: no GQA
    ffn = int(h * cfg.mlp_ratio) / h                                 # F_ffn / h (m = s = 1: no MoE, no SwiGLU)
    self_attn = (1 + g_a + L / h) * r
    cross_attn = (1 + (C / L) * g_a + C / h) * r
    return float(expansion) * batch * b * L * n * h * h * (self_attn + cross_attn + ffn)


def dit_train_flops(cfg, latent_shape: Sequence[int], context_len: int = CONTEXT_LEN, recompute: bool = False,
                    batch: int = 1) -> float:
    """Forward + backward model FLOPs of one step: E·B·b·L·N·h²·(7 + L/h + C/L + C/h), E = 12 (16 with recompute).

    ``batch`` is the reference's B_global factor (micro-batches summed over the step); ``b`` is the latent's batch.
    """
    return _flops(cfg, latent_shape, context_len, 16 if recompute else 12, batch)


def dit_forward_flops(cfg, latent_shape: Sequence[int], context_len: int = CONTEXT_LEN, batch: int = 1) -> float:
    """Forward-only model FLOPs (E/3 = 4): the GEMMs of the DiT layers for one forward pass."""
    return _flops(cfg, latent_shape, context_len, 4, batch)


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the hardware peak (per device: divide both by the world size)."""
    if step_seconds <= 0 or peak_flops_per_s <= 0 or not math.isfinite(step_seconds):
        raise ValueError(f"mfu needs positive step_seconds and peak_flops_per_s, got {step_seconds}, "
                         f"{peak_flops_per_s}")
    return flops_per_step / step_seconds / peak_flops_per_s


def flop_counter(display: bool = False):
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts CPU attention.

    torch's counter knows the CUDA SDPA kernels but not ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
    backward), which CPU SDPA runs, masked or not: without this mapping every QKᵀ/AV FLOP on CPU would be missed.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    return FlopCounterMode(display=display, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})
