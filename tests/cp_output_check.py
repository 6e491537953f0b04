"""CP=2 vs CP=1: the same DiT output and gradients from the same weights and inputs (run by test_trainer_cp.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/cp_output_check.py OUT.json

Each of the 2 gloo/CPU processes builds the same seeded, perturbed tiny MUGDiT, computes the CP=1 output and
parameter gradients with the plain model, then ``trainer.parallel.apply_context_parallel``s it over the 2-rank CP
group (tokens split in 2 chunks, K/V all-gathered) and compares the output (text padding mask and an I2V conditioning
frame included) and the gradients after ``sync_gradients`` (summed over CP) with CP=1. Rank 0 writes the
differences to OUT.json; a token count CP does not divide must raise ValueError.
"""
from __future__ import annotations

import copy
import json
import sys

import torch


def main(out_path: str) -> None:
    from models.dit import tiny
    from trainer import device, parallel

    layout = device.init_distributed(tp=1, seed=0, cp=2)
    torch.manual_seed(0)
    model = tiny(num_heads=4, caption_dropout_prob=0.0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                              # move every weight off its zero/identity init
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    b, c, t, h, w, s = 2, 24, 3, 8, 8, 16              # 3*4*4 = 48 video tokens + 2 = 50 = 2 chunks of 25
    x = torch.randn(b, c, t, h, w, generator=g)
    t_B = torch.tensor([100.0, 900.0])
    text = torch.randn(b, s, model.cfg.caption_channels, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 9:] = False
    cond = torch.tensor([[True, False, False], [False, False, False]])
    weight = torch.randn(b, c, t, h, w, generator=g)   # a loss that reaches every output element

    ref = copy.deepcopy(model)
    out1 = ref(x, t_B, text, mask, cond_mask_BT=cond)
    (out1 * weight).sum().backward()
    grads1 = {n: p.grad.clone() for n, p in ref.named_parameters()}

    parallel.apply_context_parallel(model)
    out2 = model(x, t_B, text, mask, cond_mask_BT=cond)
    (out2 * weight).sum().backward()
    parallel.sync_gradients(list(model.parameters()))
    grads2 = {n: p.grad for n, p in model.named_parameters()}
    try:                                               # a token count CP=2 does not divide
        model(torch.randn(1, c, 1, 2, 6, generator=g), t_B[:1], text[:1], mask[:1])   # 1*1*3 + 2 = 5 tokens
        odd_error = ""
    except ValueError as e:
        odd_error = str(e)
    result = {
        "rank": layout.rank, "cp": layout.cp, "cp_rank": layout.cp_rank, "dp": layout.dp,
        "out_max_abs": (out2 - out1).abs().max().item(),
        "out_scale": out1.abs().max().item(),
        "grad_max_abs": max((grads2[n] - grads1[n]).abs().max().item() for n in grads1),
        "grad_max_rel": max(((grads2[n] - grads1[n]).norm() / grads1[n].norm().clamp_min(1e-12)).item()
                            for n in grads1),
        "grads_nonzero": all(grads1[n].abs().sum().item() > 0 for n in grads1),
        "odd_error": odd_error,
    }
    if layout.rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    device.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
