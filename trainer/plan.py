"""Layout planner: which TP x CP x PP x DP layouts of a stage fit in GPU memory, and how fast each would train.

    python -m trainer.plan --config configs/mugv_10b.yaml --gpus 128 --gpu-memory-gb 80   # every stage, ranked

    from trainer.plan import Layout, Sample, peak_memory, step_time
    mem = peak_memory(dit, Layout(tp=4, sp=True, recompute=True), Sample(tokens=50400, batch=1, text=300))
    mem.total, mem.activations, mem.parts()        # bytes per GPU (the worst pipeline stage), with the breakdown
    t = step_time(dit, Layout(tp=4, sp=True, recompute=True, dp=32), Sample(50400, 1, 300), (1, 14, 90, 160))
    t.seconds, t.mfu, t.parts()

Pure functions of the model's shapes and a layout; torch is not imported. What is counted is what this trainer
stores (trainer/optim.py, trainer/device.py, trainer/state.py, docs/parallelism.md), per GPU:

- weights: fp32 masters; with ``bf16_weights`` (the GPU default) also a bf16 copy the forward reads (megatron's
  distributed optimizer: the parameters are bf16 and its fp32 main params are sharded over DP x CP); gradients: fp32
  (``param.grad`` or the bf16 path's fp32 sums, or megatron DDP's contiguous fp32 grad buffer); AdamW's exp_avg and
  exp_avg_sq: fp32, sharded over DP x CP with ``distributed_optimizer``; the EMA: a fp32 copy of this rank's state
  dict (never sharded);
- on GPU the forward runs under bf16 autocast: without ``bf16_weights`` autocast caches a bf16 copy of every weight a
  matmul reads until the forward ends (and the backward keeps them when nothing is recomputed);
- activations: the tensors autograd saves, term by term (``BLOCK_TERMS``, ``TEXT_TERMS``, ``OUTSIDE_TERMS``), from
  the block's code (models/dit.py) with their dtype under autocast (fp32 on CPU) and how TP, SP and CP split them;
  with recomputation only each block's input is kept and one block's activations exist at a time; with PP the first
  stage holds min(pp, micro-batches) micro-batches in flight (1F1B);
- the inputs (latents, noise, x_t, caption embedding: ``INPUT_TERMS``) of the micro-batches built but not in flight:
  the trainer builds all of a step's micro-batches before the step, and with ``prefetch`` the next step's during it;
- the optimizer step's temporaries (``optimizer``: torch AdamW's foreach path one fp32 copy of the optimised
  parameters, the per-tensor path two of the largest tensor, the fused kernel none);
- a fixed workspace (``WORKSPACE_BYTES``).

Checked against measured peaks on CPU at tiny sizes (tests/test_planner.py); not checked on a GPU at the 10B shapes
(no GPU was lent to that task). Every constant below names its source or says it is an assumption.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from models.config import DiTConfig
from models.flops import dit_train_flops

GIB = 2 ** 30   # "GB" in this tool: 2^30 bytes, as nvidia-smi and torch.cuda report (an "80 GB" H100 has 80 GiB)
FP32, BF16 = 4, 2

# --- hardware: per GPU ---------------------------------------------------------------------------------------------
PEAK_FLOPS = 989e12   # H100/H200 SXM dense bf16, datasheet (= trainer.device.PEAK_FLOPS_GPU_BF16; docs/mugv.md §6.5)
DEFAULT_EFFICIENCY = 0.40   # assumption when bench/results has no GPU run: docs/mugv.md §6.5's worked example (40 %)
BENCH_RESULT = Path(__file__).resolve().parents[1] / "bench" / "results" / "dit_step_cuda.json"
NVLINK_BYTES_PER_S = 360e9   # assumption: NCCL bus bandwidth in a node, ~80 % of NVLink 4's 450 GB/s per direction
#                              (H100/H200 SXM); not measured: the lent H200 was one GPU (bench/README.md)
INTERNODE_BYTES_PER_S = 40e9   # assumption: one 400 Gb/s NIC per GPU (DGX H100/H200: 8 x ConnectX-7) = 50 GB/s, ~80 %
HBM_BYTES_PER_S = 2.7e12   # assumption: ~80 % of the H100 SXM's 3.35 TB/s (H200: 4.8): the optimizer step and EMA
GPUS_PER_NODE = 8          # default; the CLI reads train.launch.gpu
WORKSPACE_BYTES = 4 * GIB  # assumption: CUDA context (~0.6 GB), cuBLAS/cuDNN workspaces, NCCL buffers of the
#                            TP/CP/DP/PP communicators and caching-allocator fragmentation (small with
#                            PYTORCH_CUDA_ALLOC_CONF=expandable_segments, docs/mugv.md §6.3)


# --- activations: what autograd saves ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One saved tensor, per token: ``elems(dit)`` elements, of ``kind``: "f" fp32 always (LayerNorm outputs, the
    fp32 residual stream, per-token modulation tables, softmax statistics), "c" the compute dtype (bf16 under
    autocast, fp32 on CPU), "a" fp32 and only under autocast (an upcast copy that in fp32 is the same storage as
    another term); split by ``split``: "seq" (CP's chunk, and TP's with sequence parallelism), "head" (CP's chunk
    and TP's heads), "kv" (TP's heads, and the full sequence: CP all-gathers K and V), "kv_cp" (the same, only with
    CP > 1: otherwise a view of qkv), "tp" (TP only: text), "cp" (CP only: RoPE angles), "full" (every rank holds
    the whole micro-batch)."""
    name: str
    elems: Callable[[DiTConfig], float]
    kind: str
    split: str


