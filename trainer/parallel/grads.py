"""Gradient collectives: what turns each rank's local gradients into the gradients of the global loss.

    sync_gradients(plan, model)                  # after backward (torch AdamW path)
    grad_norm = clip_grad_norm(plan, model, 1.0)
    sync_main_grads(plan, model, ddp)            # megatron DDP + distributed optimizer path, before finish_grad_sync

Which gradient is partial where comes from the ``ParallelPlan``'s roles: per-head QK-norm weights and, with sequence
parallelism, the replicated parameters used on a rank's token chunk hold TP partial sums; the conditioning embedders
replicated over pipeline stages hold each stage's partial sum; with context parallelism every parameter holds its
token chunk's share. We do not use megatron's DDP on the torch-AdamW path: plain flattened all_reduces keep
``param.grad`` where torch's optimizer and clipping expect it.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def all_reduce_flat(grads: List[torch.Tensor], group, divide_by: int = 1) -> None:
    """Sum ``grads`` over ``group`` in one flattened all_reduce (then divide by ``divide_by``), in place."""
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide_by > 1:
        flat.div_(divide_by)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def group_sum(values, group) -> list:
    """Sum a few numbers over ``group`` (float64, one all_reduce; on the GPU under NCCL)."""
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    x = torch.tensor([float(v) for v in values], dtype=torch.float64, device=on)
    dist.all_reduce(x, group=group)
    return x.tolist()


def _trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def sync_gradients(plan, model: nn.Module) -> None:
    """After backward: sum partial grads over TP, the replicated conditioning embedders' over PP, then sum over CP
    and average over DP.

    With context parallelism every CP rank holds its token chunk's share of each gradient and the same loss, so one
    all_reduce over the DP x CP group divided by the DP size (not CP) gives the DP mean of the full gradients.
    A missing grad counts as zero, so every rank reduces the same flattened layout.
    """
    layout = plan.layout
    named = _trainable(model)
    for _, p in named:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if layout.tp > 1:
        all_reduce_flat([p.grad for n, p in named if plan.role(n).tp_partial], layout.groups.tp)
    if layout.pp > 1:   # replicated conditioning: per-stage partials
        all_reduce_flat([p.grad for n, p in named if plan.role(n).pp_replicated], layout.groups.pp)
    if layout.dp * layout.cp > 1:
        all_reduce_flat([p.grad for _, p in named], layout.groups.dp_cp, divide_by=layout.dp)


def clip_grad_norm(plan, model: nn.Module, max_norm: float) -> float:
    """Clip to the global L2 norm; returns it. Squares of TP-sharded grads are summed over the TP group, replicated
    ones counted once; with pipeline parallelism the stages' sums are added up over the PP group, the conditioning
    embedders that every stage holds (already summed over PP) counted once (on PP rank 0)."""
    layout = plan.layout
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return 0.0
    sharded = [p.grad.float().pow(2).sum() for n, p in named if plan.role(n).tp]
    skip_dup = layout.pp > 1 and layout.pp_rank > 0   # replicated over PP: count once
    replicated = [p.grad.float().pow(2).sum() for n, p in named if not plan.role(n).tp
                  and not (skip_dup and plan.role(n).pp_replicated)]
    zero = torch.zeros((), device=named[0][1].grad.device)
    sq_sharded = torch.stack(sharded).sum() if sharded else zero.clone()
    if layout.tp > 1:
        dist.all_reduce(sq_sharded, group=layout.groups.tp)
    total_sq = sq_sharded + (torch.stack(replicated).sum() if replicated else zero)
    if layout.pp > 1:
        dist.all_reduce(total_sq, group=layout.groups.pp)
    total = total_sq.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for _, p in named:
        p.grad.mul_(scale.to(p.grad.dtype))
    return float(total)


def sync_main_grads(plan, model: nn.Module, ddp) -> None:
    """Megatron DDP + DistributedOptimizer, before ``ddp.finish_grad_sync()`` (its reduce-scatter over DP x CP,
    pre-scaled by 1/(dp*cp)): sum the TP-partial ``main_grad``s over TP and the replicated embedders' over PP (before
    the DP reduce: the stages' grad buffers are laid out differently, so after it an embedder's reduced slice can sit
    on different DP ranks on different stages), and multiply the buffer by cp (CP ranks hold their tokens' share of
    each gradient; DDP averages over DP x CP, so the reduce then sums over CP and averages over DP)."""
    layout = plan.layout
    named = _trainable(model)
    if layout.tp > 1:
        all_reduce_flat([p.main_grad for n, p in named if plan.role(n).tp_partial], layout.groups.tp)
    if layout.pp > 1:
        all_reduce_flat([p.main_grad for n, p in named if plan.role(n).pp_replicated], layout.groups.pp)
    if layout.cp > 1:
        ddp.scale_gradients(float(layout.cp))
