#!/usr/bin/env bash
# One call on a lent GPU machine: the cuda tests, then the training-step bench (eager and
# compiled with CUDA graphs, side by side) for dreamer_tiny, xs and s at batch 16 x 64 in bf16
# and fp32, plus the profiler's kernel-time share, and the OP3 planner's step time. Writes everything under ${OUT:-gpu_out}.
#   bash scripts/gpu_check.sh            # on the device machine ($OUT is set there)
# Budget: about 6-8 minutes on an H100/H200 (the compiles dominate); each step has a timeout
# so one slow piece cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export MUJOCO_GL=${MUJOCO_GL:-egl}
# One inductor cache for the run, kept with the results (a second process reuses it).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}

if [ ! -d .venv ]; then
  python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[dev]' >"$OUT/install.log" 2>&1
else
  . .venv/bin/activate
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/torch.txt"

timeout 120 python -m pytest -q -m gpu tests/ 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
timeout 150 python -m pytest -q tests/test_train_step.py tests/test_accelerator.py 2>&1 \
  | tail -5 | tee "$OUT/pytest_train_step.txt"

bench() {  # name, timeout, args...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python scripts/bench_train_step.py env=dmc:cartpole-balance accelerator=cuda \
    replay.batch_size=16 replay.batch_length=64 compile=both updates=20 warmup=3 \
    json="$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1
  echo "$name rc=$? $(python -c "import json,sys; r=json.load(open('$OUT/$name.json')); \
print({k: round(r[m][k], 4) for m in ('eager', 'compiled') for k in ('seconds_per_update',)}, \
'speedup', round(r['speedup'], 2))" 2>/dev/null)" | tee -a "$OUT/summary.txt"
}
bench tiny_bf16 150 preset=dreamer_tiny agent.precision=bf16 act=true
bench xs_bf16 150 preset=xs agent.precision=bf16
bench s_bf16 150 preset=s agent.precision=bf16
bench tiny_fp32 120 preset=dreamer_tiny agent.precision=fp32
bench tiny_bf16_warm 90 preset=dreamer_tiny agent.precision=bf16  # warm caches: compile time

# Kernel time over wall time for the compiled xs update (bf16).
timeout 120 python - "$OUT" <<'EOF' >"$OUT/kernel_share.txt" 2>&1
import sys, time, dataclasses
sys.path.insert(0, "scripts")
import torch
import bench_train_step as bench
from runtime.config import build_config

config = build_config(["agent=dreamer", "preset=xs", "env=dmc:cartpole-balance",
                       "accelerator=cuda", "agent.precision=bf16", "agent.compile=true",
                       "replay.batch_size=16", "replay.batch_length=64"])
agent, batches = bench._agent_and_batches(config, 6, 0)
for batch in batches[:4]:
    agent.update(batch)
torch.cuda.synchronize()
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    start = time.perf_counter()
    agent.update(batches[-1])
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
kernel = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
print({"wall_s": wall, "kernel_s": kernel, "kernel_over_wall": kernel / wall})
EOF
cat "$OUT/kernel_share.txt" | tail -2

# OP3 planning step on the GPU: on-device slot matching against scipy's host matching.
timeout 90 python scripts/bench_planner.py device=cuda populations=128,512,2048 repeats=10 \
  json="$OUT/bench_planner.json" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
