"""Pipeline parallelism for MUGDiT (``stage.pipeline_parallel``): stages of consecutive blocks, run by megatron-core's
1F1B schedule.

    block_range, absent = apply_pipeline_parallel(model, pp=2, pp_rank=layout.pp_rank)   # called by the plan's builder
    pipe = PipelineStage(model, plan, pipeline_config(dit, pp=2))
    loss = pipeline_forward_backward(pipe, micro_batches, plan, forward=..., loss=...)

PP stage s keeps blocks [s*D/pp, (s+1)*D/pp) (the others become parameterless ``_AbsentBlock`` placeholders, so
state-dict keys stay the unsharded model's global ``blocks.{i}.*``), ``x_embedder`` and the start/end tokens only on
the first stage, ``final_layer`` only on the last. The conditioning embedders (``PP_REPLICATED``: t, fps, t_block,
caption) are replicated on every stage as in MUG-V: each stage computes the modulations, text and RoPE angles itself
from the same inputs (``MUGDiT.condition``), so only the residual stream x ([B, L, D], padded L) crosses stages;
their gradients are each stage's partial sums (``ParamRole.pp_replicated``; summed over PP in
``trainer.parallel.grads``). The schedule is megatron-core's ``get_forward_backward_func()`` (1F1B without
interleaving) with ``variable_seq_lengths``: the token count changes with the bucket. Measurements and the
distributed-optimizer details: docs/parallelism.md.
"""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch
from torch import nn

from trainer.parallel.grads import group_sum

PP_REPLICATED = ("t_embedder.", "fps_embedder.", "t_block.", "y_embedder.")   # conditioning: on every PP stage


class _AbsentBlock(nn.Module):
    """Stands in for a DiT block that lives on another pipeline stage: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this DiT block lives on another pipeline stage")


def apply_pipeline_parallel(model: nn.Module, pp: int, pp_rank: int) -> Tuple[Tuple[int, int], Tuple[str, ...]]:
    """Keep this PP stage's part of a MUGDiT in place; returns (block range [start, end), state-dict key prefixes
    that live on other stages). pp=1: untouched, every block. Call it after the TP/CP/SP and recomputation
    wrappers, which then only keep the stage's parts. ``pp`` divides the depth (checked at config load)."""
    depth = len(model.blocks)
    per = depth // pp
    start, end = pp_rank * per, (pp_rank + 1) * per
    if pp == 1:
        return (start, end), ()
    absent = [f"blocks.{i}." for i in range(depth) if not start <= i < end]
    for i in range(depth):
        if not start <= i < end:
            model.blocks[i] = _AbsentBlock()
    if pp_rank > 0:
        model.x_embedder = None
        model.start_token = None
        model.end_token = None
        absent += ["x_embedder.", "start_token", "end_token"]
    if pp_rank < pp - 1:
        model.final_layer = None
        absent.append("final_layer.")
    return (start, end), tuple(absent)


class PipelineStage:
    """One PP stage of a MUGDiT as megatron-core's pipeline schedules want it: ``config`` (``pipeline_config``:
    ``variable_seq_lengths``), ``model_type``, ``set_input_tensor`` (the residual stream received from the previous
    stage) and a call that runs this stage's part: conditioning (every stage), embedding (first), its blocks, and
    the head (last: the velocity; else the residual stream for the next stage)."""

    def __init__(self, model: nn.Module, plan, config):
        from megatron.core.enums import ModelType

        self.module, self.plan, self.config, self.model_type = model, plan, config, ModelType.encoder_or_decoder
        self.input_tensor = None

    def set_input_tensor(self, tensors) -> None:
        self.input_tensor = tensors[0] if isinstance(tensors, (list, tuple)) else tensors

    def __call__(self, x_BCTHW, t_B, text_BSD, text_mask_BS, **kw):
        m, plan = self.module, self.plan
        ctx = m.condition(x_BCTHW, t_B, text_BSD, text_mask_BS, **kw)
        x_BLD = m.embed(x_BCTHW, ctx) if plan.first_stage else self.input_tensor
        x_BLD = m.run_blocks(x_BLD, ctx, *plan.block_range)
        return m.head(x_BLD, ctx) if plan.last_stage else x_BLD.float()


def pipeline_config(dit, pp: int, tp: int = 1):
    """The megatron TransformerConfig the pipeline schedule reads (fp32 residual stream, variable shapes; only
    ``hidden_size`` of the model fields is read, for the default tensor shape that ``variable_seq_lengths`` replaces;
    the MoE dispatcher setting only silences its check against variable lengths: there are no experts)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=dit.depth, hidden_size=dit.hidden_size, num_attention_heads=dit.num_heads,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             pipeline_dtype=torch.float32, variable_seq_lengths=True, use_cpu_initialization=True,
                             moe_token_dispatcher_type="alltoall")


def pipeline_forward_backward(pipe: PipelineStage, micro: List[Any], plan,
                              forward: Callable[[PipelineStage, Any], torch.Tensor],
                              loss: Callable[[torch.Tensor, Any], torch.Tensor], forward_only: bool = False) -> float:
    """Forward and backward of the micro-batches ``micro`` through the pipeline stages with megatron-core's schedule
    (shapes sent ahead of every activation). ``forward(stage, m)`` runs the stage on micro-batch ``m``; on the last
    stage ``loss(output, m)`` gives its scalar loss. The schedule scales each loss by 1/M (and by the CP size,
    undone here). Returns the mean loss, sent from the last stage to every stage of the pipeline. ``forward_only``:
    no backward (Flow-DPO's reference pass, whose ``loss`` keeps what it needs of the last stage's output)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses: List[float] = []
    cp = plan.layout.cp

    def forward_step(data_iterator, stage):
        m = next(data_iterator)
        out = forward(stage, m)

        def loss_func(output):
            value = loss(output, m)
            losses.append(float(value.detach()))
            return (value / cp if cp > 1 else value), {}
        return out, loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=pipe,
                                num_microbatches=len(micro), seq_length=1, micro_batch_size=1,
                                forward_only=forward_only)
    value = (losses[0] if len(losses) == 1 else sum(losses) / len(losses)) if plan.last_stage else 0.0
    return group_sum([value], plan.layout.groups.pp)[0]
