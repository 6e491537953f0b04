"""The SPMD training program for one stage: every process torchrun starts runs this file on the same job.json.

One process (a job whose stage has tensor_parallel=1, data_parallel=1)::

    python -m trainer.train --job job.json

Two processes on this machine (data_parallel=2, tensor_parallel=2, context_parallel=2 or pipeline_parallel=2)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer.train --job job.json

Several nodes (run on each of the N nodes; HEAD is node 0's address; output_dir must be on a shared filesystem)::

    python -m torch.distributed.run --nnodes N --nproc_per_node P --rdzv_backend c10d \\
        --rdzv_endpoint HEAD:29500 --rdzv_id stage1 -m trainer.train --job job.json

(the platform launches it through TorchX: ``trainer.launch.run_stage`` / ``trainer.component.train_stage``).

The loop: resolve the runtime, join the process groups (TP, CP and PP from the stage; world = tp*cp*pp*dp), build
MUGDiT with one seed on every rank, shard it over TP (with Megatron sequence parallelism when
``stage.sequence_parallel``; and wrap every block in activation checkpointing when ``stage.recompute``), keep this
pipeline stage's part (``stage.pipeline_parallel``), AdamW; resume from ``output_dir/latest`` if present, else load
``init_checkpoint`` weights; then per step: this DP rank's ``stage.micro_batches`` micro-batches
(``trainer.data.StepSampler`` built for dp*M "virtual ranks": micro-batch m of DP rank r is virtual rank r*M+m, so
one bucket per micro-batch and token counts balanced across all micro-batches of the step), rectified-flow inputs
from a generator seeded by (seed, step, virtual rank) (identical on the TP, CP and PP ranks that share a batch),
loss / M and backward per micro-batch (gradient accumulation; with pipeline parallelism megatron-core's 1F1B
schedule runs them through the stages, ``_pipeline_forward_backward``), one gradient sync (TP partial sums, PP sums
of the replicated conditioning embedders, CP sums, DP average), global-norm clip (TP- and PP-aware), AdamW step at
``lr_at(step)`` (warmup, then constant / cosine / linear to ``min_lr``), EMA, metrics from rank 0 and a checkpoint
every ``checkpoint_interval`` steps and at the end. With M=1 the step is the computation it was before micro-batches
existed (checked once: a 3-step DP=2 run's losses, model and EMA bitwise equal to the previous trainer's).
M micro-batches of one DP rank give the weights of M DP ranks with one each (tests/test_trainer_pp.py). Bad input
(missing latents, empty split, TP not dividing the heads, PP not dividing the depth) exits with status 2 and one
message.

Metrics per step (stdout, ``metrics.jsonl``, MLflow): loss (mean over micro-batches and DP ranks; with pipeline
parallelism computed on the last stage and summed over the PP group so rank 0 has it), grad_norm, lr, step_time_s,
samples_per_s, tokens_per_s (video tokens of all micro-batches and DP ranks) and mfu = spec §6.5 model FLOPs
(``models.flops``, E = 12, so recomputation is not counted) / step time / (world size x per-process peak,
``trainer.device.peak_flops_per_s``: ``stage.peak_tflops``, else ``$VGEN_PEAK_TFLOPS``, else 989 TFLOP/s bf16 on
H100/H200, 95 GFLOP/s per thread on CPU).

Precision: bf16 autocast on GPU with fp32 parameters, gradients and AdamW state (fp32 master weights); fp32 on CPU.
Exact resume: every input of a step is a function of (seed, step) and the checkpoint holds the weights, EMA, the
AdamW state of every rank and the RNG state, so on CPU (deterministic algorithms) a run killed and rerun ends
bitwise equal to an uninterrupted one (tests/test_trainer_dist.py kills rank 1 with ``$VGEN_TEST_KILL_AFTER_STEP``).

Checkpoint format (``stage.checkpoint_format``): "full" (default) as above; "dist" adds a megatron
``dist_checkpointing`` folder ``dist/`` with the sharded model, EMA and optimizer state (torch AdamW's moments, whose
step counts and param groups stay in ``optim/``, or the distributed optimizer's state), from which resume and
``init_checkpoint`` load, resharding between TP and CP sizes (``trainer.parallel.dist_sharded_state_dict``: CP
ranks are replicas, replica ids count them like megatron's ``get_data_parallel_rank(with_context_parallel=True)``).
meta.json records tensor_parallel, context_parallel, pipeline_parallel, data_parallel and micro_batches; resuming at
another layout goes through ``trainer.checkpoint.resume_source_rank``: a changed CP always works, a changed TP with
"dist" (torch AdamW), anything else (DP, PP, micro_batches, the distributed optimizer, TP in "full") stops with both
layouts named. The full ``model.safetensors``/``ema.safetensors`` (export, evaluation, registration, the next
stage's init) are gathered to rank 0 at every checkpoint, or with ``stage.full_weights: final`` ("dist" only) just
at the stage's last step; ``python -m trainer.export --source dist`` writes them offline from any step's ``dist/``.

Pipeline parallelism (``stage.pipeline_parallel``, spec §6.4; ``trainer.parallel.apply_pipeline_parallel``): stage s
keeps blocks [s*D/pp, (s+1)*D/pp), the conditioning embedders are replicated on every stage (grads summed over PP),
x_embedder and the start/end tokens live on the first stage, the final layer and the loss on the last. The residual
stream is sent between stages by megatron-core's p2p ops (gloo on CPU) with ``variable_seq_lengths`` (shapes change
with the bucket). "full" checkpoints gather every stage's part to rank 0 (model.safetensors stays the whole model);
"dist" stores global block keys, so dist/ loads at any PP size. Verified with DP, TP (+SP), CP and recomputation
(tests/test_trainer_pp.py, and 4-process runs by hand). With the distributed optimizer the replicated embedders'
``main_grad`` is summed over the PP group in ``_train_step`` before ``ddp.finish_grad_sync()`` (before the DP
reduce-scatter: the stages' grad buffers are laid out differently, so after it an embedder's reduced slice can sit
on different DP ranks on different stages; megatron's own
``finalize_model_grads`` does its conditional-embedder sum after the DP sync and only under a config attribute
``has_cond_embedder``, so it is not used), and the copies on stages > 0 are flagged ``shared`` (megatron's
``param_is_not_shared`` in ``get_main_grads_for_grad_norm``), so the grad norm, summed over all ranks, counts them
once. Its ``dp_reshardable`` state is one ShardedTensor per bucket keyed by the TP x PP domain
(``dp_group_idx``), so each stage saves its own buckets (the embedders' Adam state once per stage, as in memory),
and the model's embedders are saved once (stage 0's replica). PP=2 + distributed optimizer = PP=1 + distributed
optimizer, and a SIGKILLed run resumes bitwise (tests/test_trainer_pp.py); by hand (4 processes, 3 steps) DP=2 x
PP=2 and TP=2 x PP=2 with it match PP=1 with it at the same DP resp. TP (grad norms <= 6.2e-8 relative).

Distributed optimizer (``stage.distributed_optimizer``, needs "dist"): megatron DDP + ``DistributedOptimizer``
(Adam state sharded over DP; without Apex/TE it wraps torch AdamW), clipping inside ``opt.step()``, the LR set on
its param groups from ``lr_at``. Its weight decay skips biases and 1-D params (megatron's default; ours applies it
to all; the default weight_decay is 0). Exact resume needed one fix: after megatron's load path on the no-Apex/TE
route (``_init_optimizer_states_with_dummy_values()``, ``sharded_state_dict(is_loading=True)`` with
``dp_reshardable``, ``load_state_dict``) every parameter's torch-AdamW ``step`` is ONE tensor shared by all the
rank's parameters, holding 1.0 (the dummy step) although the checkpoint's param groups carry the true count
(measured: 1.0 shared by 28 resp. 15 params instead of 2.0 each, after a save at step 2). Torch's single-tensor
AdamW then uses the wrong bias correction and advances the shared counter once per parameter per step, so the
resumed losses drift (step 4: 2.200741 vs 2.225655 uninterrupted). The trainer saves the Adam step count in
``optim/rankNNNNN.pt`` (``adam_step``) and after the load gives every parameter its own step tensor with that
count (``_restore_adam_step``): a resumed run is then bitwise equal to an uninterrupted one (tests/test_trainer_ckpt.py).
With context parallelism its Adam state is sharded over the DP x CP ranks and megatron DDP averages the gradients
over them, while each CP rank holds only its tokens' share of a gradient: the trainer multiplies the grad buffer by
cp before the reduce (losses equal the torch-AdamW CP=2 run's, tests/test_trainer_ckpt_cp.py).
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from common.config import to_dict
from trainer import checkpoint, device, metrics, parallel, tokens
from trainer.data import LatentDataset, StepSampler
from trainer.job import StageJob

EMA_DECAY = 0.999                  # tiny runs are a few hundred steps; MUG-V's flag value is 0.9999 (spec §4.6)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-10   # spec §5.2


def train(job: StageJob) -> None:
    stage = job.stage
    data = _check_inputs(job)
    rt = device.resolve_runtime(heavy_shim=stage.checkpoint_format == "dist" or stage.distributed_optimizer
                                or _init_from_dist(job) or stage.pipeline_parallel > 1)
    layout = device.init_distributed(stage.tensor_parallel, seed=stage.seed, runtime=rt, cp=stage.context_parallel,
                                     pp=stage.pipeline_parallel)
    try:
        if layout.world_size != stage.world_size:
            raise ValueError(f"stage '{stage.name}' needs tensor_parallel*context_parallel*pipeline_parallel*"
                             f"data_parallel = {stage.world_size} "
                             f"processes but {layout.world_size} were launched (nnodes*nproc_per_node)")
        n_micro = stage.micro_batches   # micro-batch m of DP rank r is "virtual rank" r*M+m of the sampler
        sampler = StepSampler(data.shapes, stage.micro_batch_size, layout.dp * n_micro, stage.seed,
                              patch_size=job.dit.patch_size, tokens_per_micro_batch=stage.tokens_per_micro_batch)
        model, opt, ddp, pipe = _build(job, layout, rt)
        start, ema = _restore(job, layout, model, opt, ddp)
        log = metrics.MetricsLog(job, layout, start, metrics.param_count(model, layout),
                          device.peak_flops_per_s(rt, stage.peak_tflops) * layout.world_size)
        kill_at = _test_kill_step(layout)
        for step in range(start, stage.steps):
            t0 = time.perf_counter()
            vranks = [layout.dp_rank * n_micro + m for m in range(n_micro)]
            batches = [data.batch(sampler.indices(step, v)).to(rt.device) for v in vranks]
            loss, grad_norm, lr = _train_step(job, model, opt, batches, vranks, step, layout, rt, data.meta, ddp,
                                              pipe)
            _ema_update(ema, model, EMA_DECAY)
            work = [sum(w) for w in zip(*(metrics.step_work(job.dit, b) for b in batches))]   # tokens, FLOPs
            totals = metrics.dp_sum([loss, sum(len(b.clip_ids) for b in batches), *work])   # loss, samples, ...
            log.write(step + 1, totals[0] / layout.dp, grad_norm, lr, totals[1:], time.perf_counter() - t0)
            if (step + 1) % stage.checkpoint_interval == 0 or step + 1 == stage.steps:
                _save(job, layout, model, opt, ema, step + 1, totals[0] / layout.dp, ddp)
            if step + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        device.destroy()


KILL_ENV = "VGEN_TEST_KILL_AFTER_STEP"   # tests: "RANK:STEP" makes that rank SIGKILL itself after that step


def lr_at(step: int, base_lr: float, warmup_steps: int, schedule: str = "constant", min_lr: float = 0.0,
          total_steps: int = 0) -> float:
    """The LR of 0-based ``step``: linear warmup over ``warmup_steps``, then ``schedule`` from ``base_lr`` down to
    ``min_lr`` at the last step (``total_steps - 1``): "constant" (MUG-V fine-tune: min-lr = lr), "cosine", "linear".
    A pure function of the step, so a resumed run uses the same LRs."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if schedule == "constant" or decay_steps <= 0:
        return base_lr
    frac = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "linear":
        return base_lr + (min_lr - base_lr) * frac
    raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")


