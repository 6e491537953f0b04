"""LoRA adapters for MUGDiT's attention and MLP linears (docs/mugv.md §5.3: MUG-V's training code uses r 64, α 32).

    import torch
    from models.dit import tiny
    from models.lora import apply_lora, adapters_off, merge_adapters, adapter_state_dict
    model = tiny()
    names = apply_lora(model, rank=64, alpha=32.0)   # base frozen; adapters on blocks.{i}.attn.qkv, ... (TARGETS)
    v = model(x, t, text, mask)                      # = base(x) + alpha/rank * B(A(x)) on every target; B = 0 at start
    with adapters_off(model):
        v_ref = model(x, t, text, mask)              # the base model (Flow-DPO's reference): no second copy
    plain = merge_adapters(model.state_dict(), alpha=32.0)   # MUGDiT's own keys: W + alpha/rank * B @ A

An adapter is a ``LoRA`` submodule named ``lora`` of the target ``nn.Linear`` (state-dict keys
``blocks.{i}.attn.qkv.lora.A`` [r, in] and ``...lora.B`` [out, r]) plus a forward hook on the linear that adds its
output, so the base keys stay MUGDiT's and any linear that keeps the ``lora`` child and the hook works (the trainer's
tensor-parallel linears do). A ~ N(0, 1/r) (PEFT's "gaussian" init, as MUG-V), B = 0: the adapted model equals the
base at step 0. Every parameter that is not an adapter is frozen (``requires_grad`` False).

``LoRA.mid`` is an identity hook on the rank-r projection ``A x`` (like the DiT's ``kv_gather``): tensor parallelism
(trainer/parallel/tensor_parallel.py) puts its collective there. This file imports nothing distributed.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

# the linears of every block that get an adapter (MUG-V: linear_qkv, linear_proj, linear_kv, linear_q, linear_fc1,
# linear_fc2 of self- and cross-attention and the MLP)
TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1",
           "mlp.fc2")
ADAPTER = "lora"          # the submodule name: keys "<linear>.lora.A" and "<linear>.lora.B"


def _identity(u: torch.Tensor) -> torch.Tensor:
    return u


class LoRA(nn.Module):
    """y_lora = alpha/rank * B(mid(A x)): A [rank, in], B [out, rank] (zero), added to its linear's output."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # drawn on the CPU generator: the same adapters on every device and every tensor-parallel size
        self.A = nn.Parameter(torch.randn(rank, in_features) / rank)    # PEFT "gaussian": std 1/r
        self.B = nn.Parameter(torch.zeros(out_features, rank))          # zero: the step-0 model is the base
        self.enabled = True
        self.mid: Callable[[torch.Tensor], torch.Tensor] = _identity  # TP: the collective on the rank-r projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.mid(x @ self.A.t().to(x.dtype))                        # (..., rank)
        return (u @ self.B.t().to(u.dtype)) * self.scale                # (..., out)


def _add_adapter(module: nn.Module, args: Tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
    adapter = getattr(module, ADAPTER)
    return out + adapter(args[0]).to(out.dtype) if adapter.enabled else out


def attach(linear: nn.Module, adapter: LoRA) -> None:
    """Make ``adapter`` the ``lora`` child of ``linear`` and add its output to the linear's (a forward hook)."""
    setattr(linear, ADAPTER, adapter)
    linear.register_forward_hook(_add_adapter)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Tuple[str, ...] = TARGETS) -> List[str]:
    """Add an adapter to every block's ``targets`` linears and freeze everything else; returns the linears' names.
    The A matrices are drawn from torch's global CPU generator in module order (seed it first)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")
             and n.split(".", 2)[-1] in targets]
    if not names:
        raise ValueError(f"apply_lora: no linear named blocks.<i>.{{{', '.join(targets)}}}; is this a MUGDiT?")
    model.requires_grad_(False)
    for n in names:
        lin = model.get_submodule(n)
        out_f, in_f = lin.weight.shape
        attach(lin, LoRA(in_f, out_f, rank, alpha).to(lin.weight.device))
    return names


def adapters(model: nn.Module) -> Iterator[Tuple[str, LoRA]]:
    """(name of the adapted linear, its adapter) for every adapter of the model."""
    for name, m in model.named_modules():
        if isinstance(m, LoRA):
            yield name.rpartition(".")[0], m


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its base (every adapter skipped); they are switched back on after."""
    mods = [m for _, m in adapters(model)]
    previous = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(mods, previous):
            m.enabled = on


def adapter_of(key: str) -> Optional[Tuple[str, str]]:
    """(linear name, "A" | "B") for an adapter's state-dict key, else None."""
    head, _, leaf = key.rpartition(".")
    if leaf in ("A", "B") and head.endswith(f".{ADAPTER}"):
        return head[: -len(ADAPTER) - 1], leaf
    return None


def is_adapter_key(key: str) -> bool:
    return adapter_of(key) is not None


def adapter_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The adapters' entries of a state dict."""
    return {k: v for k, v in sd.items() if is_adapter_key(k)}


def base_state_dict(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every entry but the adapters' (MUGDiT's own keys)."""
    return {k: v for k, v in sd.items() if not is_adapter_key(k)}


@torch.no_grad()
def merge_adapters(sd: Mapping[str, torch.Tensor], alpha: float) -> Dict[str, torch.Tensor]:
    """MUGDiT's own keys with every adapter merged into its linear: W + alpha/rank * B @ A (fp32; new tensors for the
    merged weights, the others as given). Works on a tensor-parallel rank's local shards too: a column-parallel W
    holds B's rows and a row-parallel W holds A's columns, so B @ A is exactly the local slice of the full update."""
    out = base_state_dict(sd)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        parsed = adapter_of(k)
        if parsed is not None:
            pairs.setdefault(parsed[0], {})[parsed[1]] = v
    for linear, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"merge_adapters: {linear} has an incomplete adapter ({sorted(ab)})")
        w = out[f"{linear}.weight"]
        a, b = ab["A"].float(), ab["B"].float()
        out[f"{linear}.weight"] = (w.float() + (alpha / a.shape[0]) * (b @ a)).to(w.dtype)
    return out
