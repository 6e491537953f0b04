"""The DiT's fast path: regional compilation, every MUGDiT block compiled on its own; the eager model is the reference.

    from models.dit import tiny
    from models.compile import compile_blocks, apply
    model = tiny()
    compile_blocks(model)                  # in place: each block's forward goes through torch.compile (returns 2)
    v = model(x, t, text, mask)            # first call per token count compiles (seconds to a minute), then fast
    apply(model, stage.compile)            # the trainer's hook: "none" leaves the model eager, "blocks" as above

Why per block (torch's "regional compilation" recipe): the blocks are identical, so one compiled graph serves all of
them (parameters are graph inputs; compile time does not grow with the depth), and everything around the blocks —
conditioning, embedding, head, the context/sequence-parallel hooks, the pipeline schedule — stays eager. Each block
is compiled with ``dynamic=False`` (one graph per token count L and pad: a new bucket shape compiles once more; past
``torch._dynamo.config.recompile_limit`` shapes, which ``compile_blocks`` raises to ``RECOMPILE_LIMIT``, dynamo runs
the block eagerly with a warning) and ``fullgraph=True`` (a graph break is an error, not a silent slow path). Only
``block.forward`` is replaced: the module tree, parameter names and state-dict keys are unchanged, so checkpoints,
EMA, LoRA and the optimizer see the same model.

What composes (tests/test_compile.py, CPU, one process): activation recomputation (``trainer.parallel.recompute``
wraps ``block.forward`` in ``checkpoint``; compile after it and dynamo traces the checkpoint as one region), LoRA
adapters (forward hooks on the linears), autocast, and a pipeline stage's blocks (``_AbsentBlock`` placeholders of
other stages are skipped). Refused (``check_compilable``): blocks holding collectives, i.e. tensor-parallel linears
(megatron-core / Transformer Engine modules) and context parallelism's ``kv_gather``, which were not traced here.

Numerics: inductor fuses the elementwise work (modulation, LayerNorm, RMSNorm, RoPE, GELU) and reorders fp32
arithmetic, so outputs and gradients equal eager within rounding (fp32: tests/test_compile.py's tolerances), not
bitwise. Measured speed: bench/README.md (``bench/dit_step.py`` prints eager / compiled ``speedup``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

from torch import nn

from models.dit import MUGDiTBlock, _identity

COMPILE_MODES = ("none", "blocks")   # StageConfig.compile: eager, or every DiT block compiled (compile_blocks)
# graphs per compiled block function before dynamo gives up and runs it eagerly: one per (token count, pad) a stage
# meets. torch's default (8) is easily passed by a bucketed curriculum stage (resolutions x aspect buckets x
# lengths, images included); each graph compiles once (tens of seconds on CPU, cached on disk by inductor)
RECOMPILE_LIMIT = 64
_COLLECTIVE_MODULES = ("megatron", "transformer_engine")   # packages whose layers run TP collectives in forward


def check_compilable(model: nn.Module) -> None:
    """Raise if a block holds a collective that ``compile_blocks`` was not checked with (TP linears, CP's
    kv_gather); the message says the fix."""
    for i, block in enumerate(getattr(model, "blocks", ())):
        if not isinstance(block, MUGDiTBlock):
            continue
        if block.attn.kv_gather is not _identity:
            raise ValueError(f"compile 'blocks': blocks.{i}.attn.kv_gather is context parallelism's all-gather, which "
                             "is not traced under torch.compile here: set stage.context_parallel=1, or compile 'none'")
        for name, mod in block.named_modules():
            if type(mod).__module__.split(".")[0] in _COLLECTIVE_MODULES:
                raise ValueError(f"compile 'blocks': blocks.{i}.{name} is a {type(mod).__module__}."
                                 f"{type(mod).__name__} (tensor parallelism), whose collectives are not traced under "
                                 "torch.compile here: set stage.tensor_parallel=1, or compile 'none'")


def _run_block(block: nn.Module, *args, **kwargs):
    """What a compiled block runs: its forward as it was before compiling (the bound method, or recomputation's
    ``checkpoint`` wrapper, which dynamo traces as one activation-checkpoint region)."""
    return block._eager_forward(*args, **kwargs)


def _outside_function_modes(fn):
    """``fn`` called with the torch-function-mode stack empty (restored after). Dynamo cannot trace through a
    process-wide ``TorchFunctionMode`` such as the trainer's CPU shim for megatron (``trainer.device``'s
    ``install_heavy_cpu_shim``: it redirects ``device="cuda"``, which no block uses); the backward runs outside."""
    import torch

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not torch._C._len_torch_function_stack():
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as modes:
            while torch._C._len_torch_function_stack():
                modes.enter_context(torch.overrides._pop_mode_temporarily())
            return fn(*args, **kwargs)
    return call


def compile_blocks(model: nn.Module, mode: Optional[str] = None, fullgraph: bool = True,
                   backend: str = "inductor") -> int:
    """Compile every MUGDiTBlock of ``model.blocks`` in place (dynamic=False) and return how many were compiled now;
    idempotent (compiled blocks and other stages' placeholders are skipped).

    mode: torch.compile's (None = "default"; "max-autotune-no-cudagraphs" autotunes GEMMs, at a longer compile).
    CUDA graphs are left out on purpose: the blocks' inputs change every step.
    backend: torch.compile's; "aot_eager" traces (dynamo + AOT autograd, graph breaks found) without generating
    kernels, in seconds: for checking that a wrapper composes, not for speed.

    Each block's ``forward`` becomes ``partial(compiled _run_block, block)``; ``block._eager_forward`` keeps the eager
    one. One compiled function serves every block, so dynamo compiles one graph for all of them (per shape), and the
    frame it starts from is this file's ``_run_block``: that is what lets it see recomputation's ``checkpoint`` call
    (``nn.Module.compile`` would start inside it, where dynamo is disabled, and compile nothing). Call it after
    ``trainer.parallel.parallelize`` (recomputation must already wrap ``block.forward``) and before the first forward;
    the optimizer may be built before or after (parameters are untouched).
    """
    import torch

    if getattr(model, "blocks", None) is None:
        raise TypeError("compile_blocks: the model has no .blocks; is this a MUGDiT?")
    check_compilable(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = _outside_function_modes(torch.compile(_run_block, dynamic=False, fullgraph=fullgraph, mode=mode,
                                                     backend=backend))
    n = 0
    for block in model.blocks:
        if not isinstance(block, MUGDiTBlock) or hasattr(block, "_eager_forward"):
            continue
        block._eager_forward = block.forward
        block.forward = functools.partial(compiled, block)
        n += 1
    return n


def is_compiled(block: nn.Module) -> bool:
    """Whether ``compile_blocks`` compiled this block."""
    return hasattr(block, "_eager_forward")


def apply(model: nn.Module, compile_mode: str) -> int:
    """The trainer's hook for ``stage.compile``: "none" -> 0 (eager), "blocks" -> ``compile_blocks(model)``."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile_mode!r}")
    return compile_blocks(model) if compile_mode == "blocks" else 0