def _test_kill_step(layout: device.Layout) -> int:
    """The step after which this rank kills itself (``$VGEN_TEST_KILL_AFTER_STEP=rank:step``), else -1."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return -1
    rank, step = (int(v) for v in spec.split(":"))
    return step if rank == layout.rank else -1


def _check_inputs(job: StageJob) -> LatentDataset:
    """Fail before any process group exists on inputs that cannot work."""
    tp, heads = job.stage.tensor_parallel, job.dit.num_heads
    if heads % tp or job.dit.hidden_size % tp:
        raise ValueError(f"stage '{job.stage.name}': tensor_parallel={tp} must divide dit.num_heads={heads} "
                         f"and dit.hidden_size={job.dit.hidden_size}")
    if job.dit.depth % job.stage.pipeline_parallel:
        raise ValueError(f"stage '{job.stage.name}': pipeline_parallel={job.stage.pipeline_parallel} must divide "
                         f"dit.depth={job.dit.depth} (every stage keeps depth / pipeline_parallel blocks)")
    if job.init_checkpoint and not Path(job.init_checkpoint).is_dir():
        raise FileNotFoundError(f"init_checkpoint not found: {job.init_checkpoint} (expected a step_XXXXXXXX folder)")
    # any token count works with context/sequence parallelism: the model pads it to the split (trainer/tokens.py)
    return LatentDataset(job.latents_dir, split="train", top_fraction=job.stage.top_fraction)


def _build(job: StageJob, layout: device.Layout, rt: device.Runtime):
    from models.dit import MUGDiT

    torch.manual_seed(job.stage.seed)              # the same full weights on every rank, then each keeps its shard
    model = MUGDiT(job.dit)
    model.y_embedder.dropout_prob = 0.0   # CFG drop is drawn here (force_drop_B): seeded per step, same on TP ranks
    sp = job.stage.sequence_parallel and layout.tp > 1
    if job.stage.sequence_parallel and not sp and layout.rank == 0:
        print("sequence_parallel: off (tensor_parallel=1: no TP group to split the sequence over)", flush=True)
    model = parallel.parallelize(model.to(rt.device), layout.tp, sequence_parallel=sp).train()
    if layout.cp > 1:
        tokens.apply_context_parallel(model)
    if job.stage.recompute:
        parallel.apply_activation_checkpointing(model)
    parallel.apply_pipeline_parallel(model, layout.pp, layout.pp_rank)   # pp=1: no-op
    pipe = parallel.PipelineStage(model, parallel.pipeline_config(job.dit, layout.pp, layout.tp)) \
        if layout.pp > 1 else None
    if job.stage.distributed_optimizer:
        ddp, opt = _build_distributed_optimizer(job, layout, model)
        return model, opt, ddp, pipe
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.stage.lr, betas=ADAM_BETAS,
                            eps=ADAM_EPS, weight_decay=job.stage.weight_decay)
    return model, opt, None, pipe


DISTOPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _build_distributed_optimizer(job: StageJob, layout: device.Layout, model):
    """megatron DDP (contiguous fp32 grad buffer, reduce-scatter over DP) + DistributedOptimizer (Adam state sharded
    over DP, torch AdamW inside when Apex/TE are absent); gradient clipping (``clip_grad``) happens inside it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    st = job.stage
    cfg = TransformerConfig(num_layers=1, hidden_size=job.dit.hidden_size, num_attention_heads=job.dit.num_heads,
                            tensor_model_parallel_size=layout.tp, use_cpu_initialization=True)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        overlap_param_gather=False), model)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=st.lr, min_lr=st.min_lr, weight_decay=st.weight_decay, adam_beta1=ADAM_BETAS[0],
        adam_beta2=ADAM_BETAS[1], adam_eps=ADAM_EPS, clip_grad=st.grad_clip, use_distributed_optimizer=True,
        bf16=False, fp16=False, params_dtype=torch.float32), [ddp])
    return ddp, opt


