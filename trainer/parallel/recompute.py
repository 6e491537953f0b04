"""Activation recomputation (``stage.recompute``): every DiT block's activations are recomputed in the backward.

    apply_activation_checkpointing(model)   # the plan's builder calls it when the stage asks for it

Each ``model.blocks[i].forward`` is wrapped in non-reentrant ``torch.utils.checkpoint`` (torchtitan's ``apply_ac``,
full, per block): only the block inputs are kept, and the block's forward (its TP collectives included, in the same
order on every TP rank) runs again in the backward. Module names and state-dict keys are unchanged. The blocks draw
no random numbers, so the recomputation is exact: losses and gradients equal the run without it.
"""
from __future__ import annotations

import functools

from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every block of ``model.blocks`` in place (idempotent); returns the model."""
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
