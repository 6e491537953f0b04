"""Tensor parallelism for MUGDiT, applied after the model is built (torchtitan style: the model file imports nothing
distributed), plus the gradient collectives the trainer needs.

``parallelize(model, tp)`` swaps the block linears that ``models.convert.tp_rule`` shards for megatron-core column/row-parallel linears
that hold this TP rank's shard of the existing weights. The implementation is chosen in one place,
``tp_layer_specs(backend)``: ModuleSpecs for megatron's local Column/RowParallelLinear, or Transformer Engine's
TEColumn/TERowParallelLinear (backend "te", when TE imports and CUDA is present). The layers are built from them
with megatron's ``build_module``, and the TP process group is passed in explicitly. Fused outputs are sharded per
part: qkv rows are (3, heads, head_dim) and kv rows (2, heads, head_dim), so rank r keeps heads
[r*h/tp, (r+1)*h/tp) of each of q, k and v (``models.convert.shard_tp(layout="ours")`` is the same rule on state
dicts). The attention modules infer their local head count from the linear's output size, so they run unchanged.
Parameter names stay ``weight``/``bias``: the state-dict keys are the unsharded model's. Everything else (norms,
embedders, adaLN tables, final layer) is replicated across TP ranks.

Gradients (``sync_gradients``): without sequence parallelism, replicated parameters outside the sharded modules get
identical gradients on every TP rank (the column-parallel input gradient is all-reduced inside megatron's autograd
function). Replicated parameters *inside* a sharded attention module (the per-head QK RMSNorm weights) only see this
rank's heads, so their gradients are partial sums: they are summed over the TP group (``_tp_partial``). Then one
flattened all_reduce over ``parallel_state.get_data_parallel_group()`` averages over DP. We do not use megatron's
DDP wrapper: its contiguous grad buffers and hooks buy overlap we do not need at this size, and plain all_reduces
keep ``param.grad`` where torch's optimizer and clipping expect it.

Sequence parallelism (``parallelize(..., sequence_parallel=True)``, ``stage.sequence_parallel``) is Megatron's:
the linears are built with ``TransformerConfig.sequence_parallel``, so a column-parallel linear all-gathers the
sequence chunks of its input (backward: reduce-scatter of the input gradient) and a row-parallel one reduce-scatters
its output instead of all-reducing it, both along dim 0; ``_TensorOnly`` therefore feeds them sequence-first rows
([B, l, D] -> [l, B, D] -> [l*B, D], and back to [B, l', D]). The cross-attention ``kv_linear`` reads the
replicated text and is built without SP (``_OFF_SEQUENCE``). MUGDiT's ``seq_split`` hook (after CP's
``token_split``) keeps TP rank r's contiguous chunk r of the tokens, of the per-token adaLN modulation and of the
final-layer modulation, not of the RoPE angles: qkv gathers the (CP-local) sequence before RoPE. So norms,
modulation, gated residuals and the final layer run on L/tp tokens, attention on the full sequence for the local
heads; ``seq_gather`` all-gathers the final layer's output. Gradients follow Megatron: the split's backward
all-gathers the chunks' gradients (everything before it -- embedders, t_block, start/end tokens -- gets the full
gradient on every TP rank) and the gather's backward keeps this rank's chunk. The replicated parameters used on the
chunk (blocks' ``scale_shift_table`` and ``cross_attn_norm``, the row-parallel biases, ``final_layer.*``) then hold
partial sums: they are tagged ``_sp_partial`` and summed over TP like ``_tp_partial`` (``partial_over_tp``).
tests/test_trainer_sp.py checks outputs, gradients and weights after AdamW steps against TP without SP and TP=1,
with and without recomputation. With TP=1 there is nothing to split (megatron turns SP off too).

Context parallelism and the token splits of both CP and SP (``apply_context_parallel``, the ``seq_split`` hooks
and the padding that lets any token count split) live in ``trainer.tokens``.

``apply_activation_checkpointing`` recomputes each block in the backward (``stage.recompute``).

Pipeline parallelism (``apply_pipeline_parallel``, ``stage.pipeline_parallel``; spec §6.4): PP stage s keeps blocks
[s*D/pp, (s+1)*D/pp) of the model (the others become parameterless ``_AbsentBlock`` placeholders, so state-dict keys
stay the unsharded model's global ``blocks.{i}.*``), ``x_embedder`` and the start/end tokens only on the first
stage, ``final_layer`` only on the last. The conditioning embedders (t, fps, t_block, caption) are replicated on every
stage as in MUG-V: each stage computes the modulations, text and RoPE angles itself from the same inputs
(``MUGDiT.condition``), so only the residual stream x ([B, L, D], padded L) crosses stages. Their gradients are each
stage's partial sums (the blocks of that stage), so ``sync_gradients`` sums them over the PP group (tagged
``_pp_replicated``, MUG-V's ``pipeline_parallel=True`` flag) and ``clip_grad_norm_tp`` sums the squares of the
stage-owned parameters over PP and counts the replicated ones once. ``PipelineStage`` (with ``pipeline_config``)
is what megatron-core's ``get_forward_backward_func()`` (1F1B without interleaving, ``variable_seq_lengths``: the
token count changes with the bucket) runs: ``set_input_tensor`` + a forward through ``MUGDiT``'s own
``condition``/``embed``/``run_blocks``/``head``, nothing duplicated. ``gather_full_state_dict`` also collects
every stage's keys on PP rank 0 (the "full" checkpoint stays the unsharded model), ``shard_full_state_dict`` drops
the keys of other stages; ``dist_sharded_state_dict`` keeps the global keys and makes PP rank 0 the main replica of the
replicated embedders. The stages combine with the TP/SP/CP hooks above unchanged (the received x is the CP/SP
chunk; every stage splits its own conditioning): PP=2 equals PP=1 with the same micro-batches alone and with TP=2 +
SP (tests/test_trainer_pp.py), and with CP=2, TP=2 + recomputation and DP=2 (4 processes, by hand; weights <= 8.8e-7
apart after 3-4 steps). With megatron's distributed optimizer the trainer sums the embedders' ``main_grad`` over
PP before its DDP's DP reduce, and the copies on stages > 0 are tagged ``shared`` (megatron's flag for a parameter
duplicated on another PP stage), so its ``get_main_grads_for_grad_norm`` counts them once.

Not implemented (the config has no switch for them):
- Ring attention for context parallelism (``apply_context_parallel`` all-gathers K/V instead: exact and simple, but
  every rank holds the full K/V of a layer; a ring with a log-sum-exp merge would not).
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from models.convert import merge_tensors, shard_tensor, tp_rule
from trainer import tokens

def _plan_for(name: str) -> Tuple[str, int] | None:
    """("column" | "row", fused parts) for a linear module that is sharded, else None. The rules live once, in
    ``models.convert`` (the checkpoint converter shards state dicts with the same ones)."""
    rule, parts = tp_rule(f"{name}.weight")
    return (rule, parts) if rule else None


# ------------------------------------------------------------------------------------------------ layer specs


class _TensorOnly:
    """Mixin for megatron's (TE or local) parallel linears: any leading dims in, just the tensor out, and no
    ``_extra_state`` key, so the state dict keeps the plain ``nn.Linear`` names (``weight``/``bias``). TE's FP8
    metadata lives in ``_extra_state``: this trainer does not use FP8, so nothing is lost."""
    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._load_state_dict_pre_hooks.clear()   # megatron's hook would insert an _extra_state key on load

    _seq_parallel = False   # set by parallelize: megatron gathers / reduce-scatters dim 0 (the sequence)

    def forward(self, x):
        if not self._seq_parallel:
            y, _ = super().forward(x.reshape(-1, x.shape[-1]))
            return y.reshape(*x.shape[:-1], y.shape[-1])
        b = x.shape[0]                                                   # x: [B, l, D], l = this rank's tokens
        y, _ = super().forward(x.transpose(0, 1).reshape(-1, x.shape[-1]))   # sequence-first rows [l*B, D]
        return y.view(-1, b, y.shape[-1]).transpose(0, 1)                # [B, l', O]: l' = l*tp (column), l/tp (row)


def _te_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


@functools.lru_cache(maxsize=None)
def _linear_classes(backend: str):
    """(column, row) classes of one backend, built once (TE only imported when asked for and usable)."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
        column_base, row_base = TEColumnParallelLinear, TERowParallelLinear
    else:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        column_base, row_base = ColumnParallelLinear, RowParallelLinear
    column = type(f"DiT{column_base.__name__}", (_TensorOnly, column_base),
                  {"__doc__": f"Output-sharded {column_base.__name__} returning just the tensor."})
    row = type(f"DiT{row_base.__name__}", (_TensorOnly, row_base),
               {"__doc__": f"Input-sharded {row_base.__name__} (all-reduces its output) returning just the tensor."})
    return column, row