def _h(k: float) -> Callable[[DiTConfig], float]:
    return lambda d: k * d.hidden_size


def _heads(k: float) -> Callable[[DiTConfig], float]:
    return lambda d: k * d.num_heads


def _mlp(k: float) -> Callable[[DiTConfig], float]:
    return lambda d: k * int(d.hidden_size * d.mlp_ratio)


def _patch(k: float) -> Callable[[DiTConfig], float]:
    return lambda d: k * d.in_channels * math.prod(d.patch_size)


# One MUGDiTBlock per video token (models/dit.py; order of the forward). Measured on CPU with saved_tensors_hooks
# (fp32 and bf16 autocast): the sum is exact at B=1 (tests/test_planner.py).
BLOCK_TERMS: Tuple[Term, ...] = (
    Term("x_in", _h(1), "f", "seq"),             # block input (fp32 residual stream), saved by LayerNorm
    Term("ln_stats", lambda d: 2, "f", "seq"),   # LayerNorm mean, rstd
    Term("ln_out", _h(1), "f", "seq"),           # saved by modulate's x * (1 + scale)
    Term("one_plus_scale", _h(1), "f", "seq"),   # 1 + scale_msa (fp32: the table is fp32)
    Term("qkv_in", _h(1), "c", "seq"),           # modulated input cast for qkv (SP: megatron keeps the chunk)
    Term("qkv_out", _h(3), "c", "head"),         # the qkv output (v is a view of it)
    Term("qk_upcast", _h(2), "a", "head"),       # RMSNorm's x.float() of q and k
    Term("qk_rstd", _heads(2), "f", "head"),
    Term("qk_normed", _h(2), "c", "head"),       # saved by the norm weight's multiply
    Term("q_sdpa", _h(1), "c", "head"),          # the roped q (RoPE itself saves only cos/sin)
    Term("k_sdpa", _h(1), "c", "kv"),            # the roped k, all-gathered over CP
    Term("v_gathered", _h(1), "c", "kv_cp"),     # CP's all-gathered v
    Term("attn_out", _h(1), "c", "head"),
    Term("attn_lse", _heads(1), "f", "head"),    # softmax log-sum-exp
    Term("proj_in", _h(1), "c", "head"),         # head-major attention output copied for proj (CPU SDPA: measured;
    #                                              a view on GPU kernels that return (B, L, H, D): conservative there)
    Term("proj_out", _h(1), "c", "seq"),         # saved by gate_msa * attn
    Term("mod_table", _h(6), "f", "seq"),        # scale_shift_table + tmod: [B, L, 6, h] fp32, sliced by unbind
    Term("x1", _h(1), "f", "seq"),               # cross-attention LayerNorm input
    Term("ln2_stats", lambda d: 2, "f", "seq"),
    Term("q_in", _h(1), "c", "seq"),
    Term("q_upcast", _h(1), "f", "head"),        # fp32: the q_linear output itself; autocast: its x.float()
    Term("q_rstd", _heads(1), "f", "head"),
    Term("q_normed", _h(1), "c", "head"),
    Term("xq_sdpa", _h(1), "c", "head"),
    Term("xattn_out", _h(1), "c", "head"),       # also proj's input (a view): the cross proj output is not saved
    Term("xattn_lse", _heads(1), "f", "head"),
    Term("x2", _h(1), "f", "seq"),               # MLP LayerNorm input
    Term("ln3_stats", lambda d: 2, "f", "seq"),
    Term("ln3_out", _h(1), "f", "seq"),
    Term("one_plus_scale_mlp", _h(1), "f", "seq"),
    Term("fc1_in", _h(1), "c", "seq"),
    Term("fc1_out", _mlp(1), "c", "head"),       # saved by GELU
    Term("gelu_out", _mlp(1), "c", "head"),      # saved by fc2
    Term("fc2_out", _h(1), "c", "seq"),          # saved by gate_mlp * mlp
)
# One block per text token (cross-attention K/V of the caption; the text is replicated over CP and SP).
TEXT_TERMS: Tuple[Term, ...] = (
    Term("y_cast", _h(1), "ac", "full"),          # autocast only: each block's bf16 copy of the fp32 text
    Term("kv_out", _h(2), "c", "tp"),
    Term("k_upcast", _h(1), "a", "tp"),
    Term("k_rstd", _heads(1), "f", "tp"),
    Term("k_normed", _h(1), "c", "tp"),
    Term("k_sdpa", _h(1), "c", "tp"),
)
# Outside the blocks, per video token. Alive until the forward returns (the conditioning every block reads; with
# recomputation the checkpoints keep tmod, RoPE and the text for the backward too):
FORWARD_TERMS: Tuple[Term, ...] = (
    Term("tmod", _h(6), "c", "seq"),             # t_block's per-token modulation [B, L, 6, h], read by every block
    Term("c_final", _h(1), "c", "seq"),          # the final layer's per-token conditioning
)
# Saved, or alive for the whole step:
OUTSIDE_TERMS: Tuple[Term, ...] = (
    Term("rope", lambda d: d.head_dim, "f", "cp"),   # cos and sin [L, head_dim / 2] each
    Term("data", _patch(3), "f", "full"),        # latents, noise, x_t of the micro-batch
    Term("embed_in", _patch(1), "ac", "full"),   # x_t cast for the patch embedding (every rank embeds every token)
)
# The final layer and the loss (last pipeline stage): LayerNorm input and output, 1 + scale, the linear's input, the
# squared error's input (the velocity half, fp32)
HEAD_TERMS: Tuple[Term, ...] = (
    Term("head", _h(3), "f", "seq"),
    Term("head_stats", lambda d: 2, "f", "seq"),
    Term("head_in", _h(1), "c", "seq"),
    Term("loss", _patch(1), "f", "full"),
)
# A micro-batch's inputs, which the trainer builds before its step starts (all of the step's micro-batches, and with
# prefetch the next step's during this one): per video token (as "data" above) and per caption token
INPUT_TERMS: Tuple[Term, ...] = tuple(t for t in OUTSIDE_TERMS if t.name == "data")
TEXT_INPUT_TERMS: Tuple[Term, ...] = (Term("text_in", lambda d: d.caption_channels, "f", "full"),)   # fp32 embedding
TEXT_OUTSIDE: Tuple[Term, ...] = (               # caption embedder per text token
    Term("text_ln", lambda d: 2 * d.caption_channels, "c", "full"),   # text (cast) and LayerNorm output
    Term("caption_mlp", _h(3), "c", "full"),     # fc1 out, GELU out, fc2 out
    Term("y", _h(1), "f", "full"),               # post-norm output: the y every block reads
)