def _inner_optimizers(opt):
    return list(getattr(opt, "chained_optimizers", [opt]))


def _restore(job: StageJob, layout: device.Layout, model, opt, ddp=None) -> Tuple[int, Dict[str, torch.Tensor]]:
    """Resume from output_dir/latest, else weights from init_checkpoint, else scratch. Returns (step, ema).

    Resume reads the per-rank file ``checkpoint.load_rank_state`` picks: the layout that wrote the checkpoint
    (meta.json) resumes exactly; a changed context_parallel (or, for "dist" checkpoints with the Adam moments in
    ``dist/``, tensor_parallel) resumes resharded; any other change is a ``CheckpointError`` naming both layouts.
    ``checkpoint_format: dist``: weights, EMA and the Adam moments (or the distributed optimizer's state) come from
    the step folder's ``dist/``, resharded to this TP/CP layout; an ``init_checkpoint`` with ``dist/`` loads from it
    (any TP/CP size wrote it), also in a "full" stage when the folder has no ``model.safetensors`` (``full_weights:
    final`` before the last step)."""
    last, start = checkpoint.latest(job.output_dir), 0
    fmt = job.stage.checkpoint_format
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if last is not None:
        meta = checkpoint.read_meta(last)
        saved = (meta.get("checkpoint_format", "full"), bool(meta.get("distributed_optimizer", False)))
        if saved != (fmt, job.stage.distributed_optimizer):
            raise checkpoint.CheckpointError(
                f"cannot resume {last}: it was saved with checkpoint_format={saved[0]}, distributed_optimizer="
                f"{saved[1]}, this stage has {fmt}/{job.stage.distributed_optimizer}; use a new output_dir and "
                "pass this step folder as init_checkpoint (weights only)")
        state = checkpoint.load_rank_state(last, layout, job.stage.micro_batches)
        if state["resharded"] and layout.rank == 0:
            print(f"resuming {last.name} (saved with {checkpoint.layout_str(checkpoint.saved_layout(meta))}) "
                  f"resharded to tensor_parallel={layout.tp}, context_parallel={layout.cp}, "
                  f"data_parallel={layout.dp}", flush=True)
        if fmt == "dist":
            _load_dist(last, model, ema, opt, state, distopt=ddp is not None)
        else:
            parallel.load_full_state_dict(model, checkpoint.load_weights(last))
            for k, v in parallel.shard_full_state_dict(model, checkpoint.load_weights(last, ema=True)).items():
                ema[k].copy_(v)
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
    elif job.init_checkpoint:
        if _init_from_dist(job):
            _load_dist(job.init_checkpoint, model)
        else:
            parallel.load_full_state_dict(model, checkpoint.load_weights(job.init_checkpoint))
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return start, ema


