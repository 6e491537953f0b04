"""models/attention.py on CPU: the backend rule, the dispatch with flash-attn's functions stood in by SDPA, and the
varlen packing of key-padded cross-attention against masked SDPA (values and gradients). The CUDA kernels themselves
are not run here (no GPU): bench/dit_step.py --cuda prints the backends picked on a GPU."""
import pytest
import torch
import torch.nn.functional as F

import models.attention as attn
from models.attention import attention, attention_backend, choose_backend, packed_key_attention

B, H, L, S, D = 3, 2, 7, 5, 8


def sdpa_varlen(q_PHD, k_NHD, v_NHD, cu_q, cu_k, max_q, max_k):
    """flash_attn_varlen_func's contract in SDPA, one packed segment at a time (a reference for the packing)."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.shape == cu_k.shape
    outs = []
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        outs.append(F.scaled_dot_product_attention(q_PHD[q0:q1].transpose(0, 1), k_NHD[k0:k1].transpose(0, 1),
                                                   v_NHD[k0:k1].transpose(0, 1)).transpose(0, 1))
    return torch.cat(outs)


def flash_dense(q_BLHD, k_BSHD, v_BSHD):
    """flash_attn_func's layout ([B, L, H, D]) in SDPA."""
    return F.scaled_dot_product_attention(q_BLHD.transpose(1, 2), k_BSHD.transpose(1, 2),
                                          v_BSHD.transpose(1, 2)).transpose(1, 2)


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g, requires_grad=True) for n in (L, S, S)]


def keep():
    k = torch.ones(B, S, dtype=torch.bool)
    k[0, 3:] = False            # a padded tail (T5 captions)
    k[1, [0, 2]] = False        # holes anywhere: packing keeps any subset of keys
    return k                    # sample 2: every key valid


@pytest.mark.parametrize("device,dtype,mask,compiling,have,expected", [
    ("cuda", torch.bfloat16, "none", False, True, "flash_attn"),
    ("cuda", torch.float16, "key_padding", False, True, "flash_attn_varlen"),
    ("cuda", torch.bfloat16, "key_padding", True, True, "sdpa"),     # compiled regions: no data-dependent packing
    ("cuda", torch.bfloat16, "other", False, True, "sdpa"),          # a general mask: SDPA (cuDNN / efficient)
    ("cuda", torch.float32, "none", False, True, "sdpa"),            # flash-attn is fp16/bf16 only
    ("cuda", torch.bfloat16, "none", False, False, "sdpa"),          # not installed
    ("cpu", torch.bfloat16, "none", False, True, "sdpa"),
])
def test_choose_backend(device, dtype, mask, compiling, have, expected):
    assert choose_backend(device, dtype, mask, compiling, have, have) == expected


def test_cpu_reports_sdpa_backend():
    q, k, v = qkv()
    assert attention_backend(q, k, v) == "sdpa:FLASH_ATTENTION"            # torch's CPU flash kernel
    assert attention_backend(q, k, v, keep()[:, None, None]) == "sdpa:FLASH_ATTENTION"


def test_backend_under_autocast_is_the_one_sdpa_runs():
    """The DiT under autocast with fp32 weights hands SDPA fp32 q, k (QK-norm) and a bf16 v: autocast casts them to
    bf16 before SDPA picks a kernel, so attention_backend answers for the bf16 tensors (uncast: MATH)."""
    q, k, _ = qkv()
    v = torch.zeros(B, H, S, D, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_backend(q, k, v) == "sdpa:FLASH_ATTENTION"
        assert attention(q, k, v).dtype == torch.bfloat16


def test_packed_key_attention_equals_masked_sdpa():
    mask = keep()
    q, k, v = qkv()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    out = packed_key_attention(q, k, v, mask, sdpa_varlen)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)   # the pad keys get exactly zero gradient
    with pytest.raises(ValueError, match="keep_BS must be bool"):
        packed_key_attention(q, k, v, mask[:, :-1], sdpa_varlen)


@pytest.mark.parametrize("choice", ["flash_attn", "flash_attn_varlen"])
def test_dispatch_through_flash_attn_layouts(monkeypatch, choice):
    """attention() hands flash-attn its [B, L, H, D] / packed layouts and returns [B, H, L, D]: flash-attn's functions
    stood in by SDPA, the rule forced to the CUDA choice."""
    monkeypatch.setattr(attn, "flash_attn_func", flash_dense)
    monkeypatch.setattr(attn, "flash_attn_varlen_func", sdpa_varlen)
    monkeypatch.setattr(attn, "_choose", lambda q, k, mask, compiling=None: choice)
    q, k, v = qkv(1)
    mask = keep()[:, None, None] if choice == "flash_attn_varlen" else None
    out = attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-6, atol=1e-6)
    assert attention_backend(q, k, v, mask) == choice


def test_mask_kind_decides_varlen():
    """Only a bool [B, 1, 1, S] mask is a key-padding mask; a per-query mask stays on SDPA."""
    q, k, v = qkv()
    assert attn._mask_kind(q, k, keep()[:, None, None]) == "key_padding"
    assert attn._mask_kind(q, k, torch.ones(B, 1, L, S, dtype=torch.bool)) == "other"
    assert attn._mask_kind(q, k, None) == "none"


def test_sdpa_priority_traces_under_compile():
    """The CUDA path's ``sdpa_kernel(SDPA_PRIORITY, set_priority=True)`` is what a compiled block runs around SDPA:
    dynamo must trace it in one graph (fullgraph). Checked on CPU, where SDPA then picks its CPU kernel."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(list(attn.SDPA_PRIORITY), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep()[:, None, None])

    q, k, v = (t.detach() for t in qkv())
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-6, atol=1e-6)
