"""The DiT's fast path (models/compile.py): compiled blocks equal eager within tolerance (loss, output, every
gradient), compose with recomputation, LoRA and a pipeline stage's blocks, refuse the collectives they were not
checked with; StageConfig.compile's check.

Cost: one inductor compile of the tiny block, forward and backward (tens of seconds cold on 2 loaded cores, a few
with inductor's on-disk cache); the composition tests trace with backend "aot_eager" (dynamo + AOT autograd, no
kernels generated, fullgraph: a graph break fails them), which is what a wrapper can break.
"""
import copy

import pytest
import torch
from torch import nn

from common.config import StageConfig
from models.compile import RECOMPILE_LIMIT, apply, check_compilable, compile_blocks, is_compiled
from models.dit import tiny
from models.lora import adapters, adapters_off, apply_lora
from trainer.parallel.pipeline import apply_pipeline_parallel
from trainer.parallel.recompute import apply_activation_checkpointing

# fp32 compiled vs eager: inductor fuses and reorders the elementwise work, so rounding differs. Measured on the
# tiny model: |d out| 7e-7 of a max |out| 2.6, gradients 7e-7 relative (L2 per parameter); the bounds leave ~15x.
RTOL = 1e-5
GRAD_REL = 1e-5


def model_and_inputs():
    torch.manual_seed(0)
    model = tiny(depth=2, caption_channels=32, max_text_len=8)
    model.token_multiple = 4        # L = 4*4*2 + 2 = 34 -> 2 pad tokens: the pad-key drop is inside the graph
    model.y_embedder.dropout_prob = 0.0   # CFG drop draws random numbers per forward (the trainer passes force_drop)
    with torch.no_grad():           # open the AdaLN-Zero gates and zero projections: every branch gets gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 2, 8, 8, generator=g)                  # (B, C, T, H, W): 32 video tokens
    text = torch.randn(2, 8, 32, generator=g)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False                                           # a padded caption
    return model, (x, torch.tensor([100.0, 700.0]), text, mask), torch.randn(2, 24, 2, 8, 8, generator=g)


def step(model, inputs, target):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss = ((out - target) ** 2).mean()
    loss.backward()
    return loss.detach(), out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(eager, fast):
    (l_e, o_e, g_e), (l_f, o_f, g_f) = eager, fast
    torch.testing.assert_close(l_f, l_e, rtol=RTOL, atol=0)
    torch.testing.assert_close(o_f, o_e, rtol=RTOL, atol=RTOL * o_e.abs().max().item())
    assert g_f.keys() == g_e.keys() and len(g_e) > 0
    worst = max(((g_f[n] - g_e[n]).norm() / g_e[n].norm()).item() for n in g_e)
    assert worst <= GRAD_REL, f"largest relative gradient difference {worst:.2e}"


def test_compiled_blocks_equal_eager():
    model, inputs, target = model_and_inputs()
    fast = copy.deepcopy(model)
    assert compile_blocks(fast) == 2
    assert compile_blocks(fast) == 0                               # idempotent
    assert list(fast.state_dict()) == list(model.state_dict())     # checkpoints see the same keys
    assert_same_step(step(model, inputs, target), step(fast, inputs, target))
    assert_same_step(step(model, inputs, target), step(fast, inputs, target))   # the cached graph, second step


def test_runs_under_a_process_wide_torch_function_mode():
    """The trainer's CPU shim for megatron (trainer.device.install_heavy_cpu_shim) is a TorchFunctionMode entered for
    the life of the process; dynamo cannot trace through one, so the compiled blocks run with the mode stack empty
    (and it is back afterwards). A pass-through mode stands in for it here (the shim itself never leaves)."""
    from torch.overrides import TorchFunctionMode

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    model, inputs, target = model_and_inputs()
    eager = step(model, inputs, target)
    compile_blocks(model, backend="aot_eager")
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT > 8   # a bucketed stage's shapes stay compiled
    before = torch._C._len_torch_function_stack()   # 1 when a module run earlier in this worker installed the shim
    with PassThrough():
        fast = step(model, inputs, target)
        assert torch._C._len_torch_function_stack() == before + 1
    assert_same_step(eager, fast)


def test_composes_with_recompute_and_lora():
    model, inputs, target = model_and_inputs()
    apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        for _, adapter in adapters(model):
            adapter.B.normal_(std=0.1)                            # B = 0 at init would hide a skipped adapter
    fast = copy.deepcopy(model)
    apply_activation_checkpointing(fast)                           # the plan's order: recompute, then compile
    assert compile_blocks(fast, backend="aot_eager") == 2
    eager = step(model, inputs, target)
    assert_same_step(eager, step(fast, inputs, target))
    with torch.no_grad(), adapters_off(model), adapters_off(fast):   # Flow-DPO's reference: a guard recompiles
        off = model(*inputs)
        assert (off - eager[1]).abs().max() > 1e-3                    # the adapters matter
        torch.testing.assert_close(fast(*inputs), off, rtol=RTOL, atol=RTOL * off.abs().max().item())


def test_pipeline_stage_blocks():
    model, inputs, _ = model_and_inputs()
    stage = copy.deepcopy(model)
    (start, end), _ = apply_pipeline_parallel(stage, pp=2, pp_rank=1)   # blocks[0] becomes a placeholder
    assert compile_blocks(stage, backend="aot_eager") == 1
    ctx = model.condition(*inputs)
    x_BLD = model.run_blocks(model.embed(inputs[0], ctx), ctx, 0, start)
    torch.testing.assert_close(stage.run_blocks(x_BLD, stage.condition(*inputs), start, end),
                               model.run_blocks(x_BLD, ctx, start, end), rtol=RTOL, atol=1e-6)


class _MegatronLinear(nn.Linear):
    """Stands in for a megatron-core parallel linear: check_compilable reads the defining package's name."""


_MegatronLinear.__module__ = "megatron.core.tensor_parallel.layers"


def test_refuses_collectives_in_blocks():
    model = tiny(depth=1)
    model.blocks[0].attn.kv_gather = lambda x, dim: x              # what context parallelism sets
    with pytest.raises(ValueError, match="context_parallel=1"):
        compile_blocks(model)
    model = tiny(depth=1)
    model.blocks[0].mlp.fc1 = _MegatronLinear(4, 4)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1 .*tensor_parallel=1"):
        check_compilable(model)
    assert not is_compiled(model.blocks[0])
    with pytest.raises(TypeError, match="no .blocks"):
        compile_blocks(nn.Linear(2, 2))


def test_apply_hook_and_stage_config():
    model = tiny(depth=1)
    assert apply(model, "none") == 0 and not is_compiled(model.blocks[0])
    with pytest.raises(ValueError, match="compile must be one of"):
        apply(model, "all")
    assert StageConfig(compile="blocks", pipeline_parallel=2, recompute=True).compile == "blocks"
    with pytest.raises(ValueError, match="compile must be 'none' or 'blocks'"):
        StageConfig(compile="max")
    for bad in (dict(tensor_parallel=2), dict(context_parallel=2)):
        with pytest.raises(ValueError, match="set compile: none"):
            StageConfig(compile="blocks", **bad)
