#!/usr/bin/env bash
# The GPU checks in one go (one CUDA device), inside one time budget: environment, the DiT step's MFU at the 10B layer
# shapes (eager and compiled, attention per SDPA backend, a kernel profile), the trainer's MFU (eager and
# `compile: blocks`), then side by side the layout planner's memory prediction against the measured peak and the
# trainer's CUDA path end to end. Results (JSON + logs) go to $1 (default bench/results); every script saves what it
# has measured as it goes, so a step cut short by its time limit keeps its earlier figures.
#
#   bash bench/gpu_checks.sh [outdir] [budget_s]      # budget_s default 530: each step gets what is left, capped
#
# Uses the interpreter `python3` on PATH with torch (CUDA), megatron-core and torchx importable; PYTHONPATH must hold
# the repository root (the script adds it). The timed steps run alone. The last two share the GPU: the planner's test
# reads peak memory and gpu_trainer.py checks losses, which sharing does not change; gpu_trainer.py's step times and
# MFU are then not alone on the GPU and are not figures to quote.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
# 530 s: a lent machine's command limit is 600 s; 530 + one step's SIGTERM grace (KILL_AFTER) stays inside it
budget="${2:-530}"
# seconds between a step's SIGTERM and its SIGKILL: more than torchrun's 30 s for stopping its workers cleanly
KILL_AFTER=35
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
deadline=$(( $(date +%s) + budget ))
left() {   # seconds for the next step: what the budget has left, at most $1
  local rest=$(( deadline - $(date +%s) ))
  (( rest < $1 )) && echo $(( rest > 5 ? rest : 5 )) || echo "$1"
}
rc=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || rc=1
timeout -k 5 "$(left 30)" python3 - <<'PY' || rc=1
import torch, megatron.core, torchx
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "megatron-core", megatron.core.__version__, "torchx", torchx.__version__, "device", torch.cuda.get_device_name(0))
try:
    import flash_attn; print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn: not installed (attention runs through torch SDPA)")
PY
# caps (s), summing to the budget less the environment check: the step's build, peak matmul and 2 x 6 timed steps
# take ~30 s and the first compile ~60 s; the trainer twice (launch, 889 M parameters, 14 steps, 2 checkpoints of
# ~14 GB each) ~80 s per run plus the compile; the planner's 4 cases and gpu_trainer.py's 4 launches ~150 s
echo "== bench/dit_step.py --cuda --profile  ($(date +%T))"
timeout -k "$KILL_AFTER" "$(left 150)" python3 bench/dit_step.py --cuda --profile --out "$out/dit_step_cuda.json" \
  2>&1 | tee "$out/dit_step_cuda.log" || rc=1
echo "== bench/scaling.py --cuda  ($(date +%T))"
timeout -k "$KILL_AFTER" "$(left 200)" python3 bench/scaling.py --cuda --out "$out/scaling_cuda.json" \
  2>&1 | tee "$out/scaling_cuda.log" || rc=1
echo "== still on the GPU before the shared step (a trainer a timeout left behind would show here):"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv || true
echo "== side by side: the planner's memory model at the 10B layer shapes (target within 10 %) and" \
     "bench/gpu_trainer.py  ($(date +%T))"
t=$(left 150)
timeout -k "$KILL_AFTER" "$t" python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_planner.py \
  > "$out/plan_memory_cuda.log" 2>&1 &
plan_pid=$!
timeout -k "$KILL_AFTER" "$t" python3 bench/gpu_trainer.py --out "$out/gpu_trainer.json" 2>&1 \
  | tee "$out/gpu_trainer.log" || rc=1
wait "$plan_pid" || rc=1
cat "$out/plan_memory_cuda.log"
echo "gpu_checks rc=$rc  ($(date +%T))"
exit $rc
