#!/usr/bin/env bash
# One call on a lent GPU machine, which reaches no package registry: the machine's own python3
# and torch (CUDA), plus the wheels of what it lacks, carried in .gpu_wheels/py312
# (scripts/gpu_wheels.sh fetches them here). It runs the cuda tests, the training-step bench
# (eager and compiled with CUDA graphs, side by side) on states of a `gym:` task
# (dreamer_tiny, xs and s at batch 16 x 64, bf16 and fp32) and on pixels of a `blocks:` task
# (MuJoCo rendered through EGL; no dm-control), the profiler's kernel-time share, and the OP3
# planner's step time. Nothing is pip-installed from a registry and the project's heavy
# dependencies (dm-control, wandb, imageio-ffmpeg) are never installed: the wheels and the
# project (--no-deps) go into a --target folder on PYTHONPATH.
#
#   bash scripts/gpu_wheels.sh 3.12     # here, once: .gpu_wheels/py312 (about 14 MB)
#   device run: carry [".gpu_wheels/py312", ".gpu_wheels/gl"], command
#       "bash scripts/gpu_check.sh", timeout_s 420
#   DRY=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh   # here, on the CPU: the same steps
#       with accelerator=cpu, small batches and few updates, the wheels of .gpu_wheels/py311
#
# Results: ${OUT:-gpu_out}/summary.txt (also printed) and gpu_check_logs.tgz (every log and
# JSON; two files, since a device call returns at most 8). BUDGET_S (default 300 s; the device
# gives 15 minutes a session, a machine's start included) bounds the whole run: each step gets
# its own timeout and what would start past the budget is skipped and listed as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DRY=${DRY:-0}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-300}
DEADLINE=$((SECONDS + BUDGET_S))
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")') || {
  echo "error: no python at PYTHON=$PYTHON" >&2
  exit 2
}
WHEELS=${WHEELS:-.gpu_wheels/py$PYVER}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
SITE=$WORK/site
mkdir -p "$LOGS"
export MUJOCO_GL=${MUJOCO_GL:-egl}
# One inductor cache for the run (a second process reuses it: tiny_bf16_warm times that).
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_cache

if [ "$DRY" = 1 ]; then
  ACCEL=cpu
  SIZE=(replay.batch_size=4 replay.batch_length=16 updates=2 warmup=1)
  POPULATIONS=16,32
  COMPILE=${COMPILE:-false} # inductor on 2 CPU cores takes minutes a model
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  ACCEL=cuda
  SIZE=(replay.batch_size=16 replay.batch_length=64 updates=20 warmup=3)
  POPULATIONS=128,512,2048
  COMPILE=${COMPILE:-both}
fi
STATES=(env=gym:Pendulum-v1)
PIXELS=(env=blocks:push-2 env.obs=pixels)

FAILED=()
note() { echo "$*" | tee -a "$LOGS/summary.txt"; }
finish() {
  note "total ${SECONDS}s (budget ${BUDGET_S}s); failed: ${FAILED[*]:-none}"
  cp "$LOGS/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/gpu_check_logs.tgz" -C "$WORK" logs
  rm -rf "$WORK"
  echo "wrote $OUT/summary.txt and $OUT/gpu_check_logs.tgz"
}
# result NAME RC LINES: NAME's rc and the last LINES of its log, unless it was skipped (125).
result() {
  [ "$2" -eq 125 ] || note "$1 rc=$2 $(tail -"$3" "$LOGS/$1.log")"
}
# step NAME LIMIT CMD...: run CMD under min(LIMIT, time left), its output in $LOGS/NAME.log.
step() {
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
  if [ "$left" -lt 15 ]; then
    note "$name skipped: budget spent"
    return 125
  fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  [ "$rc" -ne 124 ] || note "$name timed out after ${limit}s"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
  return $rc
}

note "gpu_check: python $PYVER ($("$PYTHON" -c 'import sys; print(sys.executable)')), dry=$DRY, accelerator=$ACCEL"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  note "error: no wheels in $WHEELS: run 'bash scripts/gpu_wheels.sh ${PYVER:0:1}.${PYVER:1}' here and carry $WHEELS"
  finish
  exit 2