def tp_layer_specs(backend: str = "local"):
    """The one place that picks the tensor-parallel linear implementation: ``{"column": ModuleSpec, "row":
    ModuleSpec}``, each built with ``build_module(spec, in, out, config=, init_method=, bias=, tp_group=)``.

    backend "te": Transformer Engine's TEColumn/TERowParallelLinear when transformer_engine imports and CUDA is
    present, else (like "local") megatron-core's own Column/RowParallelLinear. ``spec.metainfo["backend"]`` says which
    was chosen. Column layers keep their output sharded (no gather); row layers take sharded input and all-reduce.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    if backend not in ("local", "te"):
        raise ValueError(f"tp_layer_specs: backend must be 'local' or 'te', got {backend!r}")
    chosen = "te" if backend == "te" and _te_usable() else "local"
    column, row = _linear_classes(chosen)
    extra = {"is_expert": False} if chosen == "te" else {}
    meta = {"backend": chosen}
    return {"column": ModuleSpec(module=column, params={"gather_output": False, **extra}, metainfo=meta),
            "row": ModuleSpec(module=row, params={"input_is_parallel": True, "skip_bias_add": False, **extra},
                              metainfo=meta)}


def _no_init(weight: torch.Tensor) -> None:
    """Weights are copied from the unsharded model after construction."""


# sharded linears whose input is not the token sequence (the cross-attention K/V read the replicated text): built
# without sequence parallelism
_OFF_SEQUENCE = (".cross_attn.kv_linear",)


def parallelize(model: nn.Module, tp_group_size: int, *, tp_group=None, backend: str = "local",
                sequence_parallel: bool = False) -> nn.Module:
    """Shard the plan's linears over the TP process group in place (TP=1: the model is returned untouched).

    ``tp_group`` defaults to megatron's tensor-parallel group (built by ``trainer.device.init_distributed``); it is
    handed to every parallel layer. ``backend`` goes to ``tp_layer_specs``. Call it on the model already on its
    device: parameters are tagged (``_tp_sharded``, ``_tp_partial``, ``_sp_partial``) and the tags live on the
    Parameter objects. ``sequence_parallel``: Megatron sequence parallelism (module docstring): the linears (but
    ``_OFF_SEQUENCE``) gather / reduce-scatter the sequence and MUGDiT's ``seq_split``/``seq_gather`` hooks are set.
    """
    if tp_group_size == 1:
        return model
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    if tp_group is None:
        from megatron.core import parallel_state
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) != tp_group_size:
        raise ValueError(f"parallelize(tp={tp_group_size}) but the TP group has {dist.get_world_size(tp_group)} "
                         "ranks: call init_distributed(tp) first")
    rank = dist.get_rank(tp_group)
    targets = [(n, m) for n, m in model.named_modules() if _plan_for(n)]
    if not targets:
        raise ValueError("parallelize: no linear matched the TP plan (blocks.{i}.attn.qkv, ...); is this a MUGDiT?")
    dit = getattr(model, "cfg", None)
    if dit is None:
        raise TypeError("parallelize: the model has no .cfg (DiTConfig); is this a MUGDiT?")
    if dit.num_heads % tp_group_size:
        raise ValueError(f"parallelize: tensor_parallel={tp_group_size} must divide dit.num_heads ({dit.num_heads})")
    if sequence_parallel and not (hasattr(model, "seq_split") and hasattr(model, "token_multiple")):
        raise TypeError("parallelize: sequence_parallel needs the model's seq_split/seq_gather hooks and "
                        "token_multiple (MUGDiT)")
    configs = {sp: TransformerConfig(num_layers=dit.depth, hidden_size=dit.hidden_size,
                                     num_attention_heads=dit.num_heads, tensor_model_parallel_size=tp_group_size,
                                     use_cpu_initialization=True, perform_initialization=False,
                                     params_dtype=targets[0][1].weight.dtype, sequence_parallel=sp)
               for sp in {False, sequence_parallel}}
    specs = tp_layer_specs(backend)
    for name, lin in targets:
        if type(lin) is not nn.Linear:
            raise TypeError(f"parallelize: {name} is {type(lin).__name__}, expected nn.Linear (already parallelized?)")
        kind, parts = _plan_for(name)
        out_f, in_f = lin.weight.shape
        if (kind == "column" and out_f % (parts * tp_group_size)) or (kind == "row" and in_f % tp_group_size):
            raise ValueError(f"parallelize: {name} [{out_f}x{in_f}] cannot be split over tp={tp_group_size}; "
                             "tensor_parallel must divide dit.num_heads")
        bias = lin.bias is not None
        sp = sequence_parallel and not name.endswith(_OFF_SEQUENCE)
        new = build_module(specs[kind], in_f, out_f, config=configs[sp], init_method=_no_init, bias=bias,
                           tp_group=tp_group)
        new.to(device=lin.weight.device, dtype=lin.weight.dtype)   # before tagging: a later .to() may swap params
        new._tp_plan, new._seq_parallel = (kind, parts), sp
        with torch.no_grad():
            new.weight.copy_(shard_tensor(lin.weight.detach(), kind, parts, rank, tp_group_size))
            if bias:
                new.bias.copy_(shard_tensor(lin.bias.detach(), kind, parts, rank, tp_group_size))
        new.weight._tp_sharded = True
        if bias and kind == "column":
            new.bias._tp_sharded = True
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    in_tp_linears = {id(p) for n, _ in targets for p in model.get_submodule(n).parameters()}
    for parent_name in {n.rpartition(".")[0] for n, _ in targets}:   # e.g. q_norm/k_norm: applied per local head
        for p in model.get_submodule(parent_name).parameters():
            if id(p) not in in_tp_linears:
                p._tp_partial = True
    if sequence_parallel:
        tokens.set_sequence_parallel_hooks(model, tp_group, rank, tp_group_size)
    return model


def partial_over_tp(p: nn.Parameter) -> bool:
    """Whether ``p``'s gradient is this TP rank's partial sum (per-head QK norms; with sequence parallelism the
    replicated parameters used on the sequence chunk): it must be summed over the TP group."""
    return getattr(p, "_tp_partial", False) or getattr(p, "_sp_partial", False)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every DiT block's activations in the backward (torchtitan's ``apply_ac``, full, per block).

    Each ``model.blocks[i].forward`` is wrapped in non-reentrant ``torch.utils.checkpoint``: only the block inputs
    are kept, and the block's forward (its TP collectives included, in the same order on every TP rank) runs again
    in the backward. Module names and state-dict keys are unchanged. The blocks draw no random numbers, so the
    recomputation is exact: losses and gradients equal the run without it.
    """
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError("apply_activation_checkpointing: the model has no .blocks; is this a MUGDiT?")
    for block in blocks:
        if getattr(block, "_recompute", False):
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        block._recompute = True
    return model


