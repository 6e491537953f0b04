"""The one place that picks the DiT's attention kernel: flash-attn on CUDA when it can, else torch SDPA with an
explicit CUDA backend priority (cuDNN fused attention first, as MUG-V trains with).

    from models.attention import attention, attention_backend
    out_BHLD = attention(q_BHLD, k_BHSD, v_BHSD)                       # self-attention
    out_BHLD = attention(q_BHLD, k_BHSD, v_BHSD, mask=keep_B11S)       # cross-attention with key padding
    attention_backend(q_BHLD, k_BHSD, v_BHSD, mask=keep_B11S)          # "sdpa:CUDNN_ATTENTION", for logs/MLflow tags

The trainer prints what it runs with and tags the stage's MLflow run with it (``attention_backend``,
``trainer.train.attention_backends``).

The choice, in order (``attention_backend`` returns it without running anything):

1. ``flash_attn``: flash-attn's ``flash_attn_func`` for unmasked CUDA fp16/bf16 attention (the DiT's self-attention)
   when the package is installed.
2. ``flash_attn_varlen``: a key-padding mask ([B, 1, 1, S], the text mask of cross-attention) with CUDA fp16/bf16 and
   flash-attn installed, outside ``torch.compile``: the valid keys are packed (THD layout) and run through
   ``flash_attn_varlen_func`` with ``cu_seqlens_q = [0, L, 2L, ...]`` and ``cu_seqlens_k`` = cumsum of the valid key
   counts, MUG-V's training path (docs/mugv.md §6.2). Packing takes one device-to-host sync per call (the number of
   valid keys sizes the packed tensor) and has a data-dependent shape, so compiled regions use 3. instead.
3. ``sdpa:<backend>``: ``F.scaled_dot_product_attention``. On CUDA inside ``sdpa_kernel(SDPA_PRIORITY,
   set_priority=True)``: SDPA takes the first backend of cuDNN fused attention, its own flash kernel, memory-efficient,
   math that accepts the inputs (SDPA's flash refuses masks; cuDNN and memory-efficient take the key mask). On CPU,
   torch's own choice (its CPU flash kernel, masked or not).

What ran where: the CPU tests (tests/test_attention.py) check the selection logic with flash-attn's availability
monkeypatched, and the packing of ``packed_key_attention`` against masked SDPA with an SDPA-based stand-in for
``flash_attn_varlen_func``. The CUDA paths (flash-attn, varlen, the SDPA priority on a GPU) were not run in the session
that wrote this; ``bench/dit_step.py --cuda`` prints the backends it picks.

The softmax scale is 1/sqrt(head_dim) everywhere. Every query row needs at least one True key: SDPA returns NaN for
a row without one (the DiT guarantees >= 1 valid text token per sample).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # CPU images and CI: SDPA only
    flash_attn_func = None
    flash_attn_varlen_func = None

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
# SDPA's CUDA backends, best first: cuDNN fused attention (MUG-V's TE backend, NVTE_FUSED_ATTN=1), SDPA's flash-2 (no
# masks), memory-efficient (takes masks), math (anything). set_priority=True makes the order a priority, not a filter.
SDPA_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)


def choose_backend(device_type: str, dtype: torch.dtype, mask: str, compiling: bool = False,
                   have_flash: bool = True, have_varlen: bool = True) -> str:
    """The rule of the module docstring as a pure function: "flash_attn", "flash_attn_varlen" or "sdpa".

    mask: "none", "key_padding" (bool [B, 1, 1, S]) or "other"; have_flash / have_varlen: whether flash-attn's
    ``flash_attn_func`` / ``flash_attn_varlen_func`` are importable.

        choose_backend("cuda", torch.bfloat16, "none")                      # "flash_attn"
        choose_backend("cuda", torch.bfloat16, "key_padding", compiling=True)   # "sdpa" (no packing under compile)
    """
    flash_ok = device_type == "cuda" and dtype in _FLASH_DTYPES
    if flash_ok and have_flash and mask == "none":
        return "flash_attn"
    if flash_ok and have_varlen and mask == "key_padding" and not compiling:
        return "flash_attn_varlen"
    return "sdpa"


def _mask_kind(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    if mask is None:
        return "none"
    b, s = q_BHLD.shape[0], k_BHSD.shape[2]
    return "key_padding" if mask.dtype == torch.bool and tuple(mask.shape) == (b, 1, 1, s) else "other"


def _choose(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, mask: Optional[torch.Tensor],
            compiling: Optional[bool] = None) -> str:
    """``choose_backend`` for these tensors; compiling None = whether this call is inside ``torch.compile``."""
    compiling = torch.compiler.is_compiling() if compiling is None else compiling
    return choose_backend(q_BHLD.device.type, q_BHLD.dtype, _mask_kind(q_BHLD, k_BHSD, mask),
                          compiling, flash_attn_func is not None,
                          flash_attn_varlen_func is not None)


def flash_available(q: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """Whether `attention` would run flash-attn's dense kernel for this query (and mask)."""
    return mask is None and _choose(q, q, None) == "flash_attn"


