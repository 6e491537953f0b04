"""Splitting a clip's tokens between ranks: context parallelism (CP) and the sequence-parallel (SP) chunks.

    apply_context_parallel(model, layout.groups.cp, layout.cp_rank, layout.cp)      # the plan's builder calls these
    set_sequence_parallel_hooks(model, layout.groups.tp, layout.tp_rank, layout.tp)

``apply_context_parallel`` sets MUGDiT's ``token_split``/``token_gather`` hooks and every block's ``attn.kv_gather``
over the CP group; ``set_sequence_parallel_hooks`` sets ``seq_split``/``seq_gather`` over the TP group. The model
file imports nothing distributed: it calls these hooks, identity by default. The autograd functions below are the
collectives with the backward each split needs; which gradients then hold partial sums is recorded in the
``ParallelPlan`` (``trainer/parallel/plan.py``).

Any token count: both multiply ``model.token_multiple`` by their split factor and the model pads the L = N + 2
tokens ([start, video, end]) at its end to a multiple of it; pad tokens never reach real ones and get zero gradient
(docs/parallelism.md, "Padding").
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SPSplit(torch.autograd.Function):
    """Keep this TP rank's contiguous chunk of ``dim`` (sequence parallelism); backward: all-gather the chunks'
    gradients, so whatever ran before the split gets the full gradient on every TP rank (Megatron's
    scatter_to_sequence_parallel_region)."""

    @staticmethod
    def forward(ctx, x, dim, group, rank, tp):
        ctx.dim, ctx.group, ctx.tp = dim, group, tp
        n = x.shape[dim] // tp
        return x.narrow(dim, rank * n, n).contiguous()

    @staticmethod
    def backward(ctx, g):
        return _cp_all_gather(g, ctx.dim, ctx.group, ctx.tp), None, None, None, None


def set_sequence_parallel_hooks(model: nn.Module, tp_group, rank: int, tp: int) -> None:
    """MUGDiT's ``seq_split`` / ``seq_gather`` over the TP group (``token_multiple`` times tp: the model pads the
    tokens so the split divides them). The replicated parameters used on the sequence chunk then get partial
    gradients (``ParamRole.tp_partial == "sequence"``)."""

    def seq_split(x, dim):
        if x.shape[dim] % tp:   # the model pads to token_multiple; this would be a bug, not a config error
            raise RuntimeError(f"seq_split: {x.shape[dim]} tokens, not a multiple of tp={tp} (token_multiple="
                               f"{model.token_multiple})")
        return _SPSplit.apply(x, dim, tp_group, rank, tp)

    model.token_multiple *= tp
    model.seq_split = seq_split
    model.seq_gather = lambda x, dim: _CPGatherReplicated.apply(x, dim, tp_group, rank, tp)


class _CPSplit(torch.autograd.Function):
    """Keep this CP rank's contiguous chunk of ``dim``; backward: the chunk's gradient, zero elsewhere (so every
    parameter used before the split gets a partial gradient, summed over CP in ``sync_gradients``)."""

    @staticmethod
    def forward(ctx, x, dim, rank, cp):
        ctx.dim, ctx.rank, ctx.shape = dim, rank, x.shape
        n = x.shape[dim] // cp
        return x.narrow(dim, rank * n, n).contiguous()

    @staticmethod
    def backward(ctx, g):
        full = g.new_zeros(ctx.shape)
        full.narrow(ctx.dim, ctx.rank * g.shape[ctx.dim], g.shape[ctx.dim]).copy_(g)
        return full, None, None, None


def _cp_all_gather(x, dim, group, cp):
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _CPGatherReplicated(torch.autograd.Function):
    """All-gather the chunks along ``dim``; everything downstream is computed identically on every rank of the group
    (CP, or TP for sequence parallelism), so the incoming gradient is the same everywhere and the backward just keeps
    this rank's chunk of it."""

    @staticmethod
    def forward(ctx, x, dim, group, rank, cp):
        ctx.dim, ctx.rank, ctx.n = dim, rank, x.shape[dim]
        return _cp_all_gather(x, dim, group, cp)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n).contiguous(), None, None, None, None


class _CPGatherKV(torch.autograd.Function):
    """All-gather K or V along ``dim``; each rank's queries contribute to every chunk's gradient, so the backward
    sums the gradient over CP (all_reduce: gloo has no reduce_scatter) and keeps this rank's chunk."""

    @staticmethod
    def forward(ctx, x, dim, group, rank, cp):
        ctx.dim, ctx.rank, ctx.n, ctx.group = dim, rank, x.shape[dim], group
        return _cp_all_gather(x, dim, group, cp)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n).contiguous(), None, None, None, None


def apply_context_parallel(model: nn.Module, cp_group, rank: int, cp: int) -> nn.Module:
    """Context parallelism (all-gather-KV, exact) over ``cp_group`` (this process is ``rank`` of ``cp``); cp=1: no-op.

    Sets MUGDiT's identity hooks: ``token_split`` keeps CP rank r's contiguous chunk r of the L = N + 2 tokens
    ([start, video, end], padded at the end to a multiple of ``model.token_multiple``, which this multiplies by cp)
    and of the per-token adaLN modulation, final-layer modulation and RoPE angles; every block's ``attn.kv_gather``
    all-gathers k and v over the group so local queries attend to the full sequence (the attention then drops the pad
    keys; cross-attention and MLP are per token, text is replicated); ``token_gather`` all-gathers the final layer's
    per-token output (the model drops the pad tail), so the output and the loss are the same on every CP rank.
    Every parameter then holds this rank's chunk's share of the gradient: ``sync_gradients`` sums them over CP.
    """
    if cp == 1:
        return model
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "token_split") or not hasattr(model, "token_multiple"):
        raise TypeError("apply_context_parallel: the model has no .blocks / .token_split hooks / .token_multiple; "
                        "is this a MUGDiT?")

    def token_split(x, dim):
        if x.shape[dim] % cp:   # the model pads to token_multiple; this would be a bug, not a config error
            raise RuntimeError(f"token_split: {x.shape[dim]} tokens, not a multiple of cp={cp} (token_multiple="
                               f"{model.token_multiple})")
        return _CPSplit.apply(x, dim, rank, cp)

    model.token_multiple *= cp
    model.token_split = token_split
    model.token_gather = lambda x, dim: _CPGatherReplicated.apply(x, dim, cp_group, rank, cp)
    for block in blocks:
        block.attn.kv_gather = lambda x, dim: _CPGatherKV.apply(x, dim, cp_group, rank, cp)
    return model