OPTIMIZERS = ("fused", "foreach", "for_loop")


@dataclass(frozen=True)
class Layout:
    """One candidate layout of a stage (the StageConfig fields of the same names)."""
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    sp: bool = False
    recompute: bool = False
    micro_batches: int = 1            # per DP rank per step (1F1B's m with PP)
    distributed_optimizer: bool = False
    autocast: bool = True             # GPU: bf16 autocast; False: the CPU trainer (all fp32)
    optimizer: str = "fused"          # torch AdamW's kernel (stage.optimizer_impl; "auto" is "fused" on CUDA):
    #                                   "fused" | "foreach" | "for_loop" (trainer/optim.py)
    bf16_weights: bool = False        # stage.bf16_weights: bf16 parameters for the forward, fp32 masters
    overlap_grad_reduce: bool = True  # stage.overlap_grad_reduce: the DP reduce runs during the last backward
    #                                   (trainer/precision.py; megatron's bf16 main params with the dist. optimizer)
    prefetch: bool = False            # stage.prefetch: the next step's micro-batches are built during this step

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Layout.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def describe(self) -> str:
        return (f"TP {self.tp} CP {self.cp} PP {self.pp} DP {self.dp}, SP {'on' if self.sp else 'off'}, "
                f"recompute {'on' if self.recompute else 'off'}")


@dataclass(frozen=True)
class Sample:
    """One micro-batch: ``batch`` samples of ``tokens`` video tokens each, ``text`` caption tokens per sample."""
    tokens: int
    batch: int = 1
    text: int = 300


def _split(t: Term, lay: Layout) -> float:
    seq = lay.tp if lay.sp else 1
    return {"seq": lay.cp * seq, "head": lay.cp * lay.tp, "kv": lay.tp, "kv_cp": lay.tp, "tp": lay.tp,
            "cp": lay.cp, "full": 1}[t.split]


def _bytes(t: Term, lay: Layout) -> int:
    """Bytes per element of a term, 0 where it does not exist in this precision."""
    if t.kind == "f":
        return FP32
    if t.kind == "c":
        return BF16 if lay.autocast else FP32
    return (FP32 if t.kind == "a" else BF16) if lay.autocast else 0