def _init_from_dist(job: StageJob) -> bool:
    """Whether ``init_checkpoint``'s weights are read from its ``dist/`` (needs the heavy CPU shim, see ``train``)."""
    init = job.init_checkpoint
    if not init or not checkpoint.has_dist(init):
        return False
    return job.stage.checkpoint_format == "dist" or not checkpoint.has_full_weights(init)


def _trainable(model):
    """(name, param) of the parameters the optimizer holds, in its order (the same for every TP size)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _adam_moments_sharded(model, opt) -> Dict[str, Dict[str, object]]:
    """The torch AdamW moments as dist_checkpointing ShardedTensors ("adam.exp_avg.<param>", ...): the same global
    layout as the weights, so they reshard over TP and CP with them."""
    named = [(n, p) for n, p in _trainable(model) if p in opt.state]
    return {m: parallel.dist_sharded_state_dict({n: opt.state[p][m] for n, p in named}, f"adam.{m}.")
            for m in ADAM_MOMENTS}


def _optimizer_without_moments(opt) -> dict:
    """``opt.state_dict()`` minus the Adam moments (in ``dist/``): param groups and per-parameter step counts."""
    sd = opt.state_dict()
    return {"param_groups": sd["param_groups"],
            "state": {i: {k: v for k, v in s.items() if k not in ADAM_MOMENTS} for i, s in sd["state"].items()}}


def _load_dist(step_dir, model, ema=None, opt=None, rank_state=None, distopt=False) -> None:
    """Load ``dist/`` into the model (and the EMA and the optimizer when given), resharding over TP and CP.

    ``opt``: the distributed optimizer (``distopt``: its state is in ``dist/``), or torch AdamW, whose moments are in
    ``dist/`` when ``rank_state["optimizer"]`` was saved without them (else, older checkpoints, all of its state is
    in ``rank_state``)."""
    local = model.state_dict()
    request = {"model": parallel.dist_sharded_state_dict(local, "model.")}
    if ema is not None:
        request["ema"] = parallel.dist_sharded_state_dict(ema, "ema.")
    adam_sd = rank_state.get("optimizer") if rank_state is not None and opt is not None and not distopt else None
    trainable = _trainable(model)
    moments_in_dist = adam_sd is not None and bool(rank_state.get("optimizer_in_dist"))
    if moments_in_dist:
        saved = {int(i): trainable[int(i)] for i in adam_sd["state"]}
        request["adam"] = {m: parallel.dist_sharded_state_dict({n: torch.empty_like(p) for n, p in saved.values()},
                                                               f"adam.{m}.") for m in ADAM_MOMENTS}
    if opt is not None and distopt:
        for inner in _inner_optimizers(opt):   # the no-Apex path has no Adam state until a first step
            inner._init_optimizer_states_with_dummy_values()
        request["optimizer"] = opt.sharded_state_dict({}, is_loading=True, metadata=DISTOPT_METADATA)
    loaded = checkpoint.load_dist(step_dir, request)
    with torch.no_grad():
        for name, target in (("model", local), ("ema", ema)):
            if name in loaded:
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
    elif adam_sd is not None:
        opt.load_state_dict(adam_sd)


def _adam_step(opt) -> float:
    """The Adam step count of the torch optimizer(s) inside megatron's optimizer (one value: every param steps)."""
    steps = {float(s["step"]) for inner in _inner_optimizers(opt) for s in inner.optimizer.state.values()
             if "step" in s}
    return max(steps) if steps else 0.0


