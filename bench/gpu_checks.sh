#!/usr/bin/env bash
# The GPU checks in one go (one CUDA device), inside one time budget: environment, the DiT step's MFU at the 10B layer
# shapes (eager and compiled, attention per SDPA backend, a kernel profile), the trainer's MFU (eager and
# `compile: blocks`), then side by side the layout planner's memory prediction against the measured peak and the
# trainer's CUDA path end to end. Results (JSON + logs) go to $1 (default bench/results).
#
#   bash bench/gpu_checks.sh [outdir] [budget_s]      # budget_s default 570: each step gets what is left, capped
#
# Uses the interpreter `python3` on PATH with torch (CUDA), megatron-core and torchx importable; PYTHONPATH must hold
# the repository root (the script adds it). The timed steps run alone; the last two only read memory and losses, so
# they share the GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
budget="${2:-570}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
deadline=$(( $(date +%s) + budget ))
left() {   # seconds for the next step: what the budget has left, at most $1
  local rest=$(( deadline - $(date +%s) ))
  (( rest < $1 )) && echo $(( rest > 5 ? rest : 5 )) || echo "$1"
}
rc=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || rc=1
python3 - <<'PY' || rc=1
import torch, megatron.core, torchx
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "megatron-core", megatron.core.__version__, "torchx", torchx.__version__, "device", torch.cuda.get_device_name(0))
try:
    import flash_attn; print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn: not installed (attention runs through torch SDPA)")
PY
echo "== bench/dit_step.py --cuda --profile  ($(date +%T))"
timeout "$(left 170)" python3 bench/dit_step.py --cuda --profile --out "$out/dit_step_cuda.json" \
  2>&1 | tee "$out/dit_step_cuda.log" || rc=1
echo "== bench/scaling.py --cuda  ($(date +%T))"
timeout "$(left 240)" python3 bench/scaling.py --cuda --out "$out/scaling_cuda.json" \
  2>&1 | tee "$out/scaling_cuda.log" || rc=1
echo "== side by side: the planner's memory model at the 10B layer shapes (target within 10 %) and" \
     "bench/gpu_trainer.py  ($(date +%T))"
t=$(left 200)
timeout "$t" python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_planner.py > "$out/plan_memory_cuda.log" 2>&1 &
plan_pid=$!
timeout "$t" python3 bench/gpu_trainer.py --out "$out/gpu_trainer.json" 2>&1 | tee "$out/gpu_trainer.log" || rc=1
wait "$plan_pid" || rc=1
cat "$out/plan_memory_cuda.log"
echo "gpu_checks rc=$rc  ($(date +%T))"
exit $rc
