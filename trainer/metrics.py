"""Per-step training metrics: FLOPs and tokens of a micro-batch, DP sums, and rank 0's log (stdout, metrics.jsonl,
MLflow).

    log = MetricsLog(job, plan, start_step, param_count(plan, model), peak_flops_per_s)
    log.write(step, loss, grad_norm, lr, dp_sum(plan, [samples, tokens, flops]), seconds)
    log.tags({"attention_backend": "self=sdpa:FLASH_ATTENTION cross=sdpa:FLASH_ATTENTION"})   # MLflow run tags
    log.close()   # end of the stage: the MLflow metrics still queued are sent (or counted as lost)

Per step: loss (mean over micro-batches and DP ranks), grad_norm, lr, step_time_s, samples_per_s, tokens_per_s
(video tokens of all micro-batches and DP ranks) and mfu = the report's model FLOPs (``models.flops``, E = 12,
docs/mugv.md §6.5; recomputation is not counted; Flow-DPO adds the reference's forward, E = 4) / step time / the
peak of all processes together (``trainer.device.peak_flops_per_s``), tokens_per_sample (video tokens per sample
of the step: the resolution and length the curriculum trains at). Only where they apply, after those: samples per
task of a mix of several tasks (``task_t2v``, ``task_i2v``, ``task_t2i``), samples per resolution bucket of data
with several (``res_<name>``, e.g. ``res_360p``) and the Flow-DPO metrics
(``dpo_implicit_acc``, ``dpo_reward_margin``, ``dpo_kl_proxy``; a pair is two samples).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from models.config import DiTConfig
from models.flops import dit_forward_flops, dit_train_flops, video_tokens
from trainer.data import Batch
from trainer.job import StageJob
from trainer.parallel.grads import group_sum


def step_work(dit: DiTConfig, batch: Batch, reference_forward: bool = False) -> Tuple[int, float]:
    """(video tokens, model FLOPs of forward + backward) of this rank's micro-batch (E = 12: the recomputation,
    when on, is not counted, so the MFU stays a model-FLOPs utilisation); ``reference_forward``: plus a forward of
    the same batch (Flow-DPO's reference)."""
    shape = tuple(batch.latents_BCTHW.shape)
    b, per_sample = video_tokens(dit, shape)
    flops = dit_train_flops(dit, shape)
    return b * per_sample, flops + dit_forward_flops(dit, shape) if reference_forward else flops


def dp_sum(plan, values) -> list:
    """Sum a few numbers over the data-parallel group (float64, one all_reduce)."""
    return group_sum(values, plan.layout.groups.dp)


def param_count(plan, model) -> int:
    """The unsharded model's parameters (collective over PP: each stage counts its part, the replicated
    conditioning embedders once)."""
    layout = plan.layout
    n = sum(p.numel() * (layout.tp if plan.role(name).tp else 1) for name, p in model.named_parameters()
            if not (layout.pp_rank > 0 and plan.role(name).pp_replicated))
    if layout.pp == 1:
        return n
    return int(group_sum([n], layout.groups.pp)[0])


class MetricsLog:
    """Rank 0 only: a stdout line, a metrics.jsonl line and (when configured) MLflow metrics per step. MLflow gets
    them through ``trainer.mlflow_buffer.MetricsSender``: an unreachable server never slows or stops training, the
    metrics wait in a bounded buffer and are sent when it is back (``close`` says how many were lost, if any)."""

    def __init__(self, job: StageJob, plan, start: int, n_params: int, peak_flops_per_s: float):
        layout = plan.layout
        self.on, self.peak = layout.rank == 0, peak_flops_per_s   # peak of all processes together
        self.path = Path(job.output_dir) / "metrics.jsonl"
        self.sender, self.run_id = None, job.mlflow_run_id
        if not self.on:
            return
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)
        if self.path.is_file():   # drop lines of steps after the checkpoint we resume from (they will be redone)
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if job.mlflow_tracking_uri:
            from trainer.mlflow_buffer import MetricsSender
            self.sender = MetricsSender(job.mlflow_tracking_uri, job.mlflow_run_id)
        sp = "on" if plan.sequence_parallel else "off"
        st = job.stage
        extra = (f" objective={st.objective}" if st.objective != "flow" else "") + \
            (f" lora_rank={plan.lora_rank}" if plan.lora_rank else "") + \
            (" task_mix=" + ",".join(f"{t.task}:{t.ratio:g}x{t.loss_weight:g}" for t in st.task_mix)
             if len(st.task_mix) > 1 or st.task_mix[0].task != "t2v" else "")
        print(f"stage={job.stage.name} world={layout.world_size} tp={layout.tp} cp={layout.cp} pp={layout.pp} "
              f"dp={layout.dp} sp={sp} micro_batches={job.stage.micro_batches} params={n_params} "
              f"start_step={start} steps={job.stage.steps} recompute={job.stage.recompute} "
              f"peak_tflops={self.peak / 1e12:.3f}{extra}", flush=True)

    def tags(self, tags: Dict[str, str]) -> None:
        """Set run tags of the stage's MLflow run (rank 0; queued like the metrics, never waits on the server)."""
        if self.sender is not None:
            self.sender.put_tags(tags)

    def write(self, step: int, loss: float, grad_norm: float, lr: float, work, seconds: float,
              extra: Optional[Dict[str, float]] = None) -> None:
        """``work`` = (samples, video tokens, model FLOPs) of the whole step, summed over micro-batches and DP
        ranks; ``extra``: more metrics of the step (per-task samples, Flow-DPO), appended to the row."""
        if not self.on:
            return
        samples, tokens, flops = work
        mfu = flops / seconds / self.peak if self.peak > 0 else float("nan")
        rec = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "step_time_s": seconds,
               "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "mfu": mfu,
               "tokens_per_sample": tokens / max(samples, 1), **(extra or {})}
        more = "".join(f" {k}={v:.4g}" for k, v in (extra or {}).items())
        print(f"step={step} loss={loss:.6f} grad_norm={grad_norm:.4f} lr={lr:.3e} step_time={seconds:.3f}s "
              f"samples_per_s={samples / seconds:.2f} tokens_per_s={tokens / seconds:.1f} mfu={mfu:.4f}{more}",
              flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.sender is not None:   # queued, sent by a background thread: never waits on the server
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self.sender.put([Metric(k, float(v), now, step) for k, v in rec.items()
                             if k != "step" and math.isfinite(v)])

    def close(self) -> int:
        """End of the stage: send the MLflow metrics still queued (at most ``$VGEN_MLFLOW_FLUSH_TIMEOUT_S``, 60 s);
        returns how many never reached MLflow (one warning line says so). Safe to call twice."""
        sender, self.sender = self.sender, None
        return sender.close() if sender is not None else 0
