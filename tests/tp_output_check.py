"""TP=2 vs TP=1: the same DiT output and gradients from the same weights and inputs (run by test_convert.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_output_check.py OUT.json

Each of the 2 gloo/CPU processes builds the same seeded, perturbed tiny MUGDiT (4 heads, so 2 per rank), computes the
TP=1 output and parameter gradients with the plain model, then ``trainer.parallel.parallelize``s it over the 2-rank TP
group and checks: its local weights equal ``models.convert.shard_tp(full, 2, rank, layout="ours")`` bitwise; the
output (text padding mask and an I2V conditioning frame included) and the full gradients (``sync_gradients`` then
``gather_full_state_dict``) match TP=1. Rank 0 writes the differences to OUT.json.
"""
from __future__ import annotations

import copy
import json
import sys

import torch


def main(out_path: str) -> None:
    from models.convert import shard_tp
    from models.dit import tiny
    from trainer import device, parallel

    layout = device.init_distributed(tp=2, seed=0)
    torch.manual_seed(0)
    model = tiny(num_heads=4, caption_dropout_prob=0.0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                              # move every weight off its zero/identity init
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    b, c, t, h, w, s = 2, 24, 3, 8, 8, 16
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
    full_sd = {k: v.clone() for k, v in model.state_dict().items()}

    parallel.parallelize(model, 2)
    local = model.state_dict()
    expected = shard_tp(full_sd, 2, layout.tp_rank, layout="ours")
    shard_mismatch = sorted(k for k in expected if not torch.equal(local[k], expected[k]))
    out2 = model(x, t_B, text, mask, cond_mask_BT=cond)
    (out2 * weight).sum().backward()
    params = list(model.parameters())
    parallel.sync_gradients(params)
    grads2 = parallel.gather_full_state_dict(model, {n: p.grad for n, p in model.named_parameters()})
    result = {
        "rank": layout.rank, "tp": layout.tp,
        "backend": parallel.tp_layer_specs("local")["column"].metainfo["backend"],
        "layer_types": sorted({type(m).__name__ for m in model.modules() if hasattr(m, "_tp_plan")}),
        "state_dict_keys_unchanged": sorted(local) == sorted(full_sd),
        "shard_mismatch": shard_mismatch,
        "out_max_abs": (out2 - out1).abs().max().item(),
        "out_scale": out1.abs().max().item(),
        "grad_max_abs": max((grads2[n] - grads1[n]).abs().max().item() for n in grads1),
        "grad_max_rel": max(((grads2[n] - grads1[n]).norm() / grads1[n].norm().clamp_min(1e-12)).item()
                            for n in grads1),
    }
    if layout.rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    device.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
