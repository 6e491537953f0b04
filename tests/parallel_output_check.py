"""TP=2, CP=2 or TP=2 + sequence parallelism vs one process: the same DiT output and gradients from the same weights
and inputs.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/parallel_output_check.py {tp,cp,sp} OUT.json

Each of the 2 gloo/CPU processes builds the same seeded, perturbed tiny MUGDiT (4 heads, so 2 per TP rank; 3*4*4 = 48
video tokens + 2 = 2 CP chunks of 25) and computes the single-process output and parameter gradients, with a text
padding mask and an I2V conditioning frame. Then:
- ``tp``: ``trainer.parallel.parallelize`` over the 2-rank TP group; also checks the local weights equal
  ``models.convert.shard_tp(full, 2, rank, layout="ours")`` bitwise; gradients are gathered to full tensors.
- ``cp``: ``trainer.parallel.context_parallel.apply_context_parallel`` (tokens split in 2 chunks, K/V all-gathered).
- ``sp``: three TP=2 copies: plain, ``sequence_parallel=True``, and sequence-parallel with activation recomputation;
  each also takes 3 AdamW steps (``sync_gradients``, ``clip_grad_norm``) next to the one-process model, and the
  full weights after them are compared (``weights_max_abs`` vs TP=1, ``sp_vs_tp_weights_max_abs`` vs plain TP=2).
- ``cp`` also accumulates 3 micro-batches with ``trainer.parallel.grads.OverlappedGradReduce`` (buckets of ~1 KiB,
  all-reduced over the DP x CP group during the third backward) and with ``sync_gradients`` after it:
  ``overlap_buckets``, ``overlap_launched_in_backward``, ``overlap_grads_bitwise`` (2 ranks: the same float sums).
- ``cp`` and ``sp`` also run an odd token count (latent [24, 3, 6, 10]: 3*3*5 = 45 video tokens + 2 = 47, which
  neither split divides: the model pads to 48, ``MUGDiT.token_multiple``), with and without activation
  recomputation, against one process: ``odd_{cp,cp_ac,sp,sp_ac}_{out_max_abs,grad_max_rel}``.
Rank 0 writes the differences to OUT.json. ``run_check`` (used by test_convert.py, test_trainer_cp.py and
test_trainer_sp.py) launches it.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

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
    from trainer import device
    from trainer.parallel import parallelize
    from trainer.parallel.grads import sync_gradients
    from trainer.parallel.state_dict import gather_full_state_dict
    from trainer.parallel.tensor_parallel import tp_layer_specs

    layout = device.init_distributed(tp=1, seed=0, cp=2) if mode == "cp" else device.init_distributed(tp=2, seed=0)
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
    # odd token count: 3 * (6/2) * (10/2) = 45 video tokens + 2 = 47 (padded to 48 for the 2-way splits)
    odd = (torch.randn(b, c, t, 6, 10, generator=g), t_B, text, mask, cond)
    odd_weight = torch.randn(b, c, t, 6, 10, generator=g)
    odd_ref = _out_and_grads(copy.deepcopy(model), odd, odd_weight) if mode != "tp" else None

    ref = copy.deepcopy(model)
    out1 = ref(x, t_B, text, mask, cond_mask_BT=cond)
    (out1 * weight).sum().backward()
    grads1 = {n: _grad(p).clone() for n, p in ref.named_parameters()}
    full_sd = {k: v.clone() for k, v in model.state_dict().items()}

    result: Dict[str, Any] = {"rank": layout.rank, "tp": layout.tp, "cp": layout.cp, "dp": layout.dp}
    if mode == "sp":
        assert odd_ref is not None
        result.update(_sequence_parallel_check(model, ref, layout, (x, t_B, text, mask, cond), weight, out1, grads1,
                                               (odd, odd_weight, *odd_ref)))
        if layout.rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
        device.destroy()
        return
    if mode == "tp":
        plan = parallelize(model, layout)
        local = model.state_dict()
        expected = shard_tp(full_sd, 2, layout.tp_rank, layout="ours")
        result.update(
            backend=tp_layer_specs("local")["column"].metainfo["backend"],
            layer_types=sorted({type(model.get_submodule(n)).__name__ for n in plan.tp_linears}),
            state_dict_keys_unchanged=sorted(local) == sorted(full_sd),
            shard_mismatch=sorted(k for k in expected if not torch.equal(local[k], expected[k])))
    else:
        result.update(_overlap_check(model, layout, (x, t_B, text, mask, cond), weight))   # parallelises copies
        cp_ac = copy.deepcopy(model)
        cp_ac_plan = parallelize(cp_ac, layout, recompute=True)
        plan = parallelize(model, layout)
        assert odd_ref is not None
        for name, m, pl in (("cp", model, plan), ("cp_ac", cp_ac, cp_ac_plan)):
            result.update(_odd_diffs(name, m, pl, odd, odd_weight, *odd_ref, sharded=False))
        result["odd_token_multiple"] = model.token_multiple
    out2 = model(x, t_B, text, mask, cond_mask_BT=cond)
    (out2 * weight).sum().backward()
    sync_gradients(plan, model)
    grads2 = {n: _grad(p) for n, p in model.named_parameters()}
    if mode == "tp":
        grads2 = gather_full_state_dict(plan, model, grads2)
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


def _overlap_check(model, layout, inputs, weight, micro: int = 3) -> dict:
    """Gradients of ``micro`` accumulated backward passes (each input scaled differently), reduced by the
    overlapped buckets and by ``sync_gradients``; whether they are bitwise equal."""
    from trainer.parallel import parallelize
    from trainer.parallel.grads import OverlappedGradReduce, sync_gradients

    grads = {}
    for overlapped in (True, False):
        m = copy.deepcopy(model)
        plan = parallelize(m, layout)
        m.zero_grad(set_to_none=True)
        overlap = OverlappedGradReduce(plan, m, micro_batches=micro, bucket_mb=1 / 1024) if overlapped else None
        for k in range(micro):
            out = m(inputs[0] * (1 + 0.1 * k), *inputs[1:4], cond_mask_BT=inputs[4])
            (out * weight).sum().backward()
        if overlap is not None:
            n_buckets, early = len(overlap.buckets), overlap.launched
            overlap.finish()
        else:
            sync_gradients(plan, m)
        grads[overlapped] = {n: _grad(p).clone() for n, p in m.named_parameters()}
    return {"overlap_buckets": n_buckets, "overlap_launched_in_backward": early,
            "overlap_grads_bitwise": all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])}


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    """``p.grad`` after a backward that reached ``p`` (typed Optional)."""
    assert p.grad is not None, "a parameter got no gradient"
    return p.grad


def _out_and_grads(m, inputs, weight) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Output and parameter gradients of one backward of ``(m(...) * weight).sum()`` on one process."""
    out = m(*inputs[:4], cond_mask_BT=inputs[4])
    (out * weight).sum().backward()
    return out.detach(), {n: _grad(p).clone() for n, p in m.named_parameters()}


