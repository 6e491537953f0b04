"""Gradient collectives: what turns each rank's local gradients into the gradients of the global loss.

    sync_gradients(plan, model)                  # after backward (torch AdamW path)
    grad_norm = clip_grad_norm(plan, model, 1.0)
    sync_main_grads(plan, model, ddp)            # megatron DDP + distributed optimizer path, before finish_grad_sync

    overlap = OverlappedGradReduce(plan, model, micro_batches=M)   # torch AdamW path, stage.overlap_grad_reduce
    ... backward of the M micro-batches: buckets of final gradients are all-reduced while the backward goes on
    overlap.finish()                             # instead of sync_gradients: waits, then the TP / PP sums

Which gradient is partial where comes from the ``ParallelPlan``'s roles: per-head QK-norm weights and, with sequence
parallelism, the replicated parameters used on a rank's token chunk hold TP partial sums; the conditioning embedders
replicated over pipeline stages hold each stage's partial sum; with context parallelism every parameter holds its
token chunk's share. We do not use megatron's DDP on the torch-AdamW path: plain flattened all_reduces keep
``param.grad`` where torch's optimizer and clipping expect it.

Overlap (``OverlappedGradReduce``): a post-accumulate-grad hook counts each parameter's backward passes; when the
last micro-batch's gradient of every parameter of a bucket (about ``bucket_mb`` MiB, filled in reverse parameter
order, the order the backward produces them) has arrived, the bucket's flattened DP x CP all_reduce starts
asynchronously (gloo runs it on its own threads, NCCL on its stream) while the backward computes the next buckets.
Buckets start strictly in order, so every rank issues the same collectives in the same order even when a parameter
gets no gradient on one rank (its bucket then waits for ``finish``, which zero-fills it). The TP-partial and
PP-replicated gradients are left to ``finish``: they need their TP / PP sums first, as in ``sync_gradients``. The sum
over two DP ranks is the same float addition as one flat all_reduce, so DP=2 is bitwise equal to ``sync_gradients``;
with more ranks gloo's ring may add in another order (a last-bit difference).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

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


def sync_gradients(plan, model: nn.Module, only: Optional[List[torch.Tensor]] = None) -> None:
    """After backward: sum partial grads over TP, the replicated conditioning embedders' over PP, then sum over CP
    and average over DP.

    With context parallelism every CP rank holds its token chunk's share of each gradient and the same loss, so one
    all_reduce over the DP x CP group divided by the DP size (not CP) gives the DP mean of the full gradients.
    A missing grad counts as zero, so every rank reduces the same flattened layout. ``only``: just these parameters
    (``OverlappedGradReduce`` has reduced the others over DP x CP).
    """
    layout = plan.layout
    named = _trainable(model)
    if only is not None:
        keep = set(only)
        named = [(n, p) for n, p in named if p in keep]
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


def sync_main_grads(plan, model: nn.Module, ddp, reduced: bool = False) -> None:
    """Megatron DDP + DistributedOptimizer, before ``ddp.finish_grad_sync()`` (its reduce-scatter over DP x CP,
    pre-scaled by 1/(dp*cp)): sum the TP-partial ``main_grad``s over TP and the replicated embedders' over PP (before
    the DP reduce: the stages' grad buffers are laid out differently, so after it an embedder's reduced slice can sit
    on different DP ranks on different stages), and multiply the buffer by cp (CP ranks hold their tokens' share of
    each gradient; DDP averages over DP x CP, so the reduce then sums over CP and averages over DP).

    ``reduced``: called after ``finish_grad_sync`` instead (megatron's overlapped reduce-scatter has already run):
    the TP sums and the CP factor then apply to the reduced buffer. Each rank's own shard of it is right: TP ranks
    lay out their buffers alike, so the sum over TP of the shards equals the shard of the sum (another order of the
    additions: last-bit differences in the TP-partial gradients; a power-of-2 cp scales exactly either way). Not with
    pipeline parallelism (the stages' buffers differ): ``trainer.optim`` turns the overlap off there."""
    layout = plan.layout
    if reduced and layout.pp > 1:
        raise ValueError("sync_main_grads(reduced=True) with pipeline_parallel > 1: the replicated embedders' "
                         "gradients must be summed over the stages before the DP reduce-scatter; build megatron DDP "
                         "with overlap_grad_reduce=False (trainer.optim does so for pipeline_parallel > 1)")
    named = _trainable(model)
    if layout.tp > 1:
        all_reduce_flat([p.main_grad for n, p in named if plan.role(n).tp_partial], layout.groups.tp)
    if layout.pp > 1:
        all_reduce_flat([p.main_grad for n, p in named if plan.role(n).pp_replicated], layout.groups.pp)
    if layout.cp > 1:
        ddp.scale_gradients(float(layout.cp))


BUCKET_MB = 25.0   # torch DDP's bucket_cap_mb: big enough to keep the all_reduce efficient, small enough to overlap


class OverlappedGradReduce:
    """Bucketed asynchronous DP x CP all_reduce of the gradients, started during the last micro-batch's backward
    (module docstring). Build once after the model is parallelised, before the first backward; call ``finish()``
    after each step's backward instead of ``sync_gradients``; ``remove()`` takes the hooks off. A no-op group
    (``active`` False) when there is one DP x CP rank. ``grad_of(param)``: where a parameter's final gradient is
    during the backward (created as zeros if it has none); ``param.grad`` by default, ``trainer.precision``'s fp32
    sum with bf16 weights (whose hooks must be registered first)."""

    def __init__(self, plan, model: nn.Module, micro_batches: int, bucket_mb: float = BUCKET_MB,
                 grad_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if micro_batches < 1 or bucket_mb <= 0:
            raise ValueError(f"OverlappedGradReduce: micro_batches must be >= 1 and bucket_mb > 0, got "
                             f"{micro_batches}, {bucket_mb}")
        layout = plan.layout
        self.plan, self.model, self.micro_batches = plan, model, micro_batches
        self.grad_of = grad_of or _grad_or_zero
        self.active = layout.dp * layout.cp > 1
        named = _trainable(model)
        later = {n for n, _ in named if (layout.tp > 1 and plan.role(n).tp_partial)
                 or (layout.pp > 1 and plan.role(n).pp_replicated)}   # their TP / PP sums come first
        self.buckets: List[List[nn.Parameter]] = []
        size, limit = 0, bucket_mb * 2**20
        for n, p in reversed(named):
            if n in later:
                continue
            if not self.buckets or size >= limit:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self._bucket_of: Dict[torch.Tensor, int] = {p: b for b, ps in enumerate(self.buckets) for p in ps}
        self._count: Dict[torch.Tensor, int] = {}
        self._missing = [len(ps) for ps in self.buckets]   # params of each bucket still without their final grad
        self._next = 0                                      # the next bucket to launch (strictly in order)
        self.overlapped = 0   # buckets the last finished step had started during its backward
        self._inflight: List[Tuple[torch.Tensor, List[torch.Tensor], object]] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self._bucket_of] \
            if self.active else []

    @property
    def launched(self) -> int:
        """Buckets whose all_reduce has started this step (before ``finish``: those overlapped with the backward)."""
        return self._next

    def _ready(self, p: torch.Tensor) -> None:
        count = self._count.get(p, 0) + 1
        self._count[p] = count
        if count != self.micro_batches:
            return
        self._missing[self._bucket_of[p]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        grads = [self.grad_of(p) for p in self.buckets[b]]   # no gradient on this rank (unused): zeros
        flat = _flatten_dense_tensors(grads)
        self._inflight.append((flat, grads, dist.all_reduce(flat, group=self.plan.layout.groups.dp_cp,
                                                            async_op=True)))
        self._next = b + 1

    def finish(self) -> None:
        """After the step's backward: launch the buckets still waiting, wait for all, average over DP, then reduce
        the TP-partial and PP-replicated gradients as ``sync_gradients`` does (the whole ``sync_gradients`` when
        inactive). Resets the counts for the next step."""
        if not self.active:
            sync_gradients(self.plan, self.model)
            return
        self.overlapped = self._next
        while self._next < len(self.buckets):
            self._launch(self._next)
        dp = self.plan.layout.dp
        for flat, grads, work in self._inflight:
            work.wait()
            if dp > 1:
                flat.div_(dp)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        self._inflight, self._next, self._count = [], 0, {}
        self._missing = [len(ps) for ps in self.buckets]
        sync_gradients(self.plan, self.model, only=[p for p in _params(self.model) if p not in self._bucket_of])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _params(model: nn.Module) -> List[nn.Parameter]:
    return [p for _, p in _trainable(model)]
