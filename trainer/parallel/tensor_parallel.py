"""Tensor and sequence parallelism for MUGDiT: megatron-core column/row-parallel linears swapped in after the model
is built (torchtitan style: the model file imports nothing distributed).

    sharded = apply_tensor_parallel(model, layout, sequence_parallel=True)   # {module name: TPLinear}
    specs = tp_layer_specs("te")       # the one place that picks local vs Transformer Engine layers

The plan's builder (``trainer/parallel/plan.py``) calls it; everything downstream reads the resulting roles from the
``ParallelPlan``. The linears that ``models.convert.tp_rule`` shards (the same rule the checkpoint converter uses)
become megatron-core layers that hold this TP rank's shard of the existing weights; fused outputs are sharded per
part (qkv rows are (3, heads, head_dim), so rank r keeps heads [r*h/tp, (r+1)*h/tp) of each of q, k and v). The
attention modules infer their local head count from the linear's output size, so they run unchanged. Parameter
names stay ``weight``/``bias``: the state-dict keys are the unsharded model's. Everything else (norms, embedders,
adaLN tables, final layer) is replicated across TP ranks.

Sequence parallelism is Megatron's: the linears are built with ``TransformerConfig.sequence_parallel``, so a
column-parallel linear all-gathers the sequence chunks of its input and a row-parallel one reduce-scatters its
output, both along dim 0 (``_TensorOnly`` feeds them sequence-first rows). The cross-attention ``kv_linear`` reads
the replicated text and is built without SP (``_OFF_SEQUENCE``). How the gradients follow: docs/parallelism.md.

LoRA adapters (``models.lora``, added before this step) move onto the new linear with the base's hook and keep this
rank's part (``_shard_adapter``: column B / row A sharded like the base, megatron's mapping on the rank-r
projection); ``key_tp_rule`` is the TP-independent rule of every key, adapters included. Frozen base weights stay
frozen.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from models import lora
from models.convert import shard_tensor, tp_rule
from trainer.device import Layout


@dataclass(frozen=True)
class TPLinear:
    """How one linear is sharded: ``kind`` "column" (output rows, ``parts`` fused blocks split per part) or "row"
    (input columns); ``sequence_parallel``: it gathers / reduce-scatters the token sequence."""
    kind: str
    parts: int = 1
    sequence_parallel: bool = False


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

    _seq_parallel = False   # set by apply_tensor_parallel: megatron gathers / reduce-scatters dim 0 (the sequence)

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


def apply_tensor_parallel(model: nn.Module, layout: Layout, *, sequence_parallel: bool = False,
                          backend: str = "local") -> Dict[str, TPLinear]:
    """Shard the rule's linears over ``layout.groups.tp`` in place; returns {module name: TPLinear} ({} with tp=1).

    Call it on the model already on its device. ``backend`` goes to ``tp_layer_specs``. ``sequence_parallel``: the
    linears (but ``_OFF_SEQUENCE``) gather / reduce-scatter the sequence; the model's ``seq_split`` hooks are set by
    ``context_parallel.set_sequence_parallel_hooks``. The layout (tp divides the heads) is validated at config load.
    """
    tp, rank, tp_group = layout.tp, layout.tp_rank, layout.groups.tp
    if tp == 1:
        return {}
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    targets = [(n, m) for n, m in model.named_modules() if _plan_for(n)]
    dit = getattr(model, "cfg", None)
    if not targets or dit is None:
        raise TypeError("apply_tensor_parallel: no linear matched the TP rule (blocks.{i}.attn.qkv, ...) or the "
                        "model has no .cfg; is this a MUGDiT?")
    configs = {sp: TransformerConfig(num_layers=dit.depth, hidden_size=dit.hidden_size,
                                     num_attention_heads=dit.num_heads, tensor_model_parallel_size=tp,
                                     use_cpu_initialization=True, perform_initialization=False,
                                     params_dtype=targets[0][1].weight.dtype, sequence_parallel=sp)
               for sp in {False, sequence_parallel}}
    specs = tp_layer_specs(backend)
    sharded: Dict[str, TPLinear] = {}
    for name, lin in targets:
        if type(lin) is not nn.Linear:
            raise TypeError(f"apply_tensor_parallel: {name} is {type(lin).__name__}, expected nn.Linear (already "
                            "parallelized?)")
        kind, parts = _plan_for(name)
        out_f, in_f = lin.weight.shape
        bias = lin.bias is not None
        sp = sequence_parallel and not name.endswith(_OFF_SEQUENCE)
        new = build_module(specs[kind], in_f, out_f, config=configs[sp], init_method=_no_init, bias=bias,
                           tp_group=tp_group)
        new.to(device=lin.weight.device, dtype=lin.weight.dtype)
        new._seq_parallel = sp
        with torch.no_grad():
            new.weight.copy_(shard_tensor(lin.weight.detach(), kind, parts, rank, tp))
            if bias:
                new.bias.copy_(shard_tensor(lin.bias.detach(), kind, parts, rank, tp))
        new.weight.requires_grad_(lin.weight.requires_grad)   # LoRA freezes the base weights
        if bias:
            new.bias.requires_grad_(lin.bias.requires_grad)
        adapter = getattr(lin, lora.ADAPTER, None)
        if adapter is not None:
            _shard_adapter(adapter, kind, parts, rank, tp, tp_group, sp)
            lora.attach(new, adapter)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        sharded[name] = TPLinear(kind, parts, sp)
    return sharded


def _shard_adapter(adapter: "lora.LoRA", kind: str, parts: int, rank: int, tp: int, tp_group, sp: bool) -> None:
    """Keep this TP rank's part of a LoRA adapter of a sharded linear, exact for any TP size; the collective on
    the rank-r projection u = A x (``adapter.mid``) is megatron's autograd-aware mapping that matches its base:

    - column-parallel base (output rows sharded): A [r, in] replicated, B keeps the base's output rows (per fused
      part). Without SP, ``copy_to_tensor_model_parallel_region`` (identity forward; backward all-reduces du over
      TP), so A and the input get their full gradients on every TP rank, as they do through the base's own input
      all-reduce. With SP (the input is this rank's token chunk, which the base all-gathers),
      ``gather_from_sequence_parallel_region`` on u (backward: reduce-scatter of du), so A's gradient is its chunk's
      share (role "sequence", summed over TP);
    - row-parallel base (input columns sharded): A keeps the base's input columns, B [out, r] replicated. The partial
      projections are summed with ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity
      backward), so B sees the full u and gets the full gradient on every rank; with SP (the base reduce-scatters
      its output to token chunks) with ``reduce_scatter_to_sequence_parallel_region`` (backward: all-gather), so B
      works on the chunk and its gradient is the chunk's share (role "sequence").
    The gradients that are TP-sharded (column B, row A) carry the base's role in the plan. Megatron's SP mappings
    act on dim 0: u goes in and out sequence-first, as ``_TensorOnly`` feeds the base."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    with torch.no_grad():
        if kind == "column":
            adapter.B = nn.Parameter(shard_tensor(adapter.B.detach(), "column", parts, rank, tp))
            mapping = functools.partial(gather_from_sequence_parallel_region, group=tp_group) if sp else \
                functools.partial(copy_to_tensor_model_parallel_region, group=tp_group)
        else:
            adapter.A = nn.Parameter(shard_tensor(adapter.A.detach(), "row", 1, rank, tp))
            mapping = functools.partial(reduce_scatter_to_sequence_parallel_region, group=tp_group) if sp else \
                functools.partial(reduce_from_tensor_model_parallel_region, group=tp_group)
    adapter.mid = functools.partial(_sequence_first, mapping) if sp else mapping


def _sequence_first(mapping, u_BLR: torch.Tensor) -> torch.Tensor:
    """Apply a megatron sequence-parallel mapping (dim 0) to [B, L, r] tokens."""
    return mapping(u_BLR.transpose(0, 1).contiguous()).transpose(0, 1)


def key_tp_rule(key: str) -> Tuple[str | None, int]:
    """(rule, fused parts) of a state-dict key, whatever the TP size (``models.convert.tp_rule``), LoRA adapters
    included: a column-parallel linear's B is split like its weight's rows and its A replicated; a row-parallel
    linear's A is split like its weight's columns and its B replicated."""
    parsed = lora.adapter_of(key)
    if parsed is None:
        return tp_rule(key)
    rule, parts = tp_rule(f"{parsed[0]}.weight")
    if (rule, parsed[1]) == ("column", "B"):
        return "column", parts
    if (rule, parsed[1]) == ("row", "A"):
        return "row", 1
    return None, 1
