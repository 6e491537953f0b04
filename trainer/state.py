"""A stage's training state in and out of checkpoint step folders: weights, EMA, optimizer, RNG, step.

    start, ema = restore(job, plan, model, opt, ddp)      # resume output_dir/latest, else init_checkpoint, else scratch
    save(job, plan, model, opt, ema, step, loss, ddp)     # collective: one step folder (trainer/checkpoint.py)

The folder format (atomic, checksummed, which layouts can resume which) is ``trainer/checkpoint.py``'s; this module
decides what goes in it. ``checkpoint_format: full``: rank 0 writes the full ``model``/``ema.safetensors`` and every
rank its optimizer + RNG file. ``dist``: also a megatron ``dist_checkpointing`` folder with the sharded weights,
EMA and optimizer state (torch AdamW's moments, whose step counts and param groups stay in the per-rank file, or the
distributed optimizer's state), from which resume and ``init_checkpoint`` load, resharding between TP and CP sizes.
With ``full_weights: final`` the full weights are only gathered at the stage's last step. With bf16 parameters
(the distributed optimizer and ``bf16_weights``: ``trainer.precision.MegatronMasters``) every saved weight and EMA
is the fp32 master's, gathered over DP, and loads go through fp32 into the masters. Exact resume of the
distributed optimizer needs the Adam-step fix below (``_restore_adam_step``; docs/checkpoints.md says why).

LoRA (``plan.lora_rank`` > 0): the base weights are frozen, so they are never saved: a resume rebuilds them as the
stage started (``init_checkpoint``, else the seeded init) and loads the adapters, their EMA and the optimizer. The
weights every reader expects keep MUGDiT's keys: ``model``/``ema.safetensors`` and ``dist/``'s "model."/"ema." hold
the adapters merged into the base (``models.lora.merge_adapters``; the EMA merges the adapters' EMA), the adapters
themselves go to ``lora.safetensors``/``lora_ema.safetensors`` and ``dist/``'s "lora."/"lora_ema.". The EMA then
holds the adapters only (the base's EMA is the base).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager, Dict, Optional, Tuple

import torch

from common.config import to_dict
from common.hashing import sha256_json
from models.lora import adapter_state_dict, base_state_dict, merge_adapters
from trainer import checkpoint
from trainer.job import StageJob
from trainer.optim import inner_optimizers
from trainer.parallel.state_dict import (
    dist_sharded_state_dict,
    gather_full_state_dict,
    load_full_state_dict,
    shard_full_state_dict,
)
from trainer.precision import MegatronMasters

DISTOPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
LORA_FILE, LORA_EMA_FILE = "lora.safetensors", "lora_ema.safetensors"   # the full (TP-gathered) adapters


def needs_dist_load(job: StageJob) -> bool:
    """Whether this stage reads a ``dist/`` folder: its own format, or an ``init_checkpoint`` whose weights are only
    (or, for a "dist" stage, preferably) in ``dist/`` (megatron's dist_checkpointing needs the heavy CPU shim)."""
    return job.stage.checkpoint_format == "dist" or _init_from_dist(job)


def _init_from_dist(job: StageJob) -> bool:
    init = job.init_checkpoint
    if not init or not checkpoint.has_dist(init):
        return False
    return job.stage.checkpoint_format == "dist" or not checkpoint.has_full_weights(init)


def restore(job: StageJob, plan, model, opt, ddp=None) -> Tuple[int, Dict[str, torch.Tensor]]:
    """Resume from output_dir/latest, else weights from init_checkpoint, else scratch. Returns (step, ema).

    Resume reads the per-rank file ``checkpoint.load_rank_state`` picks: the layout that wrote the checkpoint
    resumes exactly; a changed context_parallel (or, for "dist" checkpoints with the Adam moments in ``dist/``,
    tensor_parallel) resumes resharded; any other change is a ``CheckpointError`` naming both layouts. "dist":
    weights, EMA and the Adam moments (or the distributed optimizer's state) come from ``dist/``, resharded to this
    layout; an ``init_checkpoint`` with ``dist/`` loads from it (any TP/CP size wrote it), also in a "full" stage
    when the folder has no ``model.safetensors`` (``full_weights: final`` before the last step)."""
    layout, stage = plan.layout, job.stage
    last, start = checkpoint.latest(job.output_dir), 0
    fmt, lora = stage.checkpoint_format, plan.lora_rank > 0
    masters = MegatronMasters.of(opt, model) if ddp is not None else None   # bf16 params: loads go through fp32
    ema = _ema_init(plan, model, masters)
    if last is not None:
        meta = checkpoint.read_meta(last)
        saved = (meta.get("checkpoint_format", "full"), bool(meta.get("distributed_optimizer", False)))
        if saved != (fmt, stage.distributed_optimizer):
            raise checkpoint.CheckpointError(
                f"cannot resume {last}: it was saved with checkpoint_format={saved[0]}, distributed_optimizer="
                f"{saved[1]}, this stage has {fmt}/{stage.distributed_optimizer}; use a new output_dir and "
                "pass this step folder as init_checkpoint (weights only)")
        _check_lora_resume(last, meta, job, plan)
        state = checkpoint.load_rank_state(last, layout, stage.micro_batches)
        if state["resharded"] and layout.rank == 0:
            print(f"resuming {last.name} (saved with {checkpoint.layout_str(checkpoint.saved_layout(meta))}) "
                  f"resharded to tensor_parallel={layout.tp}, context_parallel={layout.cp}, "
                  f"data_parallel={layout.dp}", flush=True)
        if lora:   # the frozen base is never saved: rebuilt as the stage started
            load_init_weights(job, plan, model)
        if fmt == "dist":
            with _loading(masters, model) as weights:   # the saved masters (the optimizer's copy: the same values)
                _load_dist(last, plan, model, ema, opt, state, distopt=ddp is not None, adapters=lora,
                           weights=weights)
        elif lora:
            adapters = adapter_state_dict(model.state_dict())
            for target, name in ((adapters, LORA_FILE), (ema, LORA_EMA_FILE)):
                full = checkpoint.load_file_verified(last, name)
                with torch.no_grad():
                    for k, v in shard_full_state_dict(plan, model, full, own=target).items():
                        target[k].copy_(v)
            opt.load_state_dict(state["optimizer"])
        else:
            load_full_state_dict(plan, model, checkpoint.load_weights(last))
            for k, v in shard_full_state_dict(plan, model, checkpoint.load_weights(last, ema=True)).items():
                ema[k].copy_(v)
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
    elif job.init_checkpoint:
        with _loading(masters, model) as weights:   # bf16 params: the init's fp32 values become the masters
            load_init_weights(job, plan, model, weights)
        ema = _ema_init(plan, model, masters)
    return start, ema


def _loading(masters: Optional[MegatronMasters], model) -> ContextManager[Optional[Dict[str, torch.Tensor]]]:
    """``masters.loading``: a state dict to load into whose values then become the masters; None (load into the
    model) without masters."""
    return masters.loading(model) if masters is not None else contextlib.nullcontext()


def _ema_init(plan, model, masters: Optional[MegatronMasters] = None) -> Dict[str, torch.Tensor]:
    """A copy of what the EMA tracks: every state-dict entry, or with LoRA the adapters only; with ``masters``
    (bf16 parameters) of the fp32 masters (collective over DP)."""
    sd = model.state_dict() if masters is None else masters.local_state_dict(model)
    return {k: v.detach().clone() for k, v in (adapter_state_dict(sd) if plan.lora_rank > 0 else sd).items()}


def load_init_weights(job: StageJob, plan, model, weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """The stage's starting weights (its ``init_checkpoint``: the full ``model.safetensors``, or ``dist/`` when the
    stage reads it) into the model, LoRA adapters excepted (they start fresh); nothing without an init_checkpoint
    (the seeded init). The Flow-DPO reference copy is loaded with it too. ``weights``: load into this state dict of
    the model's keys instead (``MegatronMasters.loading``'s fp32 one)."""
    if not job.init_checkpoint:
        return
    if _init_from_dist(job):
        _load_dist(job.init_checkpoint, plan, model, weights=weights)
    elif plan.lora_rank > 0:
        base = base_state_dict(model.state_dict())
        with torch.no_grad():
            for k, v in shard_full_state_dict(plan, model, checkpoint.load_weights(job.init_checkpoint),
                                              own=base).items():
                base[k].copy_(v)
    elif weights is not None:
        with torch.no_grad():
            for k, v in shard_full_state_dict(plan, model, checkpoint.load_weights(job.init_checkpoint)).items():
                weights[k].copy_(v)
    else:
        load_full_state_dict(plan, model, checkpoint.load_weights(job.init_checkpoint))


def _lora_meta(job: StageJob, plan) -> Dict[str, Any]:
    """meta.json's "lora": the adapters' shape and the base they were trained on (``init_checkpoint``: its path, and
    "base", the sha256 of its meta.json checksums, which stays the same when the folder is fetched to another path;
    "" without one: the seeded init)."""
    base = ""
    if job.init_checkpoint:
        base = sha256_json(checkpoint.read_meta(job.init_checkpoint).get("checksums", {}), n=16)
    return {"rank": plan.lora_rank, "alpha": plan.lora_alpha, "init_checkpoint": job.init_checkpoint, "base": base}


def _check_lora_resume(last: Path, meta: Dict[str, Any], job: StageJob, plan) -> None:
    """A LoRA checkpoint resumes only with the same adapters on the same base (the base is not in it)."""
    saved = meta.get("lora")
    wanted = _lora_meta(job, plan) if plan.lora_rank > 0 else None
    key = ("rank", "alpha", "base")
    if (saved and [saved.get(k) for k in key]) != (wanted and [wanted[k] for k in key]):
        def show(d):
            return "no LoRA" if not d else f"lora_rank={d['rank']}, lora_alpha={d['alpha']} on init_checkpoint " \
                                            f"'{d['init_checkpoint'] or 'none (seeded init)'}' (base {d.get('base')})"
        raise checkpoint.CheckpointError(
            f"cannot resume {last}: it was saved with {show(saved)}, this stage has {show(wanted)} (a LoRA "
            "checkpoint holds the adapters, not the frozen base they were trained on); rerun with the saved values, "
            "or use a new output_dir and pass this step folder as init_checkpoint (merged weights)")


def save(job: StageJob, plan, model, opt, ema, step: int, loss: float, ddp=None,
         writer: Optional[checkpoint.Writer] = None) -> None:
    """Write step folder ``step`` (collective). The full weights are gathered to rank 0 unless ``full_weights:
    final`` and this is not the stage's last step; "dist" also saves the weights, EMA and optimizer state sharded.
    ``writer``: the files are written in its thread (``checkpoint.save``); the folder is complete after
    ``writer.wait()``."""
    st, layout = job.stage, plan.layout
    dist_fmt = st.checkpoint_format == "dist"
    write_full = not dist_fmt or st.full_weights == "every" or step >= st.steps
    weights: Optional[Dict[str, torch.Tensor]] = None   # None: the model's state dict
    masters = MegatronMasters.of(opt, model) if ddp is not None else None
    if masters is not None:   # bf16 parameters: the fp32 masters are the weights, the EMA's slices their owners'
        weights = masters.local_state_dict(model)
        masters.gather(ema)
    ema_weights, extra = ema, {}
    if plan.lora_rank > 0:   # readers get MUGDiT's keys: the adapters (and their EMA) merged into the base
        sd = model.state_dict() if weights is None else weights
        weights = merge_adapters(sd, plan.lora_alpha)
        ema_weights = merge_adapters({**base_state_dict(sd), **ema}, plan.lora_alpha)
        extra = {LORA_FILE: adapter_state_dict(sd), LORA_EMA_FILE: ema}
    full = full_ema = None
    full_extra: Dict[str, Dict[str, torch.Tensor]] = {}
    if write_full:   # collective over TP (and PP: rank 0 gets every stage's part)
        full, full_ema = gather_full_state_dict(plan, model, weights), gather_full_state_dict(plan, model, ema_weights)
        full_extra = {name: gather_full_state_dict(plan, model, part) for name, part in extra.items()}
    meta = {"stage": st.name, "config_hash": job.config_hash, "tensor_parallel": layout.tp,
            "context_parallel": layout.cp, "pipeline_parallel": layout.pp, "data_parallel": layout.dp,
            "micro_batches": st.micro_batches, "dit": to_dict(job.dit), "loss": loss,
            "checkpoint_format": st.checkpoint_format, "distributed_optimizer": st.distributed_optimizer,
            "optimizer_in_dist": dist_fmt, "full_weights": write_full, "sequence_parallel": plan.sequence_parallel}
    if plan.lora_rank > 0:
        meta["lora"] = _lora_meta(job, plan)
    if st.objective != "flow":
        meta["objective"] = st.objective
    rank_state: Dict[str, Any] = {"rng": torch.get_rng_state()}
    if ddp is not None:
        rank_state["adam_step"] = _adam_step(opt)
    elif dist_fmt:   # the moments go to dist/ (reshardable); steps and param groups stay here
        rank_state["optimizer"], rank_state["optimizer_in_dist"] = _optimizer_without_moments(opt), True
    else:
        rank_state["optimizer"] = opt.state_dict()
    dist_state: Optional[Dict[str, Any]] = None
    if dist_fmt:
        dist_state = {"model": dist_sharded_state_dict(plan, model.state_dict() if weights is None else weights,
                                                       "model."),
                      "ema": dist_sharded_state_dict(plan, ema_weights, "ema.")}
        for name, part in extra.items():   # LoRA: "lora." and "lora_ema."
            prefix = name.removesuffix(".safetensors")
            dist_state[prefix] = dist_sharded_state_dict(plan, part, f"{prefix}.")
        if ddp is not None:
            dist_state["optimizer"] = opt.sharded_state_dict({}, metadata=DISTOPT_METADATA)
        else:
            dist_state["adam"] = _adam_moments_sharded(plan, model, opt)
    root = layout.rank == 0
    checkpoint.save(job.output_dir, step, rank=layout.rank, model_sd=full if root else None,
                    ema_sd=full_ema if root else None, rank_state=rank_state, meta=meta,
                    keep=st.keep_checkpoints, dist_state=dist_state, extra_sd=full_extra if root else None,
                    writer=writer)
    if root:
        print(f"{'saving' if writer else 'saved'} {Path(job.output_dir) / checkpoint.step_name(step)}", flush=True)


def _trainable(model):
    """(name, param) of the parameters the optimizer holds, in its order (the same for every TP size)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _adam_moments_sharded(plan, model, opt) -> Dict[str, Dict[str, object]]:
    """The torch AdamW moments as dist_checkpointing ShardedTensors ("adam.exp_avg.<param>", ...): the same global
    layout as the weights, so they reshard over TP and CP with them."""
    named = [(n, p) for n, p in _trainable(model) if p in opt.state]
    return {m: dist_sharded_state_dict(plan, {n: opt.state[p][m] for n, p in named}, f"adam.{m}.")
            for m in ADAM_MOMENTS}


def _optimizer_without_moments(opt) -> dict:
    """``opt.state_dict()`` minus the Adam moments (in ``dist/``): param groups and per-parameter step counts."""
    sd = opt.state_dict()
    return {"param_groups": sd["param_groups"],
            "state": {i: {k: v for k, v in s.items() if k not in ADAM_MOMENTS} for i, s in sd["state"].items()}}


def _load_dist(step_dir, plan, model, ema=None, opt=None, rank_state=None, distopt=False, adapters=False,
               weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Load ``dist/`` into the model (and the EMA and the optimizer when given), resharding over TP and CP.
    ``adapters``: only the LoRA adapters and their EMA ("lora.", "lora_ema."); else the weights ("model.", "ema."),
    with LoRA only the base's.

    ``opt``: the distributed optimizer (``distopt``: its state is in ``dist/``), or torch AdamW, whose moments are in
    ``dist/`` when ``rank_state["optimizer"]`` was saved without them (else, older checkpoints, all of its state is
    in ``rank_state``). ``weights``: load into this state dict of the model's keys instead of the model's."""
    rank_state = rank_state or {}
    sd = model.state_dict() if weights is None else weights
    if adapters:   # resume of a LoRA stage: the adapters and their EMA (the base is the init's)
        targets = {"lora": adapter_state_dict(sd)}
        if ema is not None:
            targets["lora_ema"] = ema
    else:   # the weights (with LoRA: the base, from an init_checkpoint's merged "model.")
        targets = {"model": base_state_dict(sd) if plan.lora_rank > 0 else sd}
        if ema is not None:
            targets["ema"] = ema
    request = {name: dist_sharded_state_dict(plan, t, f"{name}.") for name, t in targets.items()}
    adam_sd: Dict[str, Any] = (rank_state.get("optimizer") or {}) if opt is not None and not distopt else {}
    trainable = _trainable(model)
    moments_in_dist = bool(adam_sd) and bool(rank_state.get("optimizer_in_dist"))
    if moments_in_dist:
        saved = {int(i): trainable[int(i)] for i in adam_sd["state"]}
        request["adam"] = {m: dist_sharded_state_dict(plan, {n: torch.empty_like(p) for n, p in saved.values()},
                                                      f"adam.{m}.") for m in ADAM_MOMENTS}
    if opt is not None and distopt:
        for inner in inner_optimizers(opt):   # the no-Apex path has no Adam state until a first step
            inner._init_optimizer_states_with_dummy_values()
        request["optimizer"] = opt.sharded_state_dict({}, is_loading=True, metadata=DISTOPT_METADATA)
    loaded = checkpoint.load_dist(step_dir, request)
    with torch.no_grad():
        for name, target in targets.items():
            for k, t in target.items():
                t.copy_(loaded[name][k].reshape(t.shape))
        if opt is not None and distopt:
            opt.load_state_dict(loaded["optimizer"])
            _restore_adam_step(opt, rank_state)
    if moments_in_dist:
        state = {i: {**s} for i, s in adam_sd["state"].items()}
        for i, s in state.items():
            name, p = saved[int(i)]
            for m in ADAM_MOMENTS:
                s[m] = loaded["adam"][m][name].reshape(p.shape)
        opt.load_state_dict({"param_groups": adam_sd["param_groups"], "state": state})
    elif adam_sd:
        opt.load_state_dict(adam_sd)


def _adam_step(opt) -> float:
    """The Adam step count of the torch optimizer(s) inside megatron's optimizer (one value: every param steps)."""
    steps = {float(s["step"]) for inner in inner_optimizers(opt) for s in inner.optimizer.state.values()
             if "step" in s}
    return max(steps) if steps else 0.0


def _restore_adam_step(opt, rank_state) -> None:
    """Give every parameter its own Adam ``step`` tensor with the saved count: megatron's load path without Apex/TE
    leaves one step tensor shared by all parameters, set to 1 (docs/checkpoints.md, "The Adam step")."""
    if "adam_step" not in rank_state:
        return
    for inner in inner_optimizers(opt):
        for s in inner.optimizer.state.values():
            if "step" in s:
                s["step"] = torch.tensor(float(rank_state["adam_step"]), dtype=torch.float32)