fi
note "wheels: $(ls "$WHEELS"/*.whl | wc -l) in $WHEELS, $(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1) bytes"
# The project from a copy of the working tree (its build writes build/ and *.egg-info beside
# the sources), with no dependencies: the package imagine_rl, and its metadata carries the
# agents' entry point.
mkdir -p "$WORK/src"
cp -r pyproject.toml README.md agents envs runtime scripts sparse worldmodels "$WORK/src/"
if ! step install 120 "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
  --target "$SITE" "$WHEELS"/*.whl; then
  note "error: installing the wheels failed:"
  tail -20 "$LOGS/install.log" | tee -a "$LOGS/summary.txt"
  finish
  exit 2
fi
if ! step install_project 120 "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation \
  --no-cache-dir --target "$SITE" "$WORK/src"; then
  # No usable setuptools there: the package as links to the tree's folders (pyproject's
  # package-dir: imagine_rl.<folder> is <folder>/) and its metadata (the agents' entry point).
  note "install_project failed ($(tail -1 "$LOGS/install_project.log")); linking the sources"
  mkdir -p "$SITE/imagine_rl"
  for folder in agents envs runtime scripts sparse worldmodels; do
    ln -sfn "$REPO/$folder" "$SITE/imagine_rl/$folder"
  done
  "$PYTHON" - "$SITE" <<'EOF' 2>&1 | tee -a "$LOGS/summary.txt"
import pathlib
import sys
import tomllib

project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(sys.argv[1]) / f"imagine_rl-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
)
(info / "entry_points.txt").write_text(
    "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()) + "\n"
        for group, points in project.get("entry-points", {}).items()
    )
)
EOF
  unset 'FAILED[-1]' # the metadata stands in for the install
fi
note "installed into a --target folder with pip --no-index in ${SECONDS}s"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
cd "$REPO"

nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || note "nvidia-smi: not available"
# EGL for MuJoCo's pixels: a bare machine may lack glvnd's loader; unpack the carried one (the
# device README's recipe; as root only) and point it at the NVIDIA driver's vendor file.
if ! ldconfig -p | grep 'libEGL.so.1 ' >/dev/null; then
  if ls .gpu_wheels/gl/*.deb >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    for deb in .gpu_wheels/gl/*.deb; do dpkg -x "$deb" /; done
    ldconfig
    note "libEGL: unpacked $(ls .gpu_wheels/gl/*.deb | wc -l) GL loader debs from .gpu_wheels/gl"
  else
    note "libEGL: missing and no .gpu_wheels/gl to unpack (as root): the pixel benches will fail"
  fi
fi
VENDOR=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
if [ -z "${__EGL_VENDOR_LIBRARY_FILENAMES:-}" ] && [ -f "$VENDOR" ]; then
  export __EGL_VENDOR_LIBRARY_FILENAMES=$VENDOR
fi
note "torch: $("$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no cuda')" 2>&1 | tail -1)"

# The gym: and blocks: paths with dm-control, wandb and imageio-ffmpeg unimportable: the env,
# the agent and a replay batch of each bench's config build without them.
step imports 120 "$PYTHON" - "$ACCEL" <<'EOF'
import importlib.abc
import sys

BLOCKED = ("dm_control", "wandb", "imageio_ffmpeg")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Block())
from imagine_rl.scripts import bench_train_step as bench  # noqa: E402
from imagine_rl.runtime.config import build_config  # noqa: E402

for env in (["env=gym:Pendulum-v1"], ["env=blocks:push-2", "env.obs=pixels"]):
    config = build_config(["agent=dreamer", "preset=dreamer_tiny", f"accelerator={sys.argv[1]}",
                           "replay.batch_size=2", "replay.batch_length=8", *env])
    agent, batches = bench._agent_and_batches(config, 1, 0)
    print(env, {k: tuple(v.shape) for k, v in batches[0].items() if hasattr(v, "shape")})
import mujoco  # noqa: E402
import gymnasium  # noqa: E402

print("ok: gymnasium", gymnasium.__version__, "mujoco", mujoco.__version__,
      "; built without", ", ".join(BLOCKED))
EOF
result imports $? 1

# The modules with cuda tests (other test modules may need dm-control; on a CPU the cuda tests
# skip, which proves they collect with what is installed).
step pytest_gpu 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/*.py)
result pytest_gpu $? 1

bench() { # name, timeout, args...
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PYTHON" scripts/bench_train_step.py "accelerator=$ACCEL" "${SIZE[@]}" \
    "compile=$COMPILE" json="$LOGS/$name.json" "$@"
  local rc=$?
  [ "$rc" -eq 125 ] || note "$name rc=$rc $("$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1]))
modes = ('eager', 'compiled') if 'speedup' in r else ('update',)
print({m: {k: round(r[m][k], 5) for k in ('seconds_per_update', 'host_syncs_per_update')}
       for m in modes}, *(('speedup', round(r['speedup'], 2)) if 'speedup' in r else ()))" \
    "$LOGS/$name.json" 2>/dev/null)"
}
# Most wanted first: what is skipped when the budget runs out is the end of this list.
bench tiny_bf16 100 preset=dreamer_tiny accelerator.precision=bf16 act=true "${STATES[@]}"
# OP3 planning step: on-device slot matching against scipy's host matching.
step bench_planner 60 "$PYTHON" scripts/dev/bench_planner.py "device=$ACCEL" \
  "populations=$POPULATIONS" repeats=5 json="$LOGS/bench_planner.json"
result bench_planner $? 4
bench tiny_bf16_pixels 100 preset=dreamer_tiny accelerator.precision=bf16 "${PIXELS[@]}"

bench xs_bf16 100 preset=xs accelerator.precision=bf16 "${STATES[@]}"
bench tiny_bf16_warm 60 preset=dreamer_tiny accelerator.precision=bf16 "${STATES[@]}" # warm caches

# Kernel time over wall time for the compiled xs update (bf16).
step kernel_share 90 "$PYTHON" - "$ACCEL" "agent.compile=$([ "$COMPILE" = false ] && echo false || echo true)" \
  "${SIZE[@]:0:2}" <<'EOF'
import sys
import time

from imagine_rl.scripts import bench_train_step as bench  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from imagine_rl.runtime.config import build_config  # noqa: E402

accel = sys.argv[1]
config = build_config(["agent=dreamer", "preset=xs", "env=gym:Pendulum-v1",
                       f"accelerator={accel}", "accelerator.precision=bf16", *sys.argv[2:]])
sync = torch.cuda.synchronize if accel == "cuda" else (lambda: None)
agent, batches = bench._agent_and_batches(config, 6 if accel == "cuda" else 3, 0)
for batch in batches[:-1]:
    agent.update(batch)
sync()
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if accel == "cuda" else [])
with profile(activities=activities) as prof:
    start = time.perf_counter()
    agent.update(batches[-1])
    sync()
    wall = time.perf_counter() - start
kernel = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
print({"wall_s": round(wall, 5), "kernel_s": round(kernel, 5),
       "kernel_over_wall": round(kernel / wall, 3)})
EOF
result kernel_share $? 1

bench s_bf16 100 preset=s accelerator.precision=bf16 "${STATES[@]}"
bench tiny_fp32 80 preset=dreamer_tiny accelerator.precision=fp32 "${STATES[@]}"
bench xs_bf16_pixels 100 preset=xs accelerator.precision=bf16 "${PIXELS[@]}"
# The training-step and accelerator tests as CI runs them (dry: without the slow compiles).
step pytest_train_step 150 "$PYTHON" -m pytest -q -p no:cacheprovider \
  -m "$([ "$DRY" = 1 ] && echo "not slow and not gpu" || echo "not gpu")" \
  tests/test_train_step.py tests/test_accelerator.py
result pytest_train_step $? 1
finish
[ ${#FAILED[@]} -eq 0 ]
