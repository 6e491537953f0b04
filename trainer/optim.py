"""Optimisers, the learning-rate schedule and the EMA of one training stage.

    opt, ddp = build_optimizer(stage, dit, model, plan)   # torch AdamW (ddp None), or megatron DDP + distributed opt.
    lr = lr_at(step, stage.lr, stage.warmup_steps, stage.lr_schedule, stage.min_lr, stage.steps)
    ema_update(ema, model, EMA_DECAY)

Precision: parameters, gradients and the Adam state are fp32 (the master weights; on GPU the forward runs under bf16
autocast, on bf16 copies of the weights with ``stage.bf16_weights``: ``trainer.precision``).
``stage.distributed_optimizer``: megatron DDP (contiguous fp32 grad buffer, reduce-scatter over DP x CP) +
``DistributedOptimizer`` (Adam state sharded over DP; torch AdamW inside when Apex/TE are absent), clipping inside
``opt.step()``; its weight decay skips biases and 1-D parameters (megatron's default; torch AdamW here applies it to
all; the default weight_decay is 0). With ``bf16_params`` (``stage.bf16_weights`` on) the trainable parameters are
bf16 and the optimizer is megatron's bf16 one: fp32 main params sharded over DP, copied into the bf16 parameters
after each step (``trainer.precision.MegatronMasters``); the gradient buffer and its reduce stay fp32.

Kernels (``stage.optimizer_impl``): torch AdamW's ``fused`` (one kernel for all parameters; CUDA's default here),
``foreach`` (a few multi-tensor ops per step; the CPU default) or ``for_loop`` (a Python loop over the parameters,
torch's own CPU default). All three are bitwise equal on CPU (tests/test_trainer.py); megatron's optimizer gets the
same switch on the torch AdamW inside it.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from common.config import StageConfig
from models.config import DiTConfig

EMA_DECAY = 0.999                  # tiny runs are a few hundred steps; MUG-V's flag value is 0.9999 (docs/mugv.md §4.6)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-10   # MUG-V's released fine-tune settings (docs/mugv.md §5.2)


def build_optimizer(stage: StageConfig, dit: DiTConfig, model: torch.nn.Module,
                    plan, bf16_params: bool = False) -> Tuple[Any, Optional[Any]]:
    """(optimizer, megatron DDP wrapper or None) for the model's trainable parameters. ``bf16_params`` (with
    ``stage.distributed_optimizer`` only): the trainable parameters become bf16, the optimizer keeps their fp32
    values as its main params (not their bf16 roundings: ``MegatronMasters.load``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    impl = adam_impl(stage.optimizer_impl, params[0].device if params else torch.device("cpu"))
    if not stage.distributed_optimizer:
        if bf16_params:
            raise ValueError("build_optimizer: bf16_params needs stage.distributed_optimizer (the torch AdamW path "
                             "keeps fp32 parameters and bf16 copies: trainer.precision.Bf16Weights)")
        opt = torch.optim.AdamW(params, lr=stage.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=stage.weight_decay,
                                **adam_kernel_flags(impl))
        return opt, None
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from trainer.precision import DTYPE, MegatronMasters, cast_trainable

    fp32 = cast_trainable(model) if bf16_params else {}
    dtype = DTYPE if bf16_params else torch.float32

    cfg = TransformerConfig(num_layers=1, hidden_size=dit.hidden_size, num_attention_heads=dit.num_heads,
                            tensor_model_parallel_size=plan.layout.tp, use_cpu_initialization=True)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True,
        overlap_grad_reduce=stage.overlap_grad_reduce and plan.layout.pp == 1,   # PP: see grads.sync_main_grads
        overlap_param_gather=False), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=stage.lr, min_lr=stage.min_lr, weight_decay=stage.weight_decay,
        adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_eps=ADAM_EPS, clip_grad=stage.grad_clip,
        use_distributed_optimizer=True, bf16=bf16_params, fp16=False, params_dtype=dtype), [ddp])
    for inner in inner_optimizers(opt):   # the torch AdamW megatron falls back to without Apex/TE
        if isinstance(getattr(inner, "optimizer", None), torch.optim.AdamW):
            for group in inner.optimizer.param_groups:
                group.update(adam_kernel_flags(impl))
    if bf16_params:
        masters = MegatronMasters.of(opt, model)
        if masters is None:
            raise RuntimeError("build_optimizer: megatron's optimizer was built with bf16=True but keeps no fp32 "
                               "main params (check the installed megatron-core's get_megatron_optimizer)")
        masters.load(fp32)   # megatron made its masters from the bf16 parameters: the fp32 init instead
    return opt, ddp


def adam_impl(name: str, on: torch.device) -> str:
    """The AdamW kernel ``stage.optimizer_impl`` names: "auto" is "fused" on CUDA and "foreach" elsewhere."""
    if name == "auto":
        return "fused" if on.type == "cuda" else "foreach"
    return name


def adam_kernel_flags(impl: str) -> Dict[str, bool]:
    """torch AdamW's keyword flags for a kernel choice ("fused", "foreach", "for_loop")."""
    if impl not in ("fused", "foreach", "for_loop"):
        raise ValueError(f"optimizer_impl must be 'auto', 'fused', 'foreach' or 'for_loop', got {impl!r}")
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def inner_optimizers(opt) -> List[Any]:
    """The megatron optimizers inside a (possibly chained) megatron optimizer."""
    return list(getattr(opt, "chained_optimizers", [opt]))


def set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def lr_at(step: int, base_lr: float, warmup_steps: int, schedule: str = "constant", min_lr: float = 0.0,
          total_steps: int = 0) -> float:
    """The LR of 0-based ``step``: linear warmup over ``warmup_steps``, then ``schedule`` from ``base_lr`` down to
    ``min_lr`` at the last step (``total_steps - 1``): "constant" (MUG-V fine-tune: min-lr = lr), "cosine", "linear".
    A pure function of the step, so a resumed run uses the same LRs."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if schedule == "constant" or decay_steps <= 0:
        return base_lr
    frac = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return base_lr + (min_lr - base_lr) * frac
    raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")


@torch.no_grad()
def ema_update(ema: Dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every state-dict entry the EMA holds (all of them, or the
    LoRA adapters: the frozen base's EMA is the base); non-float entries copied."""
    sd = model.state_dict()
    for k, e in ema.items():
        v = sd[k]
        if v.is_floating_point():
            e.lerp_(v, 1.0 - decay)
        else:
            e.copy_(v)