def _odd_diffs(name, m, plan, inputs, weight, out1, grads1, sharded) -> dict:
    """One forward/backward of the parallel ``m`` on ``inputs`` vs the one-process output and gradients."""
    from trainer.parallel.grads import sync_gradients
    from trainer.parallel.state_dict import gather_full_state_dict

    m.zero_grad(set_to_none=True)
    out = m(*inputs[:4], cond_mask_BT=inputs[4])
    (out * weight).sum().backward()
    sync_gradients(plan, m)
    grads = {n: _grad(p) for n, p in m.named_parameters()}
    if sharded:
        grads = gather_full_state_dict(plan, m, grads)
    m.zero_grad(set_to_none=True)
    return {f"odd_{name}_out_max_abs": (out.detach() - out1).abs().max().item(),
            f"odd_{name}_grad_max_rel": max(((grads[n] - grads1[n]).norm() / grads1[n].norm().clamp_min(1e-12)).item()
                                            for n in grads1),
            f"odd_{name}_grads_nonzero": all(grads1[n].abs().sum().item() > 0 for n in grads1)}


def _sequence_parallel_check(model, ref, layout, inputs, weight, out1, grads1, odd, steps: int = 3) -> dict:
    """TP=2 plain / + SP / + SP and recomputation vs the one-process ``ref`` (``model`` is the unsharded copy):
    output and gradients of one backward, then ``steps`` AdamW steps each; max differences. ``odd``: (inputs,
    weight, one-process output, gradients) with a token count TP does not divide, run through the SP models."""
    from trainer.parallel import ParallelPlan, parallelize
    from trainer.parallel.grads import clip_grad_norm, sync_gradients
    from trainer.parallel.state_dict import gather_full_state_dict

    def step_all(m, plan, sharded):
        # eps 1e-6, not 1e-8: at the first step some cross-attention gradients are ~1e-9 (rounding noise), which
        # Adam would turn into ~lr/10 updates differing by 3.5e-5 between any two reduction orders (plain TP too)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.0)
        outs = []
        for _ in range(steps):
            out = m(*inputs[:4], cond_mask_BT=inputs[4])
            opt.zero_grad(set_to_none=True)
            (out * weight).sum().backward()
            sync_gradients(plan, m)
            clip_grad_norm(plan, m, 1.0)
            opt.step()
            outs.append(out.detach())
        return outs, (gather_full_state_dict(plan, m) if sharded else {k: v.detach() for k, v in
                                                                        m.state_dict().items()})

    def build(sp: bool, recompute: bool):
        m = copy.deepcopy(model)
        return m, parallelize(m, layout, sequence_parallel=sp, recompute=recompute)

    models = {"tp": build(False, False), "sp": build(True, False), "sp_ac": build(True, True)}
    sp_model, sp_plan = models["sp"]
    res: Dict[str, Any] = {"sp_partial": sorted(n for n, _ in sp_model.named_parameters()
                                if sp_plan.role(n).tp_partial == "sequence"),
           "sp_layers": sorted(n for n, lin in sp_plan.tp_linears.items() if lin.sequence_parallel)}
    outs, grads = {}, {}
    for name, (m, plan) in models.items():
        out = m(*inputs[:4], cond_mask_BT=inputs[4])
        (out * weight).sum().backward()
        sync_gradients(plan, m)
        outs[name] = out.detach()
        grads[name] = gather_full_state_dict(plan, m, {n: _grad(p) for n, p in m.named_parameters()})
        m.zero_grad(set_to_none=True)
        res[f"{name}_out_max_abs"] = (outs[name] - out1).abs().max().item()
        res[f"{name}_grad_max_abs"] = max((grads[name][n] - grads1[n]).abs().max().item() for n in grads1)
        res[f"{name}_grad_max_rel"] = max(((grads[name][n] - grads1[n]).norm() /
                                           grads1[n].norm().clamp_min(1e-12)).item() for n in grads1)
    res["sp_vs_tp_grad_max_abs"] = max((grads["sp"][n] - grads["tp"][n]).abs().max().item() for n in grads1)
    odd_inputs, odd_weight, odd_out, odd_grads = odd
    for name in ("sp", "sp_ac"):                       # before the AdamW steps: the weights are still ``model``'s
        m, plan = models[name]
        res.update(_odd_diffs(name, m, plan, odd_inputs, odd_weight, odd_out, odd_grads, sharded=True))
    res["odd_token_multiple"] = sp_model.token_multiple
    res["out_scale"] = out1.abs().max().item()
    res["grads_nonzero"] = all(grads1[n].abs().sum().item() > 0 for n in grads1)
    ref_outs, ref_w = step_all(ref, ParallelPlan(layout), False)
    trained = {name: step_all(m, plan, True) for name, (m, plan) in models.items()}
    for name, (o, w) in trained.items():
        res[f"{name}_steps_out_max_abs"] = max((a - b).abs().max().item() for a, b in zip(o, ref_outs))
        res[f"{name}_weights_max_abs"] = max((w[k] - ref_w[k]).abs().max().item() for k in ref_w)
        res[f"{name}_weights_moved"] = max((w[k] - model.state_dict()[k]).abs().max().item() for k in ref_w)
    res["sp_vs_tp_weights_max_abs"] = max((trained["sp"][1][k] - trained["tp"][1][k]).abs().max().item()
                                          for k in ref_w)
    return res


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("tp", "cp", "sp"):
        sys.exit("usage: parallel_output_check.py {tp,cp,sp} OUT.json")
    main(sys.argv[1], sys.argv[2])