class _AbsentBlock(nn.Module):
    """Stands in for a DiT block that lives on another pipeline stage: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this DiT block lives on another pipeline stage")


PP_REPLICATED = ("t_embedder.", "fps_embedder.", "t_block.", "y_embedder.")   # conditioning: on every PP stage


def apply_pipeline_parallel(model: nn.Module, pp: int, pp_rank: int) -> nn.Module:
    """Keep this PP stage's part of a MUGDiT in place (module docstring); pp=1: untouched. Call it after the TP/CP/SP
    and recomputation wrappers, which then only keep the stage's parts. Sets ``model.pp_range = (start, end)``,
    ``model.pp_stage = (pp_rank, pp)`` and ``model.pp_absent`` (state-dict key prefixes that live elsewhere)."""
    depth = len(model.blocks)
    if depth % pp:
        raise ValueError(f"pipeline_parallel={pp} must divide dit.depth ({depth})")
    per = depth // pp
    start, end = pp_rank * per, (pp_rank + 1) * per
    model.pp_range, model.pp_stage, model.pp_absent = (start, end), (pp_rank, pp), ()
    if pp == 1:
        return model
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
    model.pp_absent = tuple(absent)
    for name, p in model.named_parameters():
        if name.startswith(PP_REPLICATED):
            p._pp_replicated = True
            # megatron's flag for a parameter duplicated on another PP stage: its optimizers' grad norm
            # (``get_main_grads_for_grad_norm``: ``param_is_not_shared``) then counts the replicas once, on stage 0
            p.shared = pp_rank > 0
    return model


def _on_other_stage(model: nn.Module, key: str) -> bool:
    return any(key == a or key.startswith(a) for a in getattr(model, "pp_absent", ()))


class PipelineStage:
    """One PP stage of a MUGDiT as megatron-core's pipeline schedules want it: ``config`` (``pipeline_config``:
    ``variable_seq_lengths``), ``model_type``, ``set_input_tensor`` (the residual stream received from the previous
    stage) and a call that runs this stage's part: conditioning (every stage), embedding (first), its blocks, and
    the head (last: the velocity; else the residual stream for the next stage)."""

    def __init__(self, model: nn.Module, config):
        from megatron.core.enums import ModelType

        self.module, self.config, self.model_type = model, config, ModelType.encoder_or_decoder
        self.rank, self.pp = model.pp_stage
        self.input_tensor = None

    def set_input_tensor(self, tensors) -> None:
        self.input_tensor = tensors[0] if isinstance(tensors, (list, tuple)) else tensors

    def __call__(self, x_BCTHW, t_B, text_BSD, text_mask_BS, **kw):
        m = self.module
        ctx = m.condition(x_BCTHW, t_B, text_BSD, text_mask_BS, **kw)
        x_BLD = m.embed(x_BCTHW, ctx) if self.rank == 0 else self.input_tensor
        x_BLD = m.run_blocks(x_BLD, ctx, *m.pp_range)
        return m.head(x_BLD, ctx) if self.rank == self.pp - 1 else x_BLD.float()


def pipeline_config(dit, pp: int, tp: int = 1):
    """The megatron TransformerConfig the pipeline schedule reads (fp32 residual stream, variable shapes; only
    ``hidden_size`` of the model fields is read, for the default tensor shape that ``variable_seq_lengths`` replaces;
    the MoE dispatcher setting only silences its check against variable lengths: there are no experts)."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=dit.depth, hidden_size=dit.hidden_size, num_attention_heads=dit.num_heads,
                             tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             pipeline_dtype=torch.float32, variable_seq_lengths=True, use_cpu_initialization=True,
                             moe_token_dispatcher_type="alltoall")


