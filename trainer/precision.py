"""bf16 weights for the forward, fp32 master weights for everything else (``stage.bf16_weights``).

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

Numerics: the forward differs from plain autocast where a parameter meets an activation outside autocast's op
lists (e.g. ``x * (1 + scale_table)``: bf16 instead of fp32 arithmetic). Which stages use it: ``trainer.train``
(on where the forward runs under bf16 autocast, i.e. CUDA, with the torch AdamW and pipeline_parallel 1).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

DTYPE = torch.bfloat16


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


def bf16_weights_on(setting: str, autocast_dtype: torch.dtype, distributed_optimizer: bool,
                    pipeline_parallel: int) -> bool:
    """Whether a stage keeps bf16 weights: ``setting`` "on"/"off", or "auto": where the forward runs under bf16
    autocast (``trainer.device``: CUDA) with the torch AdamW and no pipeline parallelism."""
    if setting == "auto":
        return autocast_dtype == DTYPE and not distributed_optimizer and pipeline_parallel == 1
    return setting == "on"