def _restore_adam_step(opt, rank_state) -> None:
    """Give every parameter its own Adam ``step`` tensor with the saved count (see the module docstring)."""
    if rank_state is None or "adam_step" not in rank_state:
        return
    for inner in _inner_optimizers(opt):
        for s in inner.optimizer.state.values():
            if "step" in s:
                s["step"] = torch.tensor(float(rank_state["adam_step"]), dtype=torch.float32)


def _step_generator(seed: int, step: int, dp_rank: int) -> torch.Generator:
    mixed = np.random.SeedSequence([seed, step, dp_rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)


def flow_inputs(job: StageJob, latents_BCTHW: torch.Tensor, step: int, dp_rank: int, vae_downsample: int = 8):
    """(noise, t_B, x_t, drop_B) for a step: CPU generator, so identical on all TP ranks and on any device."""
    from models import rectified_flow as rf

    b, _, frames, h, w = latents_BCTHW.shape
    g = _step_generator(job.stage.seed, step, dp_rank)
    noise = torch.randn(latents_BCTHW.shape, generator=g).to(latents_BCTHW.device)
    t_B = rf.sample_t(b, g, job.flow.t_loc, job.flow.t_scale)
    if job.flow.use_shift:   # spec §4.2: pixel H/W (latent x VAE factor), F = latent frames
        t_B = rf.shift_t(t_B, h * vae_downsample, w * vae_downsample, frames)
    drop_B = torch.rand(b, generator=g) < job.dit.caption_dropout_prob
    t_B = t_B.to(latents_BCTHW.device)
    return noise, t_B, rf.interpolate(latents_BCTHW, noise, t_B), drop_B.to(latents_BCTHW.device)


def _train_step(job: StageJob, model, opt, batches, vranks, step: int, layout: device.Layout, rt: device.Runtime,
                data_meta: dict, ddp=None, pipe=None) -> Tuple[float, float, float]:
    """One optimizer step over this DP rank's micro-batches (``batches``, sampled for virtual ranks ``vranks``):
    each micro-batch's loss / M is backpropagated and the gradients accumulate, then they are synced once (TP
    partial sums, PP sums of the replicated embedders, CP sums, DP average), clipped and applied. With pipeline
    parallelism (``pipe``) megatron's 1F1B schedule runs the micro-batches through the stages. Returns (loss: the
    mean over the micro-batches, on every rank; grad norm; lr)."""
    from models import rectified_flow as rf

    factor = int(data_meta.get("vae", {}).get("config", {}).get("spatial_downsample", 8))
    micro = [(b, *flow_inputs(job, b.latents_BCTHW, step, v, factor)) for b, v in zip(batches, vranks)]
    n_micro = len(micro)
    st = job.stage
    lr = lr_at(step, st.lr, st.warmup_steps, st.lr_schedule, st.min_lr, st.steps)
    if ddp is not None:
        ddp.zero_grad_buffer()
        opt.zero_grad()
    else:
        opt.zero_grad(set_to_none=True)
    if pipe is not None:
        loss_value = _pipeline_forward_backward(pipe, micro, layout, rt)
    else:
        losses = []
        for b, noise, t_B, x_t, drop_B in micro:
            with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.autocast):
                v_BCTHW = model(x_t, t_B, b.text_BLD, b.text_mask_BL, force_drop_B=drop_B)
            loss = rf.flow_loss(v_BCTHW.float(), b.latents_BCTHW, noise).mean()
            (loss / n_micro if n_micro > 1 else loss).backward()   # accumulate: the gradient of the mean loss
            losses.append(float(loss.detach()))
        loss_value = losses[0] if n_micro == 1 else sum(losses) / n_micro
    if ddp is not None:   # megatron DDP + DistributedOptimizer: grads in ddp's buffer, clipping inside opt.step()
        from megatron.core import parallel_state
        if layout.tp > 1:   # per-head QK-norm grads (and SP's chunk grads) are partial over TP (trainer/parallel.py)
            parallel._all_reduce_flat([p.main_grad for p in model.parameters()
                                       if p.requires_grad and parallel.partial_over_tp(p)],
                                      parallel_state.get_tensor_model_parallel_group())
        if layout.pp > 1:   # the replicated conditioning embedders: each stage holds its blocks' partial sum
            parallel._all_reduce_flat([p.main_grad for p in model.parameters()
                                       if p.requires_grad and getattr(p, "_pp_replicated", False)],
                                      parallel_state.get_pipeline_model_parallel_group())
        if layout.cp > 1:   # CP ranks hold their tokens' share of each gradient; DDP averages over DP x CP ranks
            ddp.scale_gradients(float(layout.cp))   # so x cp: the reduce then sums over CP and averages over DP
        ddp.finish_grad_sync()   # reduce-scatter over DP x CP, pre-scaled by 1/(dp*cp)
        for group in opt.param_groups:
            group["lr"] = lr
        ok, grad_norm, _ = opt.step()
        if not ok:
            raise RuntimeError(f"step {step + 1}: the distributed optimizer skipped the update (inf/nan gradients)")
        return loss_value, float(grad_norm), lr
    params = [p for p in model.parameters() if p.requires_grad]
    parallel.sync_gradients(params)
    grad_norm = parallel.clip_grad_norm_tp(params, job.stage.grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return loss_value, grad_norm, lr


def _pipeline_forward_backward(pipe, micro, layout: device.Layout, rt: device.Runtime) -> float:
    """Forward and backward of the micro-batches through the pipeline stages with megatron-core's schedule
    (``get_forward_backward_func``: 1F1B without interleaving, shapes sent ahead of every activation since the token
    count changes with the bucket). The last stage computes the losses; the schedule scales each by 1/M (and by the
    CP size, undone here). Returns the mean loss, sent from the last stage to every stage of the pipeline."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from models import rectified_flow as rf

    losses = []

    def forward_step(data_iterator, stage):
        b, noise, t_B, x_t, drop_B = next(data_iterator)
        with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.autocast):
            out = stage(x_t, t_B, b.text_BLD, b.text_mask_BL, force_drop_B=drop_B)

        def loss_func(v_BCTHW):
            loss = rf.flow_loss(v_BCTHW.float(), b.latents_BCTHW, noise).mean()
            losses.append(float(loss.detach()))
            return (loss / layout.cp if layout.cp > 1 else loss), {}
        return out, loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=pipe,
                                num_microbatches=len(micro), seq_length=1, micro_batch_size=1, forward_only=False)
    last = layout.pp_rank == layout.pp - 1
    value = (losses[0] if len(losses) == 1 else sum(losses) / len(losses)) if last else 0.0
    return metrics.group_sum([value], parallel_state.get_pipeline_model_parallel_group())[0]


@torch.no_grad()
def _ema_update(ema: Dict[str, torch.Tensor], model, decay: float) -> None:
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v, 1.0 - decay)
        else:
            ema[k].copy_(v)


def _save(job: StageJob, layout: device.Layout, model, opt, ema, step: int, loss: float, ddp=None) -> None:
    """Write step folder ``step`` (collective). The full weights are gathered to rank 0 unless ``full_weights:
    final`` and this is not the stage's last step; "dist" also saves the weights, EMA and optimizer state sharded."""
    st = job.stage
    dist_fmt = st.checkpoint_format == "dist"
    write_full = not dist_fmt or st.full_weights == "every" or step >= st.steps
    full = full_ema = None
    if write_full:   # collective over TP (and PP: rank 0 gets every stage's part)
        full, full_ema = parallel.gather_full_state_dict(model), parallel.gather_full_state_dict(model, ema)
    meta = {"stage": st.name, "config_hash": job.config_hash, "tensor_parallel": layout.tp,
            "context_parallel": layout.cp, "pipeline_parallel": layout.pp, "data_parallel": layout.dp,
            "micro_batches": st.micro_batches, "dit": to_dict(job.dit), "loss": loss,
            "checkpoint_format": st.checkpoint_format, "distributed_optimizer": st.distributed_optimizer,
            "optimizer_in_dist": dist_fmt, "full_weights": write_full,
            "sequence_parallel": st.sequence_parallel and layout.tp > 1}
    rank_state = {"rng": torch.get_rng_state()}
    if ddp is not None:
        rank_state["adam_step"] = _adam_step(opt)
    elif dist_fmt:   # the moments go to dist/ (reshardable); steps and param groups stay here
        rank_state["optimizer"], rank_state["optimizer_in_dist"] = _optimizer_without_moments(opt), True
    else:
        rank_state["optimizer"] = opt.state_dict()
    dist_state = None
    if dist_fmt:
        dist_state = {"model": parallel.dist_sharded_state_dict(model.state_dict(), "model."),
                      "ema": parallel.dist_sharded_state_dict(ema, "ema.")}
        if ddp is not None:
            dist_state["optimizer"] = opt.sharded_state_dict({}, metadata=DISTOPT_METADATA)
        else:
            dist_state["adam"] = _adam_moments_sharded(model, opt)
    root = layout.rank == 0
    checkpoint.save(job.output_dir, step, rank=layout.rank, model_sd=full if root else None,
                    ema_sd=full_ema if root else None, rank_state=rank_state, meta=meta,
                    keep=st.keep_checkpoints, dist_state=dist_state)
    if root:
        print(f"saved {Path(job.output_dir) / checkpoint.step_name(step)}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True, help="path of a StageJob JSON file (trainer/job.py)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="When using async grad allreduce")  # the component sets it on GPU
    warnings.filterwarnings("ignore", message=r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            "is deprecated")   # megatron's sequence-parallel collectives
    try:
        train(StageJob.read(args.job))
    except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
        print(f"trainer.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
