"""State dicts across the parallel layout: the full (unsharded) model on one rank, a rank's part of it, and megatron
``dist_checkpointing`` ShardedTensors whose stored layout depends on no parallel size.

    full = gather_full_state_dict(plan, model)            # collective; PP rank 0 gets every stage's keys
    load_full_state_dict(plan, model, full)               # this rank's TP slices and PP stage's keys
    sharded = dist_sharded_state_dict(plan, model.state_dict(), "model.")   # for dist_checkpointing.save / load

Every function reads who holds what from the ``ParallelPlan`` (``trainer/parallel/plan.py``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from models.convert import merge_tensors, shard_tensor
from trainer.parallel.tensor_parallel import key_tp_rule


def gather_full_state_dict(plan, model: nn.Module,
                           local_sd: Dict[str, torch.Tensor] | None = None) -> Dict[str, torch.Tensor]:
    """Full (unsharded) fp32 CPU tensors for ``local_sd`` (default: the model's state dict); collective over TP,
    and with pipeline parallelism over the PP group too: PP rank 0 gets every stage's keys (the other stages return
    their own part only)."""
    local_sd = model.state_dict() if local_sd is None else local_sd
    full = _gather_tp_state_dict(plan, local_sd)
    layout = plan.layout
    if layout.pp == 1:
        return full
    group = layout.groups.pp
    parts = [None] * layout.pp if layout.pp_rank == 0 else None
    dist.gather_object(full, parts, dst=dist.get_global_rank(group, 0), group=group)
    if layout.pp_rank != 0:
        return full
    merged: Dict[str, torch.Tensor] = {}
    for part in parts:   # the replicated conditioning embedders: identical on every stage, stage 0's kept
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


def _gather_tp_state_dict(plan, local_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    full: Dict[str, torch.Tensor] = {}
    for key, value in local_sd.items():
        role = plan.role(key)
        if role.tp:
            shards = [torch.empty_like(value) for _ in range(plan.layout.tp)]
            dist.all_gather(shards, value.detach().contiguous(), group=plan.layout.groups.tp)
            value = merge_tensors([s.cpu() for s in shards], role.tp, role.parts)
        full[key] = value.detach().float().cpu().clone() if value.is_floating_point() else value.detach().cpu().clone()
    return full


def shard_full_state_dict(plan, model: nn.Module, full_sd: Dict[str, torch.Tensor],
                          own: Dict[str, torch.Tensor] | None = None) -> Dict[str, torch.Tensor]:
    """This rank's slices of a full state dict (keys checked against the model's, or against ``own``, a part of
    its state dict such as the base weights or the LoRA adapters, with the differences named)."""
    own = model.state_dict() if own is None else own
    if plan.absent:   # pipeline parallelism: the keys of the other stages' parts are not here
        full_sd = {k: v for k, v in full_sd.items() if not plan.on_other_stage(k)}
    missing, unexpected = sorted(set(own) - set(full_sd)), sorted(set(full_sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(was the checkpoint written for a different dit config?)")
    local = {}
    for key, value in full_sd.items():
        role = plan.role(key)
        if role.tp:
            value = shard_tensor(value, role.tp, role.parts, plan.layout.tp_rank, plan.layout.tp)
        if value.shape != own[key].shape:
            raise ValueError(f"state dict: {key} has shape {tuple(value.shape)} after sharding, the model expects "
                             f"{tuple(own[key].shape)} (was the checkpoint written for a different dit config?)")
        local[key] = value
    return local


def load_full_state_dict(plan, model: nn.Module, full_sd: Dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a possibly TP-sharded, PP-split model."""
    model.load_state_dict(shard_full_state_dict(plan, model, full_sd), strict=True)


def dist_sharded_state_dict(plan, local_sd: Dict[str, torch.Tensor], prefix: str = "model.") -> Dict[str, object]:
    """Megatron ``dist_checkpointing`` ShardedTensors for a (possibly TP-sharded) local state dict.

    The global layout does not depend on the TP size, so a checkpoint saved at one TP size loads at another
    (resharding): a column-parallel weight/bias (``models.convert.tp_rule``; LoRA adapters:
    ``tensor_parallel.key_tp_rule``) with ``parts`` fused blocks (qkv = 3,
    kv = 2, else 1) is stored as [parts, out/parts, (in)] with this rank holding fragment ``tp_rank`` of ``tp`` on
    axis 1 (the per-part head slices of ``shard_tensor``); a row-parallel weight is fragmented on axis 1; everything
    else (row-parallel biases, norms, embedders) is replicated, saved by TP rank 0 of DP-CP rank 0. ``replica_id``
    follows megatron-core's ``make_(tp_)sharded_tensor_for_checkpoint``: (0, tp_rank or 0, dp_cp_rank), because the
    CP ranks of a DP rank hold replicas of the same shards. The values are views of ``local_sd``'s tensors in that
    layout (reshape them back with ``local_sd``'s shapes after a load). Keys are the state-dict keys of the
    unsharded model with ``prefix``. Pipeline parallelism: every stage's keys are global (``blocks.{i}`` of the
    whole model), so the stages' shards make up one model that loads at any PP size; the conditioning embedders
    every stage holds are replicas whose replica id starts with the PP rank (stage 0 saves them).
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    layout = plan.layout
    tp, tp_rank, dp_rank, pp_rank = layout.tp, layout.tp_rank, layout.dp_cp_rank, layout.pp_rank
    out: Dict[str, object] = {}
    for key, t in local_sd.items():
        if pp_rank and plan.role(key).pp_replicated:   # held by every PP stage: stage 0 saves it
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, t, replica_id=(pp_rank, tp_rank, dp_rank))
            continue
        rule, parts = key_tp_rule(key)
        if rule == "column":
            view = t.reshape(parts, t.shape[0] // parts, *t.shape[1:])
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, view, (1, tp_rank, tp),
                                                       replica_id=(0, 0, dp_rank))
        elif rule == "row" and t.ndim == 2:
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, t, (1, tp_rank, tp), replica_id=(0, 0, dp_rank))
        else:
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, t, replica_id=(0, tp_rank, dp_rank))
    return out