def _sharded_modules(model: nn.Module) -> Dict[str, Tuple[str, int]]:
    return {n: m._tp_plan for n, m in model.named_modules() if hasattr(m, "_tp_plan")}


def _tp_group():
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


def gather_full_state_dict(model: nn.Module,
                           local_sd: Dict[str, torch.Tensor] | None = None) -> Dict[str, torch.Tensor]:
    """Full (unsharded) fp32 CPU tensors for ``local_sd`` (default: the model's state dict); collective over TP,
    and with pipeline parallelism over the PP group too: PP rank 0 gets every stage's keys (the other stages return
    their own part only)."""
    local_sd = model.state_dict() if local_sd is None else local_sd
    full = _gather_tp_state_dict(model, local_sd)
    rank, pp = getattr(model, "pp_stage", (0, 1))
    if pp == 1:
        return full
    from megatron.core import parallel_state
    group = parallel_state.get_pipeline_model_parallel_group()
    parts = [None] * pp if rank == 0 else None
    dist.gather_object(full, parts, dst=dist.get_global_rank(group, 0), group=group)
    if rank != 0:
        return full
    merged: Dict[str, torch.Tensor] = {}
    for part in parts:   # the replicated conditioning embedders: identical on every stage, stage 0's kept
        for k, v in part.items():
            merged.setdefault(k, v)
    return merged


