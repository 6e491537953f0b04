"""The one place that decides device, dtype, distributed backend and process groups for training.

``resolve_runtime(heavy_shim=False)`` picks CUDA + NCCL + bf16 autocast when a GPU is present, else CPU + gloo +
fp32, and on CPU installs the small megatron-core shim (docs/parallelism.md, "Megatron-Core on CPU") that megatron's
tensor-parallel layers and RNG tracker need there. With ``heavy_shim=True`` (the stage
uses ``checkpoint_format: dist`` or ``distributed_optimizer``) it also installs the heavy shim that megatron's
DistributedOptimizer and dist_checkpointing need on CPU: ``torch.cuda.synchronize``/``Stream``/``Event`` become
no-ops and a ``TorchFunctionMode`` answers every ``device="cuda"``/``.cuda()`` with the CPU and makes
``Tensor.type()`` report ``torch.cuda.*`` (megatron checks that string). Nothing happens at import time, and
nothing of either shim is installed on GPU.

Pipeline parallelism (megatron's 1F1B schedule and p2p ops) needs the heavy shim on CPU too: the schedule allocates
``device="cuda"`` counters and calls ``torch.cuda.synchronize()`` after its batched isend/irecv (gloo has both ops).

``init_distributed(tp, seed, cp=, pp=)`` joins the process group torchrun describes in the environment (RANK,
WORLD_SIZE, MASTER_ADDR, ...) or, when started as a plain ``python`` process, a one-process group; then builds
megatron's tensor/context/data/pipeline-parallel groups, seeds its RNG tracker and returns the ``Layout``: this
process's coordinates and its ``ProcessGroups``. This module and nothing else reads megatron's ``parallel_state``:
everything downstream takes the layout (or the ``trainer.parallel.ParallelPlan`` built from it). ``destroy()`` undoes
both.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_SHIM_INSTALLED = False
_HEAVY_MODE = None


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    backend: str              # "nccl" | "gloo"
    dtype: torch.dtype        # autocast dtype for the forward pass; parameters and optimizer state stay fp32

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32


@dataclass(frozen=True)
class ProcessGroups:
    """The process groups of one rank (megatron's, built by ``init_distributed``); None on a layout built by hand."""
    tp: Any = None            # tensor parallel (and sequence parallel)
    cp: Any = None            # context parallel
    pp: Any = None            # pipeline parallel
    dp: Any = None            # data parallel (without CP)
    dp_cp: Any = None         # data x context parallel: where gradients are reduced


@dataclass(frozen=True)
class Layout:
    """Where this process sits: global rank, and its coordinates in the (tensor, context, data, pipeline) grid."""
    rank: int
    world_size: int
    local_rank: int
    tp: int
    tp_rank: int
    dp: int
    dp_rank: int
    cp: int = 1               # context parallel: CP ranks of one (tp_rank, dp_rank) split the tokens of one batch
    cp_rank: int = 0
    pp: int = 1               # pipeline parallel: PP stage pp_rank holds blocks [pp_rank*D/pp, (pp_rank+1)*D/pp)
    pp_rank: int = 0
    dp_cp_rank: int = 0       # rank in the data x context parallel group (megatron's replica id of a shard)
    groups: ProcessGroups = ProcessGroups()

    @staticmethod
    def single() -> "Layout":
        """One process, no parallelism (offline tools: export, tests)."""
        return Layout(rank=0, world_size=1, local_rank=0, tp=1, tp_rank=0, dp=1, dp_rank=0)


def install_cpu_shim() -> None:
    """Let megatron-core's TP layers and RNG tracker run without CUDA (idempotent; CPU only).

    Megatron asks ``torch.cuda`` for the current device (used as ``device=``) and for RNG states; here those are
    answered by the CPU. This light shim is enough unless the stage uses megatron's DistributedOptimizer or
    dist_checkpointing (then ``install_heavy_cpu_shim``).
    """
    global _SHIM_INSTALLED
    if _SHIM_INSTALLED:
        return
    import megatron.core.tensor_parallel.random as mrand
    import megatron.core.transformer.utils as mtu

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrand._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrand._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mtu.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()
    _SHIM_INSTALLED = True


def _is_cuda(d) -> bool:
    return ((isinstance(d, str) and d.startswith("cuda")) or (isinstance(d, torch.device) and d.type == "cuda")
            or (isinstance(d, int) and not isinstance(d, bool)))


class _Nop:
    """Stands in for torch.cuda.Stream / Event on CPU."""
    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None


def install_heavy_cpu_shim() -> None:
    """The light shim plus what megatron's DistributedOptimizer and dist_checkpointing need on CPU (idempotent;
    CPU only). The redirecting TorchFunctionMode is entered in the calling thread and
    stays active for the life of the process: call it from the training thread."""
    global _HEAVY_MODE
    if _HEAVY_MODE is not None:
        return
    import contextlib

    from torch.overrides import TorchFunctionMode

    class CudaToCpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                r = func(*args)
                return r if r.startswith("torch.cuda.") else r.replace("torch.", "torch.cuda.", 1)
            if "device" in kwargs and _is_cuda(kwargs["device"]):
                kwargs["device"] = "cpu"
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
                args = (args[0], "cpu") + tuple(args[2:])
            return func(*args, **kwargs)

    install_cpu_shim()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = torch.cuda.Event = _Nop
    torch.cuda.current_stream = lambda *a, **k: _Nop()
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.set_device = lambda *a, **k: None
    _HEAVY_MODE = CudaToCpuMode()
    _HEAVY_MODE.__enter__()


# Peak dense FLOP/s per device for MFU (bf16 on GPU: datasheet, no sparsity). CPU: per thread, fp32, measured by
# bench/dit_step.py on the 2-vCPU development machine (190.1 GFLOP/s for a 4096^2 fp32 mm on 2 threads).
PEAK_FLOPS_GPU_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
PEAK_FLOPS_CPU_FP32_PER_THREAD = 95e9
PEAK_ENV = "VGEN_PEAK_TFLOPS"


def peak_flops_per_s(rt: Runtime, tflops: float = 0.0) -> float:
    """This process's peak FLOP/s for MFU: ``tflops`` (the stage's ``peak_tflops``) when > 0, else
    ``$VGEN_PEAK_TFLOPS``, else the device default above; 0.0 when unknown (an unlisted GPU: MFU is not reported)."""
    if tflops > 0:
        return tflops * 1e12
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        return next((v for k, v in PEAK_FLOPS_GPU_BF16.items() if k in name), 0.0)
    return PEAK_FLOPS_CPU_FP32_PER_THREAD * torch.get_num_threads()


def resolve_runtime(heavy_shim: bool = False) -> Runtime:
    """CUDA (this process's LOCAL_RANK GPU, NCCL, bf16 autocast) when available, else CPU (gloo, fp32 + shim).

    Precision: on GPU the forward runs under bf16 autocast while parameters, gradients and the AdamW state stay
    fp32 (the fp32 master weights of mixed precision; no loss scaling is needed for bf16). On CPU everything is
    fp32 and ``torch.use_deterministic_algorithms(True)`` is set, so a resumed run is bitwise equal to an
    uninterrupted one. ``heavy_shim``: on CPU also install ``install_heavy_cpu_shim`` (dist checkpoints,
    distributed optimizer).
    """
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                               "launch with nproc_per_node <= the GPUs per node")
        torch.cuda.set_device(local_rank)
        return Runtime(torch.device("cuda", local_rank), "nccl", torch.bfloat16)
    install_heavy_cpu_shim() if heavy_shim else install_cpu_shim()
    torch.use_deterministic_algorithms(True)
    return Runtime(torch.device("cpu"), "gloo", torch.float32)


