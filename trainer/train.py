"""The SPMD training program for one stage: every process torchrun starts runs this file on the same job.json.

One process (a job whose stage has tensor_parallel=1, data_parallel=1)::

    python -m trainer.train --job job.json

Two processes on this machine (data_parallel=2, tensor_parallel=2, context_parallel=2 or pipeline_parallel=2)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer.train --job job.json

Several nodes (run on each of the N nodes; HEAD is node 0's address; output_dir must be on a shared filesystem)::

    python -m torch.distributed.run --nnodes N --nproc_per_node P --rdzv_backend c10d \\
        --rdzv_endpoint HEAD:29500 --rdzv_id stage1 -m trainer.train --job job.json

(the platform launches it through TorchX: ``trainer.launch.run_stage`` / ``trainer.component.stage_app``).

The loop: resolve the runtime and the process groups (``trainer.device``; world = tp*cp*pp*dp), build MUGDiT with one
seed on every rank, ``trainer.parallel.parallelize`` it (the returned ``ParallelPlan`` goes to everything after),
build the optimizer (``trainer.optim``), restore (``trainer.state``), then per step: this DP rank's
``stage.micro_batches`` micro-batches, rectified-flow inputs from a generator seeded by (seed, step, virtual rank),
loss / M and backward per micro-batch (megatron's 1F1B schedule with pipeline parallelism), one gradient sync, clip,
optimizer step at ``lr_at(step)``, EMA, metrics from rank 0 and a checkpoint every ``checkpoint_interval`` steps.
Before the first step rank 0 prints the attention kernels the blocks run with (``attention_backends``) and sets them
as the MLflow tag ``attention_backend`` of the stage's run. ``VGEN_PROFILE_STEPS=START:COUNT`` profiles those steps
on every rank (``trainer.profiling``: a timeline and an op table per rank in the stage's ``profile/`` folder).
What is not the model hides behind it (docs/parallelism.md, "A step without idle time"): the next step's
micro-batches are built in a thread (``stage.prefetch``), the DP gradient reduce runs in buckets during the last
micro-batch's backward (``stage.overlap_grad_reduce``), AdamW is fused / foreach (``stage.optimizer_impl``),
checkpoints are written in a thread (``stage.async_checkpoint``) and on CUDA the forward uses bf16 weight copies
refreshed once per step (``stage.bf16_weights``, ``trainer.precision``; with ``distributed_optimizer`` the
parameters are bf16 and megatron's optimizer keeps the fp32 masters).
Every input of a step is a function of (seed, step), so on CPU a run killed and rerun ends bitwise equal to an
uninterrupted one. Bad input exits with status 2 and one message. docs/parallelism.md and docs/checkpoints.md say
how each parallelism and the checkpoint state work and what was measured.

Objectives (docs/post_training.md): ``flow`` trains the rectified-flow loss on a LatentDataset, each micro-batch on
one task of ``stage.task_mix`` (``trainer.tasks``: t2v, i2v, t2i, its loss times the task's weight); ``flow_dpo``
trains Flow-DPO (``trainer.preference``) on the pairs of a PreferencePairs folder against a frozen reference: the
init_checkpoint's weights, i.e. the same model with its LoRA adapters off (``stage.lora_rank`` > 0,
``models.lora``) or a second copy parallelised like the policy.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch

from models import compile as dit_compile
from models import lora
from models import rectified_flow as rf
from trainer import checkpoint, device, metrics, optim, precision, preference, profiling, state
from trainer.data import Batch, LatentSplit, PairBatch, PairSplit, Prefetcher, StepSampler
from trainer.job import StageJob
from trainer.parallel import ParallelPlan, parallelize
from trainer.parallel.grads import OverlappedGradReduce, clip_grad_norm, group_sum, sync_gradients, sync_main_grads
from trainer.parallel.pipeline import PipelineStage, pipeline_config, pipeline_forward_backward
from trainer.precision import Bf16Weights
from trainer.tasks import check_task_shapes, draw_task, task_batch

KILL_ENV = "VGEN_TEST_KILL_AFTER_STEP"   # tests: "RANK:STEP" makes that rank SIGKILL itself after that step
                                         # (once that step's checkpoint, if any, is written: a known resume point)


def train(job: StageJob) -> None:
    stage = job.stage
    data, vae_factor = _check_inputs(job)
    rt = device.resolve_runtime(heavy_shim=state.needs_dist_load(job) or stage.distributed_optimizer
                                or stage.pipeline_parallel > 1)
    layout = device.init_distributed(stage.tensor_parallel, seed=stage.seed, runtime=rt, cp=stage.context_parallel,
                                     pp=stage.pipeline_parallel)
    batches: Optional[Prefetcher] = None
    prof: Optional[profiling.StepProfiler] = None
    try:
        if layout.world_size != stage.world_size:
            raise ValueError(f"stage '{stage.name}' needs tensor_parallel*context_parallel*pipeline_parallel*"
                             f"data_parallel = {stage.world_size} "
                             f"processes but {layout.world_size} were launched (nnodes*nproc_per_node)")
        n_micro = stage.micro_batches   # micro-batch m of DP rank r is "virtual rank" r*M+m of the sampler
        dpo = stage.objective == "flow_dpo"
        budget = stage.tokens_per_micro_batch   # flow_dpo: a pair is two clips of the bucket's tokens
        sampler = StepSampler(data.shapes, stage.micro_batch_size, layout.dp * n_micro, stage.seed,
                              patch_size=tuple(job.dit.patch_size),
                              tokens_per_micro_batch=max(1, budget // 2) if dpo and budget else budget)
        bf16_on = _bf16_weights(stage, rt)
        model, plan, opt, ddp, pipe = _build(job, layout, rt, bf16_params=bf16_on and stage.distributed_optimizer)
        start, ema = state.restore(job, plan, model, opt, ddp)
        masters = precision.MegatronMasters.of(opt, model) if ddp is not None else None   # bf16 params, fp32 masters
        reference = _reference(job, layout, rt, model, plan, pipe) if dpo else None
        log = metrics.MetricsLog(job, plan, start, metrics.param_count(plan, model),
                                 device.peak_flops_per_s(rt, stage.peak_tflops) * layout.world_size)
        bf16 = Bf16Weights(model) if bf16_on and ddp is None else None   # its hooks before the overlap's
        if bf16_on:
            rt = dataclasses.replace(rt, dtype=precision.DTYPE)   # the forward under bf16 autocast (CPU: "on")
            if layout.rank == 0:
                print("bf16_weights: the forward runs on bf16 weights, the optimizer on fp32 masters "
                      f"({'sharded in the distributed optimizer' if masters else 'torch AdamW'})", flush=True)
        if layout.rank == 0:   # which attention kernels this stage trains with: the log and an MLflow tag
            kernels = attention_backends(job, rt, model, bf16_copies=bf16 is not None)
            print(f"attention: {kernels} ({rt.device.type}, forward {str(rt.dtype).replace('torch.', '')}, "
                  f"compile {stage.compile})", flush=True)
            log.tags({"attention_backend": kernels})
        overlap = OverlappedGradReduce(plan, model, n_micro, stage.grad_bucket_mb,
                                       grad_of=bf16.grad_or_zero if bf16 is not None else None) \
            if stage.overlap_grad_reduce and ddp is None else None
        writer = checkpoint.Writer(checkpoint.background_barrier()) if stage.async_checkpoint else None
        vranks = [layout.dp_rank * n_micro + m for m in range(n_micro)]
        batches = Prefetcher(lambda step: [micro_batch(job, data.batch(sampler.indices(step, v)).to(rt.device), step,
                                                       v, vae_factor) for v in vranks],
                             start, stage.steps, enabled=stage.prefetch)
        kill_at = _test_kill_step(layout)
        prof = profiling.StepProfiler.from_env(Path(job.output_dir), layout.rank, rt.device, start + 1, stage.steps)
        for step in range(start, stage.steps):
            prof.begin(step + 1)
            t0 = time.perf_counter()
            micro = batches.get(step)   # made while the previous step computed (prefetch); starts the next one's
            res = train_step(job, plan, model, opt, micro, step, rt, ddp, pipe, reference, overlap, bf16)
            if masters is not None:   # the EMA of the fp32 masters, not of their bf16 roundings
                masters.ema_update(ema, model, optim.EMA_DECAY)
            else:
                optim.ema_update(ema, model, optim.EMA_DECAY)
            work = [sum(w) for w in zip(*(metrics.step_work(job.dit, m.batch, reference_forward=dpo)
                                          for m in micro))]   # tokens, FLOPs
            sums = _step_sums(stage, micro, res, data)   # per-task/-resolution samples or Flow-DPO sums
            totals = metrics.dp_sum(plan, [res.loss, sum(len(m.batch.clip_ids) for m in micro), *work,
                                           *sums.values()])
            log.write(step + 1, totals[0] / layout.dp, res.grad_norm, res.lr, totals[1:4], time.perf_counter() - t0,
                      extra=_step_metrics(dict(zip(sums, totals[4:]))))
            if (step + 1) % stage.checkpoint_interval == 0 or step + 1 == stage.steps:
                state.save(job, plan, model, opt, ema, step + 1, totals[0] / layout.dp, ddp, writer)
            prof.end(step + 1)   # $VGEN_PROFILE_STEPS (trainer.profiling): this rank's trace and table
            if step + 1 == kill_at:
                if writer is not None:
                    writer.wait()   # the test's crash point is "after step N, its checkpoint on disk"
                os.kill(os.getpid(), signal.SIGKILL)
        batches.close()
        if writer is not None:
            writer.wait()   # the last step folder is complete before the stage reports success
        if overlap is not None and overlap.active and layout.rank == 0:
            print(f"overlap_grad_reduce: {overlap.overlapped} of {len(overlap.buckets)} gradient buckets were "
                  "all-reduced during the last step's backward", flush=True)
        log.close()   # MLflow metrics still queued (a server outage) are sent now, or counted as lost
    finally:
        if prof is not None:      # a failed step inside $VGEN_PROFILE_STEPS' window: what it recorded
            prof.close()
        if batches is not None:   # a failed step: stop making the next one (a checkpoint being written is left to
            batches.close()       # its daemon thread: its folder stays .tmp-, never taken for a checkpoint)
        if stage.compile != "none":   # inductor's compile-worker pool: its processes outlive a torchrun worker
            from torch._inductor.async_compile import shutdown_compile_workers
            shutdown_compile_workers()
        device.destroy()


ATTENTION_PROBE_TOKENS = 64   # query and key length of attention_backends' probe tensors: small, so the probe costs
                              # nothing. models/attention.py's rule reads device, dtype, mask and compile; SDPA's own
                              # choice reads dtype, head_dim, mask and grad; whether a GPU SDPA backend also refuses
                              # some lengths was not checked (no GPU here), so on CUDA the tag may name a kernel
                              # that a stage's real lengths would not get


def attention_backends(job: StageJob, rt: device.Runtime, model, bf16_copies: bool = False) -> str:
    """The kernels ``models.attention`` runs for this rank's DiT blocks in training: "self=<kernel> cross=<kernel>"
    in ``attention_backend``'s names (the stage's MLflow tag ``attention_backend`` and its startup line).

    Probed on small tensors (``ATTENTION_PROBE_TOKENS``) with this rank's heads (num_heads / tensor_parallel),
    the DiT's head_dim and requires_grad, under the forward's autocast (``rt``), and as compiled blocks see it
    (``stage.compile``: compiled blocks take SDPA for the masked cross-attention). q and k have the dtype the blocks
    hand to ``attention``: their QK-norm multiplies by its weight, so they are bf16 only where the weights are
    (``bf16_copies``: ``trainer.precision.Bf16Weights``; else the norm weights' dtype, bf16 with the distributed
    optimizer's bf16 parameters); v has the autocast dtype. With fp32 weights under autocast q and k are fp32:
    flash-attn is not taken, SDPA runs on autocast's bf16 casts."""
    from models.attention import attention_backend
    from models.dit import RMSNorm

    norm = next((m.weight for m in model.modules() if isinstance(m, RMSNorm)), None)
    weights = precision.DTYPE if bf16_copies else (norm.dtype if norm is not None else torch.float32)
    qk_dtype = torch.promote_types(rt.dtype, weights)   # RMSNorm: weight * the normed activation (autocast dtype)
    heads = max(1, job.dit.num_heads // job.stage.tensor_parallel)

    def probe(dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(1, heads, ATTENTION_PROBE_TOKENS, job.dit.head_dim, device=rt.device, dtype=dtype,
                           requires_grad=True)

    q, k, v = probe(qk_dtype), probe(qk_dtype), probe(rt.dtype)
    keep_B11S = torch.ones(1, 1, 1, ATTENTION_PROBE_TOKENS, dtype=torch.bool, device=rt.device)
    compiling = job.stage.compile != "none"
    with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.autocast):
        return (f"self={attention_backend(q, k, v, compiling=compiling)} "
                f"cross={attention_backend(q, k, v, mask=keep_B11S, compiling=compiling)}")


def _bf16_weights(stage, rt: device.Runtime) -> bool:
    """``stage.bf16_weights`` resolved (``trainer.precision.bf16_weights_on``); "on" on CPU is for tests."""
    return precision.bf16_weights_on(stage.bf16_weights, rt.dtype, stage.pipeline_parallel)


def _test_kill_step(layout: device.Layout) -> int:
    """The step after which this rank kills itself (``$VGEN_TEST_KILL_AFTER_STEP=rank:step``), else -1."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return -1
    rank, step = (int(v) for v in spec.split(":"))
    return step if rank == layout.rank else -1


def _check_inputs(job: StageJob) -> Tuple[LatentSplit | PairSplit, int]:
    """(the train split, the VAE's spatial downsampling factor); fails before any process group exists on inputs
    that cannot work (the layout was checked at config load)."""
    if job.init_checkpoint and not Path(job.init_checkpoint).is_dir():
        raise FileNotFoundError(f"init_checkpoint not found: {job.init_checkpoint} (expected a step_XXXXXXXX folder)")
    stage = job.stage
    data: LatentSplit | PairSplit
    if stage.objective == "flow_dpo":   # a PreferencePairs folder: every pair (top_fraction and the mix: config)
        data = PairSplit(job.latents_dir)
    else:
        data = LatentSplit(job.latents_dir, split="train", top_fraction=stage.top_fraction, quality=stage.quality,
                           selection=stage.data, stage_name=stage.name)
        check_task_shapes(stage, data.clip_ids, data.shapes, job.dit.patch_size)
    return data, data.reader.vae_spatial_downsample


def _build(job: StageJob, layout: device.Layout, rt: device.Runtime, bf16_params: bool = False):
    """(model, plan, optimizer, megatron DDP or None, pipeline stage or None) of this rank. ``bf16_params``: the
    distributed optimizer's bf16 parameters with fp32 masters (``trainer.optim.build_optimizer``)."""
    from models.dit import MUGDiT

    torch.manual_seed(job.stage.seed)              # the same full weights on every rank, then each keeps its shard
    model = MUGDiT(job.dit)
    model.y_embedder.dropout_prob = 0.0   # CFG drop is drawn here (force_drop_B): seeded per step, same on TP ranks
    if job.stage.sequence_parallel and layout.tp == 1 and layout.rank == 0:
        print("sequence_parallel: off (tensor_parallel=1: no TP group to split the sequence over)", flush=True)
    model = model.to(rt.device)
    plan = parallelize(model, layout, sequence_parallel=job.stage.sequence_parallel, recompute=job.stage.recompute,
                       lora_rank=job.stage.lora_rank, lora_alpha=job.stage.lora_alpha)
    model.train()
    compiled = dit_compile.apply(model, job.stage.compile)   # stage.compile "blocks": each block via torch.compile
    if compiled and layout.rank == 0:
        print(f"compile: {compiled} blocks through torch.compile (the first step of each shape compiles)", flush=True)
    pipe = PipelineStage(model, plan, pipeline_config(job.dit, layout.pp, layout.tp)) if layout.pp > 1 else None
    opt, ddp = optim.build_optimizer(job.stage, job.dit, model, plan, bf16_params=bf16_params)
    return model, plan, opt, ddp, pipe


@dataclass
class Reference:
    """Flow-DPO's frozen reference: ``model`` run inside ``mode()`` (the policy with its LoRA adapters off, or a
    second frozen copy of the init weights with a no-op mode); ``pipe``: its pipeline stage (pipeline parallelism)."""
    model: Any
    mode: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    pipe: Optional[PipelineStage] = None


def _reference(job: StageJob, layout: device.Layout, rt: device.Runtime, model, plan: ParallelPlan,
               pipe: Optional[PipelineStage]) -> Reference:
    """The init_checkpoint's weights, frozen: with LoRA the same model with its adapters switched off (no second
    copy); else a second MUGDiT built and parallelised like the policy and loaded from the init_checkpoint (the
    seeded init without one: the policy's step-0 weights). Rebuilt on every start, never saved."""
    if plan.lora_rank > 0:
        return Reference(model, lambda: lora.adapters_off(model), pipe)
    from models.dit import MUGDiT

    with torch.random.fork_rng(devices=[]):   # the policy's RNG stream is untouched (exact resume)
        torch.manual_seed(job.stage.seed)
        ref = MUGDiT(job.dit)
    ref.y_embedder.dropout_prob = 0.0
    ref = ref.to(rt.device)
    ref_plan = parallelize(ref, layout, sequence_parallel=job.stage.sequence_parallel)
    state.load_init_weights(job, ref_plan, ref)
    ref.requires_grad_(False)
    ref.eval()
    ref_pipe = PipelineStage(ref, ref_plan, pipe.config) if pipe is not None else None
    return Reference(ref, pipe=ref_pipe)


@dataclass
class MicroBatch:
    """One micro-batch with its rectified-flow inputs and its task (flow) or pairs (flow_dpo)."""
    batch: Batch
    noise: torch.Tensor
    t_B: torch.Tensor
    x_t: torch.Tensor
    drop_B: torch.Tensor      # caption dropout (CFG): drawn here, seeded, so TP/CP/PP ranks agree
    task: str = "t2v"
    loss_weight: float = 1.0
    cond_BT: Optional[torch.Tensor] = None   # i2v: True on the clean conditioning latent frames (out of the loss)


@dataclass
class StepResult:
    loss: float               # mean over the micro-batches, on every rank
    grad_norm: float
    lr: float
    dpo: Dict[str, float] = field(default_factory=dict)   # flow_dpo: trainer.preference.dpo_sums over micro-batches


def _step_generator(seed: int, step: int, vrank: int) -> torch.Generator:
    mixed = np.random.SeedSequence([seed, step, vrank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)


def micro_batch(job: StageJob, batch: Batch, step: int, vrank: int, vae_factor: int) -> MicroBatch:
    """The flow-matching inputs of a micro-batch: a CPU generator seeded by (seed, step, virtual rank), so they are
    identical on all TP, CP and PP ranks and on any device. ``flow``: the micro-batch's task is drawn from its own
    generator (``trainer.tasks.draw_task``) and shapes the batch (t2i: frame 0) and the condition (i2v: frame 0);
    ``flow_dpo`` (a ``PairBatch``): noise, t and caption drop once per pair, shared by winner and loser."""
    g = _step_generator(job.stage.seed, step, vrank)
    if isinstance(batch, PairBatch):
        x_t, t_B, noise, drop_B = preference.pair_flow_inputs(
            batch.latents_BCTHW, g, job.flow.t_loc, job.flow.t_scale, job.flow.use_shift, vae_spatial=vae_factor,
            drop_prob=job.dit.caption_dropout_prob)
        return MicroBatch(batch, noise, t_B, x_t, drop_B)
    share = draw_task(job.stage.task_mix, job.stage.seed, step, vrank, image=batch.latents_BCTHW.shape[2] == 1)
    batch, cond_BT = task_batch(batch, share.task)
    x_t, t_B, noise = rf.training_step_inputs(batch.latents_BCTHW, g, job.flow.t_loc, job.flow.t_scale,
                                              job.flow.use_shift, cond_mask=cond_BT, vae_spatial=vae_factor)
    drop_B = torch.rand(len(batch.clip_ids), generator=g) < job.dit.caption_dropout_prob
    return MicroBatch(batch, noise, t_B, x_t, drop_B.to(batch.latents_BCTHW.device), share.task, share.loss_weight,
                      cond_BT)


def _forward(model, m: MicroBatch, rt: device.Runtime) -> torch.Tensor:
    cond = {} if m.cond_BT is None else {"cond_mask_BT": m.cond_BT}
    with torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.autocast):
        return model(m.x_t, m.t_B, m.batch.text_BLD, m.batch.text_mask_BL, force_drop_B=m.drop_B, **cond)


def _loss(v_BCTHW: torch.Tensor, m: MicroBatch) -> torch.Tensor:
    """The micro-batch's flow loss (generated frames only: i2v leaves its condition out) times its task's weight."""
    frame_mask_BT = None if m.cond_BT is None else ~m.cond_BT
    loss = rf.flow_loss(v_BCTHW.float(), m.batch.latents_BCTHW, m.noise, frame_mask_BT=frame_mask_BT).mean()
    return loss if m.loss_weight == 1.0 else loss * m.loss_weight


def _dpo_loss(model, reference: Reference, m: MicroBatch, rt: device.Runtime, beta: float
              ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Flow-DPO on the micro-batch's pairs: the reference's per-sample errors without gradient, then the policy's."""
    x0, batch = m.batch.latents_BCTHW, m.batch
    assert isinstance(batch, PairBatch)
    with torch.no_grad(), reference.mode():
        e_ref_2B = rf.flow_loss(_forward(reference.model, m, rt).float(), x0, m.noise)
    e_2B = rf.flow_loss(_forward(model, m, rt).float(), x0, m.noise)
    delta_B = preference.dpo_delta(e_2B, e_ref_2B)
    return (preference.flow_dpo_loss(delta_B, beta, batch.weight_B),
            preference.dpo_sums(delta_B, e_2B.detach(), e_ref_2B, beta))


def train_step(job: StageJob, plan: ParallelPlan, model, opt, micro: List[MicroBatch], step: int,
               rt: device.Runtime, ddp=None, pipe=None, reference: Optional[Reference] = None,
               overlap: Optional[OverlappedGradReduce] = None, bf16: Optional[Bf16Weights] = None) -> StepResult:
    """One optimizer step over this DP rank's micro-batches (``micro_batch``): each micro-batch's loss / M is
    backpropagated and the gradients accumulate, then they are synced once, clipped and applied. ``reference``:
    Flow-DPO's (the objective is then flow_dpo). ``overlap``: the torch path's DP reduce, started during the last
    micro-batch's backward (megatron DDP's own overlap: ``ddp.ddp_config.overlap_grad_reduce``, micro-batches but
    the last under ``ddp.no_sync()``). ``bf16``: the forward and backward run on the bf16 copies of the weights,
    the optimizer on the fp32 masters (``trainer.precision``). Returns the mean loss over the micro-batches (on
    every rank), the grad norm, the LR and, for Flow-DPO, the summed ``preference.dpo_sums``."""
    n_micro = len(micro)
    st = job.stage
    lr = optim.lr_at(step, st.lr, st.warmup_steps, st.lr_schedule, st.min_lr, st.steps)
    if ddp is not None:
        ddp.zero_grad_buffer()
        opt.zero_grad()
    else:
        opt.zero_grad(set_to_none=True)
    dpo: Dict[str, float] = {}
    if bf16 is not None:
        bf16.begin()
    if pipe is not None and reference is not None:
        loss_value, dpo = _pipeline_dpo(pipe, reference, micro, plan, rt, st.dpo_beta)
    elif pipe is not None:
        loss_value = pipeline_forward_backward(pipe, micro, plan, lambda s, m: _forward(s, m, rt), _loss)
    else:
        losses = []
        for i, m in enumerate(micro):
            with ddp.no_sync() if ddp is not None and i < n_micro - 1 else contextlib.nullcontext():
                if reference is not None:
                    loss, sums = _dpo_loss(model, reference, m, rt, st.dpo_beta)
                    dpo = {k: dpo.get(k, 0.0) + v for k, v in sums.items()}
                else:
                    loss = _loss(_forward(model, m, rt), m)
                (loss / n_micro if n_micro > 1 else loss).backward()   # accumulate: the gradient of the mean loss
            losses.append(float(loss.detach()))
        loss_value = losses[0] if n_micro == 1 else sum(losses) / n_micro
    if bf16 is not None:
        bf16.end()
    optim.set_lr(opt, lr)
    if ddp is not None:   # megatron DDP + DistributedOptimizer: grads in ddp's buffer, clipping inside opt.step()
        if ddp.ddp_config.overlap_grad_reduce:   # reduce-scatter launched during the backward: wait, then TP / CP
            ddp.finish_grad_sync()
            sync_main_grads(plan, model, ddp, reduced=True)
        else:
            sync_main_grads(plan, model, ddp)
            ddp.finish_grad_sync()
        ok, grad_norm, _ = opt.step()
        if not ok:
            raise RuntimeError(f"step {step + 1}: the distributed optimizer skipped the update (inf/nan gradients)")
        return StepResult(loss_value, float(grad_norm), lr, dpo)
    overlap.finish() if overlap is not None else sync_gradients(plan, model)
    grad_norm = clip_grad_norm(plan, model, job.stage.grad_clip)
    opt.step()
    if bf16 is not None:
        bf16.refresh()
    return StepResult(loss_value, grad_norm, lr, dpo)


def _pipeline_dpo(pipe: PipelineStage, reference: Reference, micro: List[MicroBatch], plan: ParallelPlan,
                  rt: device.Runtime, beta: float) -> Tuple[float, Dict[str, float]]:
    """Flow-DPO through the pipeline: a forward-only pass of the reference keeps its per-sample errors on the last
    stage, then the policy's 1F1B pass takes the DPO loss there. Returns (mean loss, the DPO sums), both sent from
    the last stage to every stage."""
    assert reference.pipe is not None
    e_ref: Dict[int, torch.Tensor] = {}

    def keep_reference_error(v: torch.Tensor, m: MicroBatch) -> torch.Tensor:
        e_ref[id(m)] = rf.flow_loss(v.float(), m.batch.latents_BCTHW, m.noise)
        return e_ref[id(m)].mean()

    with torch.no_grad(), reference.mode():
        pipeline_forward_backward(reference.pipe, micro, plan, lambda s, m: _forward(s, m, rt), keep_reference_error,
                                  forward_only=True)
    sums = {k: 0.0 for k in preference.SUMS}

    def dpo_loss(v: torch.Tensor, m: MicroBatch) -> torch.Tensor:
        assert isinstance(m.batch, PairBatch)
        e_2B = rf.flow_loss(v.float(), m.batch.latents_BCTHW, m.noise)
        delta_B = preference.dpo_delta(e_2B, e_ref[id(m)])
        for k, value in preference.dpo_sums(delta_B, e_2B.detach(), e_ref[id(m)], beta).items():
            sums[k] += value
        return preference.flow_dpo_loss(delta_B, beta, m.batch.weight_B)

    loss = pipeline_forward_backward(pipe, micro, plan, lambda s, m: _forward(s, m, rt), dpo_loss)
    return loss, dict(zip(sums, group_sum(list(sums.values()), plan.layout.groups.pp)))


def _step_sums(stage, micro: List[MicroBatch], res: StepResult, data: LatentSplit | PairSplit) -> Dict[str, float]:
    """This rank's numbers that metrics.jsonl adds up over DP: samples per task ("task_<name>", for a mix of more
    than one task) and per resolution bucket ("res_<name>", for data of more than one), or the Flow-DPO sums; {} for
    a plain stage (its rows keep their keys)."""
    if res.dpo:
        return res.dpo
    counts: Dict[str, float] = {}
    if len(stage.task_mix) > 1:
        counts = {f"task_{t.task}": 0.0 for t in stage.task_mix}
        for m in micro:
            counts[f"task_{m.task}"] += len(m.batch.clip_ids)
    of = data.resolution_of if isinstance(data, LatentSplit) else {}
    names = sorted(set(of.values()))
    if len(names) > 1:
        counts.update({f"res_{n}": 0.0 for n in names})
        for m in micro:
            for c in m.batch.clip_ids:
                counts[f"res_{of[c]}"] += 1
    return counts


def _step_metrics(sums: Dict[str, float]) -> Dict[str, float]:
    """The extra metrics of a step from its DP-summed ``_step_sums``."""
    return preference.dpo_metrics(sums) if "pairs" in sums else sums


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