def _gather_tp_state_dict(model: nn.Module, local_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    plans = _sharded_modules(model)
    full: Dict[str, torch.Tensor] = {}
    for key, value in local_sd.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in plans and leaf in ("weight", "bias"):
            group, tp = _tp_group()
            shards = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(shards, value.detach().contiguous(), group=group)
            value = merge_tensors([s.cpu() for s in shards], *plans[module_name])
        full[key] = value.detach().float().cpu().clone() if value.is_floating_point() else value.detach().cpu().clone()
    return full


def shard_full_state_dict(model: nn.Module, full_sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This TP rank's slices of a full state dict (keys checked against the model, with the differences named)."""
    own = model.state_dict()
    if getattr(model, "pp_absent", ()):   # pipeline parallelism: the keys of the other stages' parts are not here
        full_sd = {k: v for k, v in full_sd.items() if not _on_other_stage(model, k)}
    missing, unexpected = sorted(set(own) - set(full_sd)), sorted(set(full_sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(was the checkpoint written for a different dit config?)")
    plans = _sharded_modules(model)
    rank = tp = 1
    if plans:
        from megatron.core import parallel_state
        rank = parallel_state.get_tensor_model_parallel_rank()
        tp = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    for key, value in full_sd.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in plans and leaf in ("weight", "bias"):
            value = shard_tensor(value, *plans[module_name], rank, tp)
        if value.shape != own[key].shape:
            raise ValueError(f"state dict: {key} has shape {tuple(value.shape)} after sharding, the model expects "
                             f"{tuple(own[key].shape)} (was the checkpoint written for a different dit config?)")
        local[key] = value
    return local


def load_full_state_dict(model: nn.Module, full_sd: Dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a possibly TP-sharded model."""
    model.load_state_dict(shard_full_state_dict(model, full_sd), strict=True)


def _all_reduce_flat(grads: List[torch.Tensor], group, divide_by: int = 1) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide_by > 1:
        flat.div_(divide_by)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def sync_gradients(params: Iterable[nn.Parameter]) -> None:
    """After backward: sum partial grads over TP (``partial_over_tp``), the replicated conditioning embedders' over
    PP (``apply_pipeline_parallel``), then sum over CP and average over DP.

    With context parallelism every CP rank holds its token chunk's share of each gradient and the same loss, so one
    all_reduce over megatron's DP+CP group divided by the DP size (not CP) gives the DP mean of the full gradients.

    A missing grad counts as zero, so every rank reduces the same flattened layout.
    """
    from megatron.core import parallel_state

    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        _all_reduce_flat([p.grad for p in params if partial_over_tp(p)],
                         parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:   # replicated conditioning: per-stage partials
        _all_reduce_flat([p.grad for p in params if getattr(p, "_pp_replicated", False)],
                         parallel_state.get_pipeline_model_parallel_group())
    dp = parallel_state.get_data_parallel_world_size()
    if dp * parallel_state.get_context_parallel_world_size() > 1:
        _all_reduce_flat([p.grad for p in params], parallel_state.get_data_parallel_group(with_context_parallel=True),
                         divide_by=dp)


def clip_grad_norm_tp(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip to a global L2 norm: squares of TP-sharded grads are summed over the TP group, replicated ones once;
    with pipeline parallelism the stages' sums are added up over the PP group, the conditioning embedders that every
    stage holds (``_pp_replicated``, already summed over PP) counted once (on PP rank 0)."""
    from megatron.core import parallel_state

    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    sharded = [p.grad.float().pow(2).sum() for p in params if getattr(p, "_tp_sharded", False)]
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    skip_dup = pp > 1 and parallel_state.get_pipeline_model_parallel_rank() > 0   # replicated over PP: count once
    replicated = [p.grad.float().pow(2).sum() for p in params if not getattr(p, "_tp_sharded", False)
                  and not (skip_dup and getattr(p, "_pp_replicated", False))]
    zero = torch.zeros((), device=params[0].grad.device)
    sq_sharded = torch.stack(sharded).sum() if sharded else zero.clone()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sq_sharded, group=parallel_state.get_tensor_model_parallel_group())
    total_sq = sq_sharded + (torch.stack(replicated).sum() if replicated else zero)
    if pp > 1:
        dist.all_reduce(total_sq, group=parallel_state.get_pipeline_model_parallel_group())
    total = total_sq.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.to(p.grad.dtype))
    return float(total)


def dist_sharded_state_dict(local_sd: Dict[str, torch.Tensor], prefix: str = "model.") -> Dict[str, object]:
    """Megatron ``dist_checkpointing`` ShardedTensors for a (possibly TP-sharded) local state dict.

    The global layout does not depend on the TP size, so a checkpoint saved at one TP size loads at another
    (resharding): a column-parallel weight/bias with ``parts`` fused blocks (qkv = 3, kv = 2, else 1) is stored as
    [parts, out/parts, (in)] with this rank holding fragment ``tp_rank`` of ``tp`` on axis 1 (the per-part head
    slices of ``shard_tensor``); a row-parallel weight is fragmented on axis 1; everything else (row-parallel biases,
    norms, embedders) is replicated, saved by TP rank 0 of DP-CP rank 0. ``replica_id`` follows megatron-core's
    ``make_(tp_)sharded_tensor_for_checkpoint``: (0, tp_rank or 0, dp_cp_rank) with dp_cp_rank =
    ``get_data_parallel_rank(with_context_parallel=True)``, because the CP ranks of a DP rank hold replicas of the
    same shards (without CP in it, two CP ranks would both claim the main replica). The values are views of
    ``local_sd``'s tensors in that layout (reshape them back with ``local_sd``'s shapes after a load). The stored
    layout depends on neither TP nor CP. Keys are the state-dict keys of the unsharded model with ``prefix``.
    Pipeline parallelism: every stage's keys are global (``blocks.{i}`` of the whole model), so the stages' shards
    make up one model that loads at any PP size; the conditioning embedders every stage holds are replicas whose
    replica id starts with the PP rank (stage 0 saves them).
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    tp, tp_rank, dp_rank, pp_rank = 1, 0, 0, 0
    if parallel_state.model_parallel_is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    out: Dict[str, object] = {}
    for key, t in local_sd.items():
        if pp_rank and key.startswith(PP_REPLICATED):   # held by every PP stage: stage 0 saves it
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, t, replica_id=(pp_rank, tp_rank, dp_rank))
            continue
        rule, parts = tp_rule(key)
        if rule == "column":
            view = t.reshape(parts, t.shape[0] // parts, *t.shape[1:])
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, view, (1, tp_rank, tp),
                                                       replica_id=(0, 0, dp_rank))
        elif rule == "row" and t.ndim == 2:
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, t, (1, tp_rank, tp), replica_id=(0, 0, dp_rank))
        else:
            out[key] = ShardedTensor.from_rank_offsets(prefix + key, t, replica_id=(0, tp_rank, dp_rank))
    return out
