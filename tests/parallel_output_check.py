"""TP=2 or CP=2 vs one process: the same DiT output and gradients from the same weights and inputs.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel_output_check.py {tp,cp} OUT.json

Each of the 2 gloo/CPU processes builds the same seeded, perturbed tiny MUGDiT (4 heads, so 2 per TP rank; 3*4*4 = 48
video tokens + 2 = 2 CP chunks of 25) and computes the single-process output and parameter gradients, with a text
padding mask and an I2V conditioning frame. Then:
- ``tp``: ``trainer.parallel.parallelize`` over the 2-rank TP group; also checks the local weights equal
  ``models.convert.shard_tp(full, 2, rank, layout="ours")`` bitwise; gradients are gathered to full tensors.
- ``cp``: ``trainer.parallel.apply_context_parallel`` (tokens split in 2 chunks, K/V all-gathered); also checks a
  token count CP does not divide raises ValueError.
Rank 0 writes the differences to OUT.json. ``run_check`` (used by test_convert.py and test_trainer_cp.py) launches it.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_check(mode: str, tmp_path: Path, timeout: int) -> dict:
    """Run this script on 2 processes and return rank 0's result."""
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__)), mode, str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    print(res)
    return res


def main(mode: str, out_path: str) -> None:
    from models.convert import shard_tp
    from models.dit import tiny
    from trainer import device, parallel

    layout = device.init_distributed(tp=2, seed=0) if mode == "tp" else device.init_distributed(tp=1, seed=0, cp=2)
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

    result = {"rank": layout.rank, "tp": layout.tp, "cp": layout.cp, "dp": layout.dp}
    if mode == "tp":
        parallel.parallelize(model, 2)
        local = model.state_dict()
        expected = shard_tp(full_sd, 2, layout.tp_rank, layout="ours")
        result.update(
            backend=parallel.tp_layer_specs("local")["column"].metainfo["backend"],
            layer_types=sorted({type(m).__name__ for m in model.modules() if hasattr(m, "_tp_plan")}),
            state_dict_keys_unchanged=sorted(local) == sorted(full_sd),
            shard_mismatch=sorted(k for k in expected if not torch.equal(local[k], expected[k])))
    else:
        parallel.apply_context_parallel(model)
    out2 = model(x, t_B, text, mask, cond_mask_BT=cond)
    (out2 * weight).sum().backward()
    parallel.sync_gradients(list(model.parameters()))
    grads2 = {n: p.grad for n, p in model.named_parameters()}
    if mode == "tp":
        grads2 = parallel.gather_full_state_dict(model, grads2)
    else:
        try:                                           # a token count CP=2 does not divide: 1*1*3 + 2 = 5 tokens
            model(torch.randn(1, c, 1, 2, 6, generator=g), t_B[:1], text[:1], mask[:1])
            result["odd_error"] = ""
        except ValueError as e:
            result["odd_error"] = str(e)
    result.update(
        out_max_abs=(out2 - out1).abs().max().item(),
        out_scale=out1.abs().max().item(),
        grad_max_abs=max((grads2[n] - grads1[n]).abs().max().item() for n in grads1),
        grad_max_rel=max(((grads2[n] - grads1[n]).norm() / grads1[n].norm().clamp_min(1e-12)).item() for n in grads1),
        grads_nonzero=all(grads1[n].abs().sum().item() > 0 for n in grads1))
    if layout.rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    device.destroy()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("tp", "cp"):
        sys.exit("usage: parallel_output_check.py {tp,cp} OUT.json")
    main(sys.argv[1], sys.argv[2])
