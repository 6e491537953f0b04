"""Reading weight files: one place for every loader (DiT import/conversion, VAE import).

``read_state_dict(path)`` takes ``.safetensors``, ``.pt``/``.pth``/``.bin`` (memory-mapped: the 10B ``dit.pt`` is
~20 GB) or a trainer step folder; ``unwrap_state_dict`` finds the flat name -> tensor dict inside raw, nested
(``model``/``state_dict``/``module``/``ema``/...) or DDP/compile-prefixed checkpoints; ``check_state_dict`` raises
one error listing missing, unexpected and misshaped keys.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Sequence, Tuple

import torch

StateDict = Dict[str, torch.Tensor]
WRAPPERS = ("state_dict", "model", "module", "ema", "vae", "model_state_dict")   # nesting seen in torch/DDP/megatron
PREFIXES = ("module.", "_orig_mod.")                                             # DDP and torch.compile prefixes


class WeightsError(ValueError):
    """A weights file or state dict that does not fit what was asked for."""


def unwrap_state_dict(obj) -> StateDict:
    """A flat name -> tensor dict from a raw, nested or DDP/compile-prefixed checkpoint."""
    for _ in range(5):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        top = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"cannot find a state dict in this checkpoint: top level {top} (expected name -> "
                           f"tensor, or one of {list(WRAPPERS)} holding it)")
    out = {}
    for k, v in obj.items():
        for p in PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> StateDict:
    """A ``.safetensors``/``.pt``/``.bin`` file, or a trainer step folder (``model.safetensors``), as a flat dict."""
    p = Path(path)
    if p.is_dir() and (p / "model.safetensors").exists():
        p = p / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"no weights file at {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle)   # legacy (non-zip) format
    except Exception as e:   # megatron files pickle argparse args and numpy RNG state
        if trust_pickle:
            raise
        raise WeightsError(f"{p}: torch.load(weights_only=True) failed ({type(e).__name__}: {str(e)[:200]}); "
                           "if the file is trusted (e.g. a Megatron model_optim_rng.pt with args), pass "
                           "trust_pickle=True (CLI --trust-pickle)") from None
    return unwrap_state_dict(obj)


def check_state_dict(expected: Mapping[str, Tuple[int, ...]], state: Mapping[str, torch.Tensor],
                     what: str = "state dict") -> None:
    """Raise one WeightsError listing missing keys, unexpected keys and shape mismatches against ``expected``
    (name -> shape; ``{k: tuple(v.shape) for k, v in model.state_dict().items()}`` for a module)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs expected {list(expected[k])}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        def block(title: str, items: Sequence[str]) -> str:
            shown = "\n    ".join(items[:40]) + (f"\n    ... and {len(items) - 40} more" if len(items) > 40 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""
        raise WeightsError(f"{what} does not match ({len(expected)} expected keys, {len(state)} in the checkpoint):"
                           + block("missing keys", missing) + block("unexpected keys", unexpected)
                           + block("shape mismatches", mismatched))


def shapes_of(module: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
