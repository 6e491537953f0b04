"""The one attention kernel choice for the DiT: flash-attn on CUDA when it can, else torch SDPA.

    from models.attention import attention
    out_BHLD = attention(q_BHLD, k_BHSD, v_BHSD)                       # self-attention
    out_BHLD = attention(q_BHLD, k_BHSD, v_BHSD, mask=keep_B11S)       # cross-attention with key padding

flash-attn is used only when it is importable, the tensors are CUDA fp16/bf16 and there is no mask (MUG-V's
self-attention); everything else (CPU tests, masked text cross-attention) goes through
`F.scaled_dot_product_attention`, which picks its own fused kernel on GPU. The softmax scale is 1/sqrt(head_dim).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:  # CPU images and CI: SDPA only
    flash_attn_func = None

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_available(q: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """Whether `attention` would run flash-attn for this query (and mask)."""
    return flash_attn_func is not None and mask is None and q.is_cuda and q.dtype in _FLASH_DTYPES


def attention(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention in [batch, heads, length, head_dim] layout.

    mask: optional bool tensor broadcastable to [B, H, L, S], True = may attend. Every query row needs at least one
    True key, otherwise SDPA returns NaN for that row (callers guarantee >= 1 valid text token per sample).
    """
    if q_BHLD.ndim != 4 or k_BHSD.shape != v_BHSD.shape or q_BHLD.shape[-1] != k_BHSD.shape[-1]:
        raise ValueError(f"attention expects q [B,H,L,D] and k, v [B,H,S,D] with equal D; got "
                         f"{tuple(q_BHLD.shape)}, {tuple(k_BHSD.shape)}, {tuple(v_BHSD.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be bool (True = attend), got {mask.dtype}")
    if flash_available(q_BHLD, mask):
        out_BLHD = flash_attn_func(q_BHLD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2))
        return out_BLHD.transpose(1, 2)
    return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=mask)
