#!/usr/bin/env bash
# The GPU checks in one go (one CUDA device): environment, single-GPU MFU at the 10B layer shapes, the layout
# planner's memory prediction against the measured peak, and the trainer's CUDA path end to end. Results (JSON +
# log) go to $1 (default bench/results).
#
#   bash bench/gpu_checks.sh [outdir]
#
# Uses the interpreter `python3` on PATH with torch (CUDA), megatron-core and torchx importable; PYTHONPATH must hold
# the repository root (the script adds it).
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
rc=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || rc=1
python3 - <<'PY' || rc=1
import torch, megatron.core, torchx
print("torch", torch.__version__, "cuda", torch.version.cuda, "megatron-core", megatron.core.__version__,
      "torchx", torchx.__version__, "device", torch.cuda.get_device_name(0))
try:
    import flash_attn; print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn: not installed (attention runs through torch SDPA)")
PY
echo "== bench/dit_step.py --cuda"
timeout 120 python3 bench/dit_step.py --cuda --out "$out/dit_step_cuda.json" || rc=1
echo "== bench/scaling.py --cuda"
timeout 150 python3 bench/scaling.py --cuda --out "$out/scaling_cuda.json" || rc=1
echo "== the planner's memory model at the 10B layer shapes (tests/test_planner.py -m gpu; target within 10 %)"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_planner.py 2>&1 | tee "$out/plan_memory_cuda.log" || rc=1
echo "== bench/gpu_trainer.py"
timeout 200 python3 bench/gpu_trainer.py --out "$out/gpu_trainer.json" || rc=1
echo "gpu_checks rc=$rc"
exit $rc