def init_distributed(tp: int, seed: int = 0, runtime: Runtime | None = None, cp: int = 1, pp: int = 1) -> Layout:
    """Join the process group and build megatron's TP/CP/DP/PP groups (megatron's order tp-cp-ep-dp-pp: TP ranks are
    adjacent global ranks, then CP, then DP, PP outermost; ``dp`` = world / (tp*cp*pp) and ``dp_rank`` exclude CP
    and PP, so the CP ranks and the PP stages of one DP rank share its batch)."""
    from megatron.core import parallel_state, tensor_parallel

    rt = runtime or resolve_runtime()
    timeout = datetime.timedelta(minutes=30)
    if not dist.is_initialized():
        if "RANK" in os.environ:   # torchrun: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE come from the environment
            dist.init_process_group(rt.backend, timeout=timeout)
        else:                      # a plain `python -m trainer.train`: a one-process group, no network
            dist.init_process_group(rt.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or cp < 1 or pp < 1 or world % (tp * cp * pp):
        raise ValueError(f"tensor_parallel*context_parallel*pipeline_parallel={tp}*{cp}*{pp} must divide the number "
                         f"of processes ({world}): launch tensor_parallel*context_parallel*pipeline_parallel*"
                         "data_parallel processes")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                             pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    ps = parallel_state
    groups = ProcessGroups(tp=ps.get_tensor_model_parallel_group(), cp=ps.get_context_parallel_group(),
                           pp=ps.get_pipeline_model_parallel_group(), dp=ps.get_data_parallel_group(),
                           dp_cp=ps.get_data_parallel_group(with_context_parallel=True))
    return Layout(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")), tp=tp,
                  tp_rank=ps.get_tensor_model_parallel_rank(), dp=world // (tp * cp * pp),
                  dp_rank=ps.get_data_parallel_rank(), cp=cp, cp_rank=ps.get_context_parallel_rank(), pp=pp,
                  pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_cp_rank=ps.get_data_parallel_rank(with_context_parallel=True), groups=groups)


def destroy() -> None:
    """Tear down megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