def attention_backend(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, compiling: Optional[bool] = None) -> str:
    """The kernel `attention` runs for these tensors: "flash_attn", "flash_attn_varlen" or "sdpa:<SDPBackend name>"
    (SDPA's own choice, under the CUDA priority on CUDA; "sdpa:ERROR" when no backend accepts the inputs).

    compiling: answer as for a call inside ``torch.compile`` (True) or eager (False); None = whether this call is.
    Under an enabled autocast SDPA's choice is made for the autocast dtype, as autocast casts SDPA's inputs to it
    (the flash-attn rule still reads the tensors' own dtype, as ``attention`` does)."""
    choice = _choose(q_BHLD, k_BHSD, mask, compiling)
    if choice != "sdpa":
        return choice
    kind = q_BHLD.device.type
    if torch.is_autocast_enabled(kind):   # torch._fused_sdp_choice has no autocast kernel: cast as SDPA's has
        low = torch.get_autocast_dtype(kind)
        q_BHLD, k_BHSD, v_BHSD = (t.to(low) if t.is_floating_point() else t for t in (q_BHLD, k_BHSD, v_BHSD))
    with _sdpa_priority(q_BHLD):
        sdpa = torch._fused_sdp_choice(q_BHLD, k_BHSD, v_BHSD, mask)
    return f"sdpa:{SDPBackend(sdpa).name}"


def _sdpa_priority(q: torch.Tensor):
    """The CUDA backend priority (SDPA_PRIORITY) around an SDPA call; nothing on CPU."""
    return sdpa_kernel(list(SDPA_PRIORITY), set_priority=True) if q.is_cuda else contextlib.nullcontext()


def packed_key_attention(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, keep_BS: torch.Tensor,
                         varlen_fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Attention over each sample's valid keys only, through a varlen kernel on packed (THD) tensors.

    keep_BS: bool, True = a valid key (any positions, >= 1 per sample). varlen_fn has flash-attn's
    ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` signature with q
    [B*L, H, D] and k, v [nnz, H, D]; max_seqlen_k is passed as S, an upper bound, to avoid a second host sync.
    Equal to ``F.scaled_dot_product_attention(q, k, v, attn_mask=keep_BS[:, None, None])`` (tests/test_attention.py).
    """
    b, h, l, d = q_BHLD.shape
    s = k_BHSD.shape[2]
    if keep_BS.shape != (b, s) or keep_BS.dtype != torch.bool:
        raise ValueError(f"keep_BS must be bool [B, S] = {(b, s)}, got {keep_BS.dtype} {tuple(keep_BS.shape)}")
    q_PHD = q_BHLD.transpose(1, 2).reshape(b * l, h, d)                      # P = B*L packed queries
    k_NHD = k_BHSD.transpose(1, 2)[keep_BS]                                   # N = valid keys (a host sync)
    v_NHD = v_BHSD.transpose(1, 2)[keep_BS]
    cu_q = torch.arange(0, (b + 1) * l, l, dtype=torch.int32, device=q_BHLD.device)
    cu_k = F.pad(keep_BS.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    out_PHD = varlen_fn(q_PHD, k_NHD, v_NHD, cu_q, cu_k, l, s)
    return out_PHD.reshape(b, l, h, d).transpose(1, 2)


def attention(q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention in [batch, heads, length, head_dim] layout, kernel chosen as the module says.

    mask: optional bool tensor broadcastable to [B, H, L, S], True = may attend.
    """
    if q_BHLD.ndim != 4 or k_BHSD.shape != v_BHSD.shape or q_BHLD.shape[-1] != k_BHSD.shape[-1]:
        raise ValueError(f"attention expects q [B,H,L,D] and k, v [B,H,S,D] with equal D; got "
                         f"{tuple(q_BHLD.shape)}, {tuple(k_BHSD.shape)}, {tuple(v_BHSD.shape)}")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention mask must be bool (True = attend), got {mask.dtype}")
    choice = _choose(q_BHLD, k_BHSD, mask)
    if choice == "flash_attn":
        out_BLHD = flash_attn_func(q_BHLD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2))
        return out_BLHD.transpose(1, 2)
    if choice == "flash_attn_varlen":
        assert mask is not None   # choose_backend: "key_padding"
        return packed_key_attention(q_BHLD, k_BHSD, v_BHSD, mask[:, 0, 0], flash_attn_varlen_func)
    with _sdpa_priority(q_BHLD):
        return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=mask)
