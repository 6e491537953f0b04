"""bf16 weights for the forward, fp32 master weights for everything else (``stage.bf16_weights``).

Two versions, one per optimizer path. The torch-AdamW path (``Bf16Weights``) keeps the fp32 parameters and swaps in
bf16 copies around the step's forwards and backwards. The distributed-optimizer path (``MegatronMasters``) is
Megatron's own: the trainable parameters *are* bf16 (``cast_trainable``, before megatron DDP wraps them), megatron DDP
sums their gradients into its fp32 buffer, and ``DistributedOptimizer(bf16=True)`` keeps fp32 main params, sharded
over DP, and copies them back into the bf16 parameters after each step.

Torch-AdamW path:

    bf16 = Bf16Weights(model)          # after the weights are restored; before any OverlappedGradReduce (hook order)
    bf16.begin()                       # each step, after zero_grad: the parameters hold their bf16 copies
    ... forward under bf16 autocast, backward of every micro-batch (gradients summed in fp32, ``grads``)
    bf16.end()                         # the parameters hold their fp32 masters again, ``param.grad`` the fp32 sums
    sync, clip, opt.step()             # unchanged: fp32 gradients, fp32 AdamW over the fp32 masters
    bf16.refresh()                     # the bf16 copies <- the updated masters (one cast per step)

Why: under bf16 autocast every fp32 weight is cast to bf16 by every forward that uses it (each micro-batch, and
again in the recomputed forward with ``recompute``), and that cast reads 4 and writes 2 bytes per parameter each
time. Here it happens once per optimizer step. Megatron's ``Float16Module`` + ``DistributedOptimizer(bf16=True)`` do
the same; this is the torch-AdamW path's version. The parameter objects stay the same (their ``.data`` is swapped
between the two copies), so the optimizer, the EMA, the checkpoints and the gradient collectives keep seeing fp32
tensors outside ``begin``/``end``. Each micro-batch's bf16 gradient is added into an fp32 sum by a
post-accumulate-grad hook (megatron's ``main_grad``), so gradient accumulation does not round to bf16.

Distributed-optimizer path::

    fp32 = cast_trainable(model)                    # before megatron DDP: the trainable parameters become bf16
    ... DDP, get_megatron_optimizer(OptimizerConfig(bf16=True, params_dtype=torch.bfloat16, ...))
    masters = MegatronMasters.of(opt, model)        # None unless opt keeps fp32 main params
    masters.load(fp32)                              # the fp32 values, not their bf16 roundings, are the masters
    with masters.loading(model) as sd: load into sd  # checkpoint loads land in fp32, then in masters and bf16 params
    masters.ema_update(ema, model, decay)           # the EMA of the fp32 masters (this rank's shard of them)
    sd = masters.local_state_dict(model)            # collective over DP: the fp32 masters, unsharded over DP

Nothing saved is bf16: the full ``model``/``ema.safetensors``, ``dist/``'s "model."/"ema." and every export hold
the fp32 masters and their EMA; ``dist/``'s optimizer state holds the sharded fp32 main params. Each rank updates
the EMA of only its own shard of the masters (the others' slices of its EMA go stale) and ``gather`` collects the
owners' slices before a save, so the EMA needs no per-step communication.

Numerics: the forward differs from plain autocast where a parameter meets an activation outside autocast's op
lists (e.g. ``x * (1 + scale_table)``: bf16 instead of fp32 arithmetic). Which stages use it: ``trainer.train``
(on where the forward runs under bf16 autocast, i.e. CUDA, with pipeline_parallel 1).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

DTYPE = torch.bfloat16
GATHER_CHUNK = 64 * 2**20   # elements per DP gather of the masters at a save (256 MiB of int32): bounds the transient
                            # memory on a 10B model while keeping the all_reduces few


class Bf16Weights:
    """The bf16 forward copies of ``model``'s floating-point parameters and the fp32 sums of their gradients
    (module docstring). Frozen parameters get a bf16 copy too (never refreshed: their masters do not change)."""

    def __init__(self, model: nn.Module):
        self.params: List[nn.Parameter] = [p for p in model.parameters() if p.is_floating_point()]
        self.trainable = [p for p in self.params if p.requires_grad]
        with torch.no_grad():
            self.masters: Dict[nn.Parameter, torch.Tensor] = {p: p.data for p in self.params}
            self.copies: Dict[nn.Parameter, torch.Tensor] = {p: p.data.to(DTYPE) for p in self.params}
        self.grads: Dict[torch.Tensor, torch.Tensor] = {}   # fp32 gradient sums of this step
        self.active = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate) for p in self.trainable]

    def _accumulate(self, p: torch.Tensor) -> None:
        assert p.grad is not None
        if p in self.grads:
            self.grads[p].add_(p.grad)
        else:
            self.grads[p] = p.grad.float()
        p.grad = None

    def grad_or_zero(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 gradient sum of ``p`` this step (zeros if it got none): ``OverlappedGradReduce``'s source."""
        if p not in self.grads:
            self.grads[p] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return self.grads[p]

    def begin(self) -> None:
        """Before the step's forwards: the parameters hold their bf16 copies (their gradients must be None)."""
        if any(p.grad is not None for p in self.trainable):
            raise RuntimeError("Bf16Weights.begin: zero the gradients with set_to_none=True first")
        self.grads = {}
        for p in self.params:
            p.data = self.copies[p]
        self.active = True

    def end(self) -> None:
        """After the step's backwards: the parameters hold their fp32 masters and ``param.grad`` the fp32 sums
        (zeros for a parameter that got no gradient, as ``sync_gradients`` would make it)."""
        for p in self.params:
            p.data = self.masters[p]
        for p in self.trainable:
            p.grad = self.grad_or_zero(p)
        self.active = False

    @torch.no_grad()
    def refresh(self) -> None:
        """After the optimizer step: the bf16 copies of the trainable parameters <- their updated masters."""
        if self.trainable:
            torch._foreach_copy_([self.copies[p] for p in self.trainable], [self.masters[p] for p in self.trainable])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def bf16_weights_on(setting: str, autocast_dtype: torch.dtype, pipeline_parallel: int) -> bool:
    """Whether a stage keeps bf16 weights: ``setting`` "on"/"off", or "auto": where the forward runs under bf16
    autocast (``trainer.device``: CUDA) and without pipeline parallelism (its stages exchange fp32 activations)."""
    if setting == "auto":
        return autocast_dtype == DTYPE and pipeline_parallel == 1
    return setting == "on"


