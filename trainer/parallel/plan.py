"""The parallel plan: who holds which part of the model, built once when the model is parallelised.

    layout = device.init_distributed(tp=2, seed=0, cp=1, pp=1)
    plan = parallelize(MUGDiT(cfg), layout, sequence_parallel=True, recompute=False)   # applies everything in place
    plan.role("blocks.0.attn.qkv.weight")    # ParamRole(tp='column', parts=3, tp_partial='', pp_replicated=False)
    sync_gradients(plan, model); clip_grad_norm(plan, model, 1.0)          # trainer.parallel.grads

``parallelize`` applies, in this order, LoRA adapters when asked (``models/lora.py``, on the unsharded model),
tensor parallelism with Megatron sequence parallelism
(``tensor_parallel.py``), the sequence-parallel and context-parallel token splits (``context_parallel.py``),
activation recomputation (``recompute.py``) and the pipeline stage (``pipeline.py``), and returns a
``ParallelPlan``: the layout with its process groups, the role of every state-dict key of this rank's part of the
model, the sharded linears and the pipeline stage's block range. Gradient sync, grad-norm clipping, metrics,
checkpoint state and the train step take the plan as an argument; nothing reads tags on parameters or Megatron's
``parallel_state`` (``trainer/device.py`` builds the groups). The one attribute set on parameters is Megatron's own
``shared`` flag (a conditioning embedder duplicated on a later pipeline stage), which Megatron's optimizer reads to
count it once in the grad norm. The layout itself (TP divides the heads, PP the depth) is validated at config load
(``common.config.check_stage_layout``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

from torch import nn

from models.lora import ADAPTER, apply_lora
from trainer.device import Layout
from trainer.parallel.context_parallel import apply_context_parallel, set_sequence_parallel_hooks
from trainer.parallel.pipeline import PP_REPLICATED, apply_pipeline_parallel
from trainer.parallel.recompute import apply_activation_checkpointing
from trainer.parallel.tensor_parallel import TPLinear, apply_tensor_parallel, key_tp_rule


@dataclass(frozen=True)
class ParamRole:
    """How one state-dict entry is held across the parallel groups.

    ``tp``: "column" / "row" when this rank holds a TP shard of it (``parts`` fused blocks split per part), "" when
    every TP rank holds all of it. ``tp_partial``: its gradient is this TP rank's partial sum and is summed over TP:
    "heads" (per-head QK-norm weights see only the local heads) or "sequence" (with sequence parallelism, a
    replicated parameter used on this rank's token chunk). ``pp_replicated``: every pipeline stage holds it (the
    conditioning embedders); its gradient is summed over PP.
    """
    tp: str = ""
    parts: int = 1
    tp_partial: str = ""
    pp_replicated: bool = False


REPLICATED = ParamRole()


@dataclass
class ParallelPlan:
    layout: Layout
    roles: Dict[str, ParamRole] = field(default_factory=dict)        # state-dict key -> role (this rank's keys)
    tp_linears: Dict[str, TPLinear] = field(default_factory=dict)    # module name -> how it is sharded
    block_range: Tuple[int, int] = (0, 0)                            # this pipeline stage's blocks [start, end)
    absent: Tuple[str, ...] = ()                                     # key prefixes held by other pipeline stages
    sequence_parallel: bool = False
    recompute: bool = False
    lora_rank: int = 0                                               # > 0: LoRA adapters (models/lora.py), base frozen
    lora_alpha: float = 0.0

    @staticmethod
    def single(layout: Layout | None = None) -> "ParallelPlan":
        """No parallelism (one process; offline tools such as the export from ``dist/``)."""
        return ParallelPlan(layout or Layout.single())

    def role(self, key: str) -> ParamRole:
        return self.roles.get(key, REPLICATED)

    @property
    def first_stage(self) -> bool:
        return self.layout.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.layout.pp_rank == self.layout.pp - 1

    def on_other_stage(self, key: str) -> bool:
        """Whether state-dict ``key`` lives on another pipeline stage."""
        return any(key == a or key.startswith(a) for a in self.absent)

    def summary(self) -> str:
        """The layout for log lines: ``tp=2 cp=1 pp=1 dp=2 sp=on``."""
        lo = self.layout
        return f"tp={lo.tp} cp={lo.cp} pp={lo.pp} dp={lo.dp} sp={'on' if self.sequence_parallel else 'off'}"


def parallelize(model: nn.Module, layout: Layout, *, sequence_parallel: bool = False, recompute: bool = False,
                backend: str = "local", lora_rank: int = 0, lora_alpha: float = 32.0) -> ParallelPlan:
    """Apply this rank's part of the layout to a MUGDiT in place (the module docstring says what, in which order)
    and return its plan. ``sequence_parallel`` only acts with tp > 1; ``backend``: ``tp_layer_specs``'s;
    ``lora_rank`` > 0 first adds LoRA adapters to the unsharded model (``models.lora.apply_lora``: A drawn from the
    global CPU generator, the same for every TP size; everything else frozen), which the TP linears then shard."""
    sp = sequence_parallel and layout.tp > 1
    if sp and not (hasattr(model, "seq_split") and hasattr(model, "token_multiple")):
        raise TypeError("parallelize: sequence_parallel needs the model's seq_split/seq_gather hooks and "
                        "token_multiple (MUGDiT)")
    # 0. LoRA adapters on the unsharded linears
    if lora_rank > 0:
        apply_lora(model, lora_rank, lora_alpha)
    # 1. tensor (+ sequence) parallel linears
    tp_linears = apply_tensor_parallel(model, layout, sequence_parallel=sp, backend=backend)
    tp_roles = _tensor_parallel_roles(model, tp_linears, sp)
    # 2. token splits: SP chunks over TP, CP chunks over CP (MUGDiT's hooks)
    if sp:
        set_sequence_parallel_hooks(model, layout.groups.tp, layout.tp_rank, layout.tp)
    apply_context_parallel(model, layout.groups.cp, layout.cp_rank, layout.cp)
    # 3. activation recomputation
    if recompute:
        apply_activation_checkpointing(model)
    # 4. the pipeline stage's part
    block_range, absent = apply_pipeline_parallel(model, layout.pp, layout.pp_rank)
    roles = {}
    for key in model.state_dict():
        role = tp_roles.get(key, REPLICATED)
        if layout.pp > 1 and key.startswith(PP_REPLICATED):
            role = ParamRole(role.tp, role.parts, role.tp_partial, pp_replicated=True)
        if role != REPLICATED:
            roles[key] = role
    for name, p in model.named_parameters():   # megatron's flag: counted once in its optimizer's grad norm
        if roles.get(name, REPLICATED).pp_replicated:
            p.shared = layout.pp_rank > 0
    return ParallelPlan(layout, roles, tp_linears, block_range, absent, sp, recompute, lora_rank,
                        lora_alpha if lora_rank > 0 else 0.0)


def _tensor_parallel_roles(model: nn.Module, tp_linears: Dict[str, TPLinear], sp: bool) -> Dict[str, ParamRole]:
    """Roles from TP and SP, keyed by parameter name: the sharded linears' weights (and column biases) and the
    sharded halves of their LoRA adapters (column B, row A; tensor_parallel.key_tp_rule); the other parameters of
    the modules that hold them (per-head QK norms) are partial over TP ("heads"); with sequence
    parallelism, every other parameter of the blocks and the final layer is used on a token chunk ("sequence"),
    the replicated adapter halves of the sequence-parallel linears included (column A, row B)."""
    roles: Dict[str, ParamRole] = {}
    for name, lin in tp_linears.items():
        roles[f"{name}.weight"] = ParamRole(lin.kind, lin.parts)
        if lin.kind == "column" and getattr(model.get_submodule(name), "bias", None) is not None:
            roles[f"{name}.bias"] = ParamRole(lin.kind, lin.parts)
        adapted = hasattr(model.get_submodule(name), ADAPTER)
        for leaf in ("A", "B") if adapted else ():   # LoRA: column B / row A sharded like the base
            key = f"{name}.{ADAPTER}.{leaf}"
            rule, parts = key_tp_rule(key)
            if rule:
                roles[key] = ParamRole(rule, parts)
            elif not lin.sequence_parallel:   # replicated, full gradient (off the sequence, e.g. the cross-attention
                roles[key] = REPLICATED       # K/V on the text: kept out of the "sequence" partials below)
    for parent in sorted({n.rpartition(".")[0] for n in tp_linears}):
        inside = tuple(f"{n}." for n in tp_linears)
        for pname, _ in model.get_submodule(parent).named_parameters():
            full = f"{parent}.{pname}"
            if not full.startswith(inside):
                roles[full] = ParamRole(tp_partial="heads")
    if sp:
        for prefix in ("blocks.", "final_layer."):
            for name, _ in model.named_parameters():
                if name.startswith(prefix) and name not in roles:
                    roles[name] = ParamRole(tp_partial="sequence")
    return roles