def seq_tokens(tokens: int, lay: Layout) -> int:
    """The sequence a sample runs as: [start, video, end] padded to a multiple of cp (x tp with SP) (models/dit.py)."""
    mult = lay.cp * (lay.tp if lay.sp else 1)
    return -(-(tokens + 2) // mult) * mult


def terms_bytes(terms: Sequence[Term], dit: DiTConfig, lay: Layout, tokens: float) -> Dict[str, float]:
    """Bytes per GPU of each term for ``tokens`` tokens (of one micro-batch, all samples)."""
    out = {}
    for t in terms:
        if t.split == "kv_cp" and lay.cp == 1:
            continue
        out[t.name] = t.elems(dit) * _bytes(t, lay) * tokens / _split(t, lay)
    return out


def block_activation_bytes(dit: DiTConfig, lay: Layout, s: Sample) -> float:
    """What one block saves for the backward, per GPU, for one micro-batch (no recomputation)."""
    L = seq_tokens(s.tokens, lay) * s.batch
    return (sum(terms_bytes(BLOCK_TERMS, dit, lay, L).values())
            + sum(terms_bytes(TEXT_TERMS, dit, lay, s.text * s.batch).values()))


def backward_working_bytes(dit: DiTConfig, lay: Layout, s: Sample) -> float:
    """Gradients alive beyond the saved tensors inside one block's backward: the MLP hidden's (GELU's output
    gradient while its input gradient is made; the saved GELU output is freed by then) and the residual stream's
    (in and out, fp32). An assumption from autograd's order, checked against the measured peak on CPU."""
    L = seq_tokens(s.tokens, lay) * s.batch
    c = BF16 if lay.autocast else FP32
    return L * (int(dit.hidden_size * dit.mlp_ratio) * c / (lay.cp * lay.tp)
                + 2 * dit.hidden_size * FP32 / (lay.cp * (lay.tp if lay.sp else 1)))


# --- parameters ----------------------------------------------------------------------------------------------------
def param_counts(dit: DiTConfig, lay: Layout) -> Tuple[float, float]:
    """(parameters this rank holds, of which matmul weights autocast casts) on the first pipeline stage, which holds
    the most: its blocks (TP shards of the block linears; the norms, tables and row-parallel biases replicated), the
    conditioning embedders (on every stage), x_embedder and the start/end tokens (docs/mugv.md §3.2)."""
    h, hd, C = dit.hidden_size, dit.head_dim, dit.caption_channels
    f = int(h * dit.mlp_ratio)
    sharded = 3 * h * h + 3 * h + h * h + h * h + h + 2 * h * h + 2 * h + h * h + h * f + f + f * h   # + col. biases
    replicated = 3 * h + 4 * hd + 2 * h + 6 * h          # row-parallel biases, q/k RMSNorms, cross LayerNorm, table
    blocks = dit.depth // lay.pp
    block = sharded / lay.tp + replicated
    block_mm = (3 * h * h + h * h + h * h + 2 * h * h + h * h + h * f + f * h) / lay.tp
    patch = dit.in_channels * math.prod(dit.patch_size)
    embed_t = 2 * (256 * h + h + h * h + h)              # t and fps embedders (FREQ_DIM 256)
    cond = embed_t + h * 6 * h + 6 * h + (C * h + h + h * h + h)   # + t_block + caption MLP
    first = patch * h + h + 2 * h                         # x_embedder, start/end tokens
    last = h * 2 * patch + 2 * patch + 2 * h              # final layer (only when pp == 1 on the first stage)
    total = blocks * block + cond + first + (last if lay.pp == 1 else 0)
    mm = blocks * block_mm + 2 * (256 * h + h * h) + 6 * h * h + C * h + h * h + patch * h + (
        h * 2 * patch if lay.pp == 1 else 0)
    return total, mm


@dataclass
class Memory:
    """Peak bytes per GPU and its parts (``parts()``), for the first pipeline stage (the one that holds the most)."""
    weights: float
    grads: float
    adam: float
    ema: float
    activations: float        # the forward/backward's transient peak (autocast's bf16 weight copies included)
    autocast_weights: float   # of which autocast's weight copies
    step_temp: float
    workspace: float
    what: str = ""            # how the activations were counted
    detail: Dict[str, float] = field(default_factory=dict)
    inputs: float = 0.0       # the inputs of the micro-batches built but not in flight (this step's, the next's)

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.adam + self.ema

    @property
    def total(self) -> float:
        return self.states + self.inputs + max(self.activations, self.step_temp) + self.workspace

    def parts(self) -> Dict[str, float]:
        return dict(weights=self.weights, grads=self.grads, adam=self.adam, ema=self.ema, inputs=self.inputs,
                    activations=self.activations, autocast_weights=self.autocast_weights,
                    step_temp=self.step_temp, workspace=self.workspace, total=self.total)


def peak_memory(dit: DiTConfig, lay: Layout, s: Sample, workspace: float = WORKSPACE_BYTES) -> Memory:
    """Peak memory per GPU of a training step (forward, backward, optimizer step) of micro-batch ``s`` in ``lay``."""
    n, mm = param_counts(dit, lay)
    shard = lay.dp * lay.cp if lay.distributed_optimizer else 1
    L = seq_tokens(s.tokens, lay) * s.batch
    inflight = min(lay.pp, lay.micro_batches)

    def total(terms: Sequence[Term], tokens: float) -> float:
        return sum(terms_bytes(terms, dit, lay, tokens).values())

    block = block_activation_bytes(dit, lay, s)
    fwd_alive = total(FORWARD_TERMS, L)
    outside = total(OUTSIDE_TERMS, L) + total(TEXT_OUTSIDE, s.text * s.batch)
    head = total(HEAD_TERMS, L) if lay.pp == 1 else 0.0      # the first stage holds the head only without PP
    blocks = dit.depth // lay.pp
    work = backward_working_bytes(dit, lay, s)
    # autocast's bf16 weight copies, cached until the forward ends; none when the parameters already are bf16
    cast = BF16 * mm if lay.autocast and not lay.bf16_weights else 0.0
    if lay.recompute:   # every micro-batch in flight keeps its block inputs and conditioning; one block rebuilt
        kept = inflight * (total(BLOCK_TERMS[:1], L) * blocks + fwd_alive + outside)
        acts = kept + max(head + cast, block + work)
        what = f"{inflight} x {blocks} block inputs + 1 block recomputed"
    else:               # end of the forward: everything saved, the conditioning still alive, the bf16 weights
        saved = inflight * (blocks * block + outside) + head
        acts = saved + max(fwd_alive + cast, work)
        what = f"{inflight} x {blocks} blocks saved"
    # the optimizer step: torch AdamW's foreach path makes one fp32 temporary per optimised parameter (the sqrt of
    # exp_avg_sq); the per-tensor path two of the largest tensor (sqrt, then the division); the fused kernel none
    largest = max(dit.hidden_size * int(dit.hidden_size * dit.mlp_ratio) / lay.tp, dit.caption_channels
                  * dit.hidden_size, 6 * dit.hidden_size ** 2)
    step_temp = {"fused": 0.0, "foreach": FP32 * n / shard, "for_loop": 2 * FP32 * largest}[lay.optimizer]
    # the weights: fp32 masters, plus their bf16 forward copies with bf16_weights (the torch AdamW path keeps whole
    # masters; megatron's distributed optimizer keeps the parameters in bf16 and its fp32 main params sharded)
    if lay.bf16_weights:
        weights = BF16 * n + FP32 * n / shard
    else:
        weights = FP32 * n
    # the inputs of the micro-batches that are built but not in flight: the rest of this step's (the trainer builds
    # them all before the step) and, with prefetch, the next step's (built on the GPU while this one computes)
    waiting = lay.micro_batches - inflight + (lay.micro_batches if lay.prefetch else 0)
    inputs = waiting * (total(INPUT_TERMS, s.tokens * s.batch) + total(TEXT_INPUT_TERMS, s.text * s.batch))
    return Memory(weights=weights, grads=FP32 * n, adam=2 * FP32 * n / shard, ema=FP32 * n, activations=acts,
                  autocast_weights=cast, step_temp=step_temp, workspace=workspace, what=what,
                  detail=dict(block=block, outside=outside, forward=fwd_alive, head=head, backward_work=work),
                  inputs=inputs)


# --- step time -----------------------------------------------------------------------------------------------------
def measured_efficiency(path: Path = BENCH_RESULT) -> Tuple[float, str]:
    """(fraction of the datasheet peak, its source): bench/results/dit_step_cuda.json's measured MFU of the DiT
    blocks' forward + backward at 10B layer shapes (H200, bf16), else ``DEFAULT_EFFICIENCY``."""
    try:
        r = json.loads(Path(path).read_text())["modes"]["bf16"]
        return float(r["mfu_vs_datasheet"]), (f"measured: {Path(path).name} (H200, 10B layer, "
                                              f"{r['analytic_flops'] / r['step_s_median'] / 1e12:.0f} TFLOP/s)")
    except (OSError, KeyError, ValueError, TypeError):
        return DEFAULT_EFFICIENCY, "assumption: docs/mugv.md §6.5 (no bench/results/dit_step_cuda.json)"


@dataclass
class StepTime:
    seconds: float
    mfu: float
    compute: float     # per step: (m + pp - 1) micro-batch slots of compute ...
    tp_comm: float     # ... and of TP/SP collectives
    cp_comm: float     # ... CP K/V all-gathers
    pp_comm: float     # ... stage-to-stage sends
    dp_comm: float     # the gradient reduce not hidden by the backward (+ the distributed optimizer's all-gather)
    optimizer: float   # AdamW + EMA over HBM
    casts: float       # bf16 weight casts over HBM: autocast's in every forward, or bf16_weights' one refresh
    bubble: float      # (pp - 1) / (m + pp - 1)

    def parts(self) -> Dict[str, float]:
        return dict(compute=self.compute, tp_comm=self.tp_comm, cp_comm=self.cp_comm, pp_comm=self.pp_comm,
                    dp_comm=self.dp_comm, optimizer=self.optimizer, casts=self.casts, bubble=self.bubble,
                    seconds=self.seconds,
                    mfu=self.mfu)


def _bw(group_span: int, gpus_per_node: int) -> float:
    return NVLINK_BYTES_PER_S if group_span <= gpus_per_node else INTERNODE_BYTES_PER_S


def step_time(dit: DiTConfig, lay: Layout, s: Sample, latent_shape: Sequence[int], peak: float = PEAK_FLOPS,
              efficiency: Optional[float] = None, gpus_per_node: int = GPUS_PER_NODE) -> StepTime:
    """Estimated seconds of one optimizer step when every micro-batch is ``s`` (latent ``(b, t, h, w)`` of one
    sample), and its MFU (model FLOPs with E = 12 over the datasheet peak, docs/mugv.md §6.5).

    compute = hardware FLOPs (E = 16 with recomputation) / (tp cp pp) / (peak x efficiency) per micro-batch;
    TP: per block 3 all-reduces forward and 3 backward of the [tokens, h] bf16 activations (megatron's row/column
    linears; with SP the all-gather + reduce-scatter pairs plus the backward's re-gather of the saved chunks: 7.5),
    3 more when recomputing, at 2 (tp-1)/tp x bytes / NVLink (not overlapped: megatron's local layers);
    CP: all-gather of K and V forward, reduce-scatter of their gradients backward (+ forward again with recompute);
    PP: the fp32 residual stream to the next stage and its gradient back, per micro-batch, and the 1F1B bubble:
    every per-micro-batch term runs m + pp - 1 times;
    DP: one fp32 all-reduce of the gradients over DP x CP (the distributed optimizer: a reduce-scatter of the fp32
    gradients, then an all-gather of the updated parameters, bf16 with ``bf16_weights``, never overlapped); with
    ``overlap_grad_reduce`` the reduce runs in buckets during the last micro-batch's backward (2/3 of its compute),
    so only what exceeds that backward shows (megatron turns the overlap off with PP, trainer/optim.py);
    the optimizer and the EMA: bytes read and written over HBM; the weight casts: autocast reads the fp32 and writes
    the bf16 copy of every matmul weight in every forward (twice per micro-batch with recomputation), bf16_weights
    once per step after the optimizer."""
    eff, _ = measured_efficiency() if efficiency is None else (efficiency, "")
    b, t, hh, ww = latent_shape
    latent = (s.batch, t, hh, ww)
    hw_flops = dit_train_flops(dit, latent, recompute=lay.recompute)
    model_flops = dit_train_flops(dit, latent)
    m = lay.micro_batches
    compute = hw_flops / (lay.tp * lay.cp * lay.pp) / (peak * eff)
    blocks = dit.depth // lay.pp
    L = seq_tokens(s.tokens, lay) * s.batch
    act = L / lay.cp * dit.hidden_size * BF16           # one [tokens, h] bf16 activation of this CP rank
    tp_comm = 0.0
    if lay.tp > 1:
        ar = 2 * (lay.tp - 1) / lay.tp * act / _bw(lay.tp, gpus_per_node)
        per_block = (7.5 if lay.sp else 6) + (3 if lay.recompute else 0)
        text_ar = 2 * (lay.tp - 1) / lay.tp * s.batch * s.text * dit.hidden_size * BF16 / _bw(lay.tp, gpus_per_node)
        tp_comm = blocks * (per_block * ar + text_ar)
    cp_comm = 0.0
    if lay.cp > 1:
        kv = 2 * L * dit.hidden_size / lay.tp * BF16 * (lay.cp - 1) / lay.cp
        cp_comm = blocks * kv * (3 if lay.recompute else 2) / _bw(lay.tp * lay.cp, gpus_per_node)
    pp_comm = 0.0
    if lay.pp > 1:
        stream = L / (lay.cp * (lay.tp if lay.sp else 1)) * dit.hidden_size * FP32
        pp_comm = 2 * stream / _bw(lay.world, gpus_per_node)   # PP is outermost: stages sit on different nodes
    slots = m + lay.pp - 1
    n, mm = param_counts(dit, lay)
    g = lay.dp * lay.cp
    dp_comm = 0.0
    if g > 1:
        bw, ring = _bw(lay.tp * lay.cp * lay.dp, gpus_per_node), (g - 1) / g
        reduce = (1 if lay.distributed_optimizer else 2) * ring * FP32 * n / bw    # reduce-scatter | all-reduce
        if lay.overlap_grad_reduce and not (lay.distributed_optimizer and lay.pp > 1):
            reduce = max(0.0, reduce - compute * 2 / 3)
        gather = ring * (BF16 if lay.bf16_weights else FP32) * n / bw if lay.distributed_optimizer else 0.0
        dp_comm = reduce + gather
    shard = g if lay.distributed_optimizer else 1
    optimizer = (28 * n / shard + 12 * n) / HBM_BYTES_PER_S   # AdamW: read p, g, m, v, write p, m, v; EMA r/w
    if lay.bf16_weights:
        casts = (FP32 + BF16) * n / shard / HBM_BYTES_PER_S
    else:
        casts = (m * (2 if lay.recompute else 1) * (FP32 + BF16) * mm / HBM_BYTES_PER_S) if lay.autocast else 0.0
    seconds = slots * (compute + tp_comm + cp_comm + pp_comm) + dp_comm + optimizer + casts
    mfu = model_flops * m * lay.dp / (seconds * lay.world * peak)
    return StepTime(seconds, mfu, slots * compute, slots * tp_comm, slots * cp_comm, slots * pp_comm, dp_comm,
                    optimizer, casts, (lay.pp - 1) / slots)


# --- a stage's samples ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    """One latent shape a stage trains on: ``name`` (resolution, HxW, frames), latent (t, h, w), video tokens."""
    name: str
    latent: Tuple[int, int, int]
    tokens: int


def stage_buckets(cfg, stage) -> List[Bucket]:
    """The latent shapes a stage's data selection can hold (``curate.resolutions`` x ``stage.data``; an empty list
    selects everything curation makes: every resolution, each clip's full length, no images), as
    common.selection/common.latents do: latent T = (frames - 1) / 8 + 1, H/W divided by the VAE's x8."""
    from common.config import aspect_matches

    cur, sel, dit = cfg.curate, stage.data, cfg.train.dit
    vae = cfg.compress.vae
    frames = sel.frames or [cur.clip_frames]
    out = []
    for r in cur.resolution_list:
        if sel.resolutions and r.name not in sel.resolutions:
            continue
        for hgt, wid in r.sizes:
            if sel.aspect_ratios and not any(aspect_matches(hgt, wid, a) for a in sel.aspect_ratios):
                continue
            for f in frames:
                t = (f - 1) // vae.temporal_downsample + 1
                lh, lw = hgt // vae.spatial_downsample, wid // vae.spatial_downsample
                pt, ph, pw = dit.patch_size
                out.append(Bucket(f"{r.name} {hgt}x{wid} {f} fr", (t, lh, lw), (t * lh * lw) // (pt * ph * pw)))
    return out


# --- the search ----------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    layout: Layout
    budget: int               # tokens per micro-batch (0: micro_batch_size samples)
    mbs: int                  # samples per micro-batch of the step-time bucket
    memory: Memory
    time: Optional[StepTime]
    worst: Bucket             # the bucket whose micro-batch needs the most memory
    reason: str = ""          # why it does not fit ("" = it fits)
    is_config: bool = False


def _divisors(n: int, cap: int) -> List[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def _micro(stage, budget: int, mbs_fixed: int, b: Bucket) -> int:
    return max(1, budget // b.tokens) if budget else mbs_fixed


def stage_kernels(stage, pp: int) -> Tuple[str, bool]:
    """(AdamW kernel, bf16 weights) of ``stage`` on a GPU at pipeline size ``pp``: trainer.optim.adam_impl ("auto" =
    "fused" on CUDA) and trainer.precision.bf16_weights_on under bf16 autocast (the same rule, without torch)."""
    kernel = "fused" if stage.optimizer_impl == "auto" else stage.optimizer_impl
    if stage.bf16_weights == "auto":
        return kernel, pp == 1
    return kernel, stage.bf16_weights == "on"


def plan_stage(cfg, stage, gpus: int, gpu_memory_gb: float, gpus_per_node: int = GPUS_PER_NODE,
               efficiency: Optional[float] = None, peak: float = PEAK_FLOPS,
               workspace: float = WORKSPACE_BYTES) -> List[Candidate]:
    """Every layout of ``gpus`` GPUs for ``stage``: TP (divides the heads, within a node), CP 1-8, PP (divides the
    depth, <= 8), SP, recomputation, and the micro-batch (the token budget divided by 1, 2, 4, ... down to the
    largest sample, or ``micro_batch_size`` divided): the stage's global batch (tokens_per_micro_batch x
    micro_batches x data_parallel) is kept, so micro_batches = global / (dp x micro-batch). Fitting ones first,
    by step time; then the others by how far they are over."""
    dit = cfg.train.dit
    buckets = stage_buckets(cfg, stage)
    if not buckets:
        raise ValueError(f"stage '{stage.name}': its data selection holds no sample of curate.resolutions")
    budget0 = stage.tokens_per_micro_batch
    longest = max(buckets, key=lambda b: b.tokens)
    text = dit.max_text_len
    limit = gpu_memory_gb * GIB
    global_mb = stage.micro_batches * stage.data_parallel     # micro-batches of the config's size per step
    out: List[Candidate] = []
    for tp in [d for d in _divisors(dit.num_heads, gpus_per_node) if dit.hidden_size % d == 0]:
        for cp in (1, 2, 4, 8):
            for pp in _divisors(dit.depth, 8):
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for k in (1, 2, 4, 8, 16):
                    if budget0:
                        budget, mbs_fixed = budget0 // k, 0
                        if budget < longest.tokens or (k > 1 and budget0 % k):
                            continue
                    else:
                        if stage.micro_batch_size % k:
                            continue
                        budget, mbs_fixed = 0, stage.micro_batch_size // k
                    if (k * global_mb) % dp:
                        continue
                    m = k * global_mb // dp
                    for sp in ((False, True) if tp > 1 else (False,)):
                        for rc in (False, True):
                            kernel, bf16 = stage_kernels(stage, pp)
                            lay = Layout(tp, cp, pp, dp, sp, rc, m, stage.distributed_optimizer, optimizer=kernel,
                                         bf16_weights=bf16, overlap_grad_reduce=stage.overlap_grad_reduce,
                                         prefetch=stage.prefetch)
                            mems = [(peak_memory(dit, lay, Sample(b.tokens, _micro(stage, budget, mbs_fixed, b),
                                                                  text), workspace), b) for b in buckets]
                            mem, worst = max(mems, key=lambda x: x[0].total)
                            mbs = _micro(stage, budget, mbs_fixed, longest)
                            st = step_time(dit, lay, Sample(longest.tokens, mbs, text), (mbs, *longest.latent), peak,
                                           efficiency, gpus_per_node)
                            is_cfg = (tp, cp, pp, dp, sp, rc, k) == (
                                stage.tensor_parallel, stage.context_parallel, stage.pipeline_parallel,
                                stage.data_parallel, stage.sequence_parallel and stage.tensor_parallel > 1,
                                stage.recompute, 1)
                            c = Candidate(lay, budget, mbs, mem, st, worst, is_config=is_cfg)
                            c.reason = _why(c, limit)
                            out.append(c)
    fit = sorted((c for c in out if not c.reason), key=lambda c: c.time.seconds if c.time else math.inf)
    over = sorted((c for c in out if c.reason), key=lambda c: c.memory.total)
    return fit + over


def _why(c: Candidate, limit: float) -> str:
    mem = c.memory
    if mem.total <= limit:
        return ""
    states = mem.states + mem.workspace
    if states > limit:
        return (f"weights + grads + Adam{' (sharded)' if c.layout.distributed_optimizer else ''} + EMA "
                f"{mem.states / GIB:.1f} GB + workspace {mem.workspace / GIB:.0f} GB = {states / GIB:.1f} GB > "
                f"{limit / GIB:.0f} GB")
    left = limit - states - mem.inputs
    transient = max(mem.activations, mem.step_temp)
    return (f"activations {mem.activations / GIB:.1f} GB (bf16 weight copies {mem.autocast_weights / GIB:.1f} GB "
            f"included; {c.worst.name}: {c.mbs if c.budget == 0 else max(1, c.budget // c.worst.tokens)} x "
            f"{seq_tokens(c.worst.tokens, c.layout):,} tokens, {mem.what}) = {transient / GIB:.1f} GB > "
            f"{left / GIB:.1f} GB left after weights/grads/Adam/EMA {mem.states / GIB:.1f} GB, workspace and "
            f"waiting micro-batches' inputs {mem.inputs / GIB:.1f} GB")


def _row(c: Candidate) -> str:
    lay, mem, t = c.layout, c.memory, c.time
    mb = f"{c.budget:,} tok" if c.budget else f"{c.mbs} samples"
    assert t is not None
    return (f"{'*' if c.is_config else ' '} {lay.tp:>2} {lay.cp:>2} {lay.pp:>2} {lay.dp:>4}  "
            f"{'on ' if lay.sp else 'off'}  {'on ' if lay.recompute else 'off'}  {mb:>11} {lay.micro_batches:>3}  "
            f"{mem.total / GIB:6.1f} GB  {t.seconds:7.2f} s  {t.mfu:5.3f}")


def report(cfg, gpus: int, gpu_memory_gb: float, top: int = 8, show_all: bool = False,
           gpus_per_node: int = GPUS_PER_NODE, efficiency: Optional[float] = None) -> str:
    """The planner's text for every (non-skipped) stage of a config."""
    eff, src = measured_efficiency() if efficiency is None else (efficiency, "--efficiency")
    lines = [f"{gpus} GPUs x {gpu_memory_gb:g} GB (GB = 2^30 bytes), {gpus_per_node} per node; compute at "
             f"{eff:.3f} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s ({src}); workspace {WORKSPACE_BYTES / GIB:.0f} GB; "
             f"'*' = the config's own layout"]
    for stage in cfg.train.stages:
        if stage.skip:
            continue
        cands = plan_stage(cfg, stage, gpus, gpu_memory_gb, gpus_per_node, eff)
        fit = [c for c in cands if not c.reason]
        over = [c for c in cands if c.reason]
        longest = max(stage_buckets(cfg, stage), key=lambda b: b.tokens)
        glob = (f"{stage.micro_batches * stage.data_parallel} x {stage.tokens_per_micro_batch:,} tokens"
                if stage.tokens_per_micro_batch else
                f"{stage.micro_batches * stage.data_parallel * stage.micro_batch_size} samples")
        lines += ["", f"{stage.name}: largest sample {longest.name} = {longest.tokens:,} tokens; global batch {glob}; "
                      f"{len(fit)} of {len(cands)} layouts fit"]
        if fit:
            lines.append("    TP CP PP   DP  SP   recomp  micro-batch   m     memory     step    MFU")
            shown = fit if show_all else fit[:top]
            lines += [_row(c) for c in shown]
            cfg_fit = [c for c in fit if c.is_config and c not in shown]
            lines += [_row(c) + f"   (rank {fit.index(c) + 1})" for c in cfg_fit]
        else:
            lines.append("  no layout fits: add GPUs, or lower tokens_per_micro_batch / the stage's resolutions")
        if over:
            lines.append(f"  do not fit ({len(over)}){'' if show_all else ', the closest and the config own'}:")
            shown_over = over if show_all else over[:3] + [c for c in over[3:] if c.is_config]
            lines += [f"  {'*' if c.is_config else ' '} {c.layout.describe()}, "
                      f"{c.budget if c.budget else c.mbs:,}{' tok' if c.budget else ' samples'}: "
                      f"{c.memory.total / GIB:.1f} GB: {c.reason}" for c in shown_over]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="pipeline config YAML, e.g. configs/mugv_10b.yaml")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all (e.g. 128 = 16 nodes x 8)")
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory per GPU in GiB (H100: 80, H200: 141)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="default: the config's train.launch.gpu, else 8")
    p.add_argument("--top", type=int, default=8, help="fitting layouts shown per stage")
    p.add_argument("--all", action="store_true", help="show every layout, fitting or not")
    p.add_argument("--efficiency", type=float, default=None,
                   help="fraction of the 989 TFLOP/s peak the compute reaches (default: bench/results, else 0.40)")
    a = p.parse_args(argv)
    try:
        from common.config import load_config
        if a.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {a.gpus} (e.g. --gpus 128 for 16 nodes x 8)")
        if not a.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb must be > 0, got {a.gpu_memory_gb:g} (H100: 80, H200: 141)")
        if a.efficiency is not None and not 0 < a.efficiency <= 1:
            raise ValueError(f"--efficiency must be in (0, 1], got {a.efficiency:g} (e.g. 0.35)")
        cfg = load_config(a.config)
        per_node = a.gpus_per_node or cfg.train.launch.gpu or GPUS_PER_NODE
        if per_node < 1 or (a.gpus > per_node and a.gpus % per_node):
            raise ValueError(f"--gpus ({a.gpus}) must be a multiple of the GPUs per node ({per_node}); set "
                             "--gpus-per-node or train.launch.gpu")
        print(report(cfg, a.gpus, a.gpu_memory_gb, a.top, a.all, per_node, a.efficiency))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Bucket", "Candidate", "Layout", "Memory", "Sample", "StepTime", "Term", "block_activation_bytes",
           "measured_efficiency", "param_counts", "peak_memory", "plan_stage", "report", "seq_tokens",
           "stage_buckets", "step_time"]