def cast_trainable(model: nn.Module) -> Dict[nn.Parameter, torch.Tensor]:
    """Make ``model``'s trainable floating-point parameters bf16 (frozen ones and buffers stay fp32: nothing updates
    them, so they keep full precision for free); returns {parameter: its fp32 values} for ``MegatronMasters.load``.
    Call before megatron DDP wraps the model (it lays out its parameter buffer by dtype)."""
    fp32 = {}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != DTYPE:
                fp32[p] = p.data
                p.data = p.data.to(DTYPE)
    return fp32


class MegatronMasters:
    """The fp32 main params of megatron's ``DistributedOptimizer(bf16=True)`` by model parameter: each DP (x CP)
    rank owns the slice ``[start, end)`` of every flattened parameter that its optimizer shard covers (module
    docstring). Read live from the optimizer (its main-param tensors are updated in place, also by a load)."""

    def __init__(self, opt: Any, model: nn.Module):
        owned: Dict[nn.Parameter, Tuple[int, int, torch.Tensor]] = {}
        self.group = None
        for inner in getattr(opt, "chained_optimizers", [opt]):
            self.group = inner.data_parallel_group
            for models, mains in ((inner.model_float16_groups, inner.shard_fp32_from_float16_groups),
                                  (inner.model_fp32_groups, inner.shard_fp32_groups)):
                for model_group, main_group in zip(models, mains):
                    for p, main in zip(model_group, main_group):
                        r = inner._get_model_param_range_map(p)["param"]
                        owned[p] = (r.start, r.end, main)
        # every trainable parameter in the model's order (the same on every rank: ``gather``'s layout); a rank
        # owns no slice of some (megatron lists only those it owns) and an empty one of them
        empty = torch.empty(0, dtype=torch.float32)
        self.entries: List[Tuple[str, nn.Parameter, int, int, torch.Tensor]] = [
            (n, p, *owned.get(p, (0, 0, empty))) for n, p in model.named_parameters() if p.requires_grad]

    @classmethod
    def of(cls, opt: Any, model: nn.Module) -> Optional["MegatronMasters"]:
        """The masters of a megatron optimizer built with bf16=True; None for any other optimizer."""
        inner = getattr(opt, "chained_optimizers", [opt])
        if not inner or not all(getattr(getattr(o, "config", None), "bf16", False) for o in inner):
            return None
        return cls(opt, model)

    @torch.no_grad()
    def load(self, values: Dict[Any, torch.Tensor]) -> None:
        """Masters and bf16 parameters <- fp32 ``values`` (keyed by parameter or by name; each rank needs the
        whole local parameter): the own slice to the master, the bf16 rounding to the parameter (the same rounding
        megatron's main -> model copy makes, so the parameters are what a step would leave)."""
        for name, p, start, end, main in self.entries:
            v = values[p] if p in values else values[name]
            main.copy_(v.reshape(-1)[start:end])
            p.data.copy_(v)

    @contextlib.contextmanager
    def loading(self, model: nn.Module) -> Iterator[Dict[str, torch.Tensor]]:
        """Yields ``model.state_dict()`` with the fp32 masters in place of the bf16 parameters (``local_state_dict``,
        collective over DP), for a checkpoint load to write; on exit its values become the masters and (rounded) the
        parameters (``load``): an entry the load does not write (LoRA adapters, which start fresh) keeps its fp32
        master, not its bf16 rounding. The parameters' own dtype never changes: that would reset their autograd
        accumulators and with them megatron DDP's hooks."""
        sd = self.local_state_dict(model)
        yield sd
        self.load(sd)

    @torch.no_grad()
    def ema_update(self, ema: Dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * masters on this rank's slice of each trainable parameter (the other
        slices are the other ranks' and are collected by ``gather`` at a save); other entries from the model."""
        mastered = set()
        for name, _, start, end, main in self.entries:
            if name in ema:
                ema[name].view(-1)[start:end].lerp_(main, 1.0 - decay)
                mastered.add(name)
        sd = model.state_dict()
        for k, e in ema.items():
            if k not in mastered:
                e.lerp_(sd[k], 1.0 - decay) if e.is_floating_point() else e.copy_(sd[k])

    @torch.no_grad()
    def gather(self, values: Dict[str, torch.Tensor]) -> None:
        """In place, collective over the optimizer's DP group: each trainable entry of ``values`` (fp32, local
        shape) gets every slice from the rank that owns it. Bitwise: the fp32 bits travel as int32 in an all_reduce
        sum to which only the owner adds non-zeros (a float sum would turn an owner's -0.0 into +0.0)."""
        import torch.distributed as dist

        todo = [e for e in self.entries if e[0] in values]
        if self.group is None or dist.get_world_size(self.group) == 1:
            return
        while todo:
            chunk: List[Tuple[str, nn.Parameter, int, int, torch.Tensor]] = []
            n = 0
            while todo and (not chunk or n + todo[0][1].numel() <= GATHER_CHUNK):
                chunk.append(todo.pop(0))
                n += chunk[-1][1].numel()
            device = values[chunk[0][0]].device
            bits = torch.zeros(n, dtype=torch.int32, device=device)
            offset = 0
            for name, p, start, end, _ in chunk:
                v = values[name]
                if v.dtype != torch.float32:
                    raise TypeError(f"MegatronMasters.gather: {name} is {v.dtype}, expected float32 (the masters)")
                bits[offset + start:offset + end] = v.reshape(-1)[start:end].view(torch.int32)
                offset += p.numel()
            dist.all_reduce(bits, group=self.group)
            offset = 0
            for name, p, *_ in chunk:
                values[name].view(-1).copy_(bits[offset:offset + p.numel()].view(torch.float32))
                offset += p.numel()

    def local_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """``model.state_dict()`` with every trainable parameter replaced by its fp32 master, whole on every rank
        (collective over DP: ``gather``)."""
        sd = dict(model.state_dict())
        for name, p, start, end, main in self.entries:
            t = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            t.view(-1)[start:end] = main
            sd[name] = t
        self.gather(sd)
        return sd
