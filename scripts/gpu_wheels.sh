#!/usr/bin/env bash
# Fetch, here, the wheels that scripts/gpu_check.sh installs on a lent GPU machine, which reaches
# no package registry. That machine's python3 (3.12) already has torch (CUDA), numpy, einops,
# safetensors, scipy, matplotlib, imageio, pyyaml, cloudpickle, typing-extensions, setuptools
# and pytest; it lacks what the `gym:` (states) and `blocks:` (MuJoCo pixels, EGL) benches need:
# gymnasium and farama-notifications, mujoco, mujoco-core, glfw and pyopengl. mujoco-studio (the
# interactive viewer, 8.7 MB) is left out: `import mujoco` and offscreen rendering run without
# it. dm-control (56 MB), wandb and imageio-ffmpeg (68 MB) are not needed by those benches.
#
#   bash scripts/gpu_wheels.sh            # .gpu_wheels/py312 (the GPU machine), py311 (here), gl
#   bash scripts/gpu_wheels.sh 3.12       # one set: .gpu_wheels/py312 (and gl)
#
# Each set is one version of each package, no dependencies resolved (--no-deps: the list above
# is the whole closure over what the GPU machine has). Only .gpu_wheels/py312 and .gpu_wheels/gl
# travel to the GPU machine (`carry`); they must stay well under the 64 MiB that travels.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu_wheels}
PYTHON=${PYTHON:-python3}
PACKAGES=(
  gymnasium==1.4.0
  farama-notifications==0.0.6
  mujoco==4.0.1
  mujoco-core==4.0.1
  glfw==2.11.0
  pyopengl==3.1.10
)
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.12 3.11)
for version in "${versions[@]}"; do
  dir="$DEST/py${version/./}"
  mkdir -p "$dir"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "${PACKAGES[@]}"
  # One version of each package: a leftover of another version would stop the install.
  count=$(ls "$dir"/*.whl | wc -l)
  if [ "$count" -ne ${#PACKAGES[@]} ]; then
    echo "error: $dir holds $count wheels, expected ${#PACKAGES[@]}: remove it and rerun" >&2
    exit 1
  fi
  echo "$dir: $count wheels, $(du -cb "$dir"/*.whl | tail -1 | cut -f1) bytes" \
    "($(du -csh "$dir"/*.whl | tail -1 | cut -f1))"
done
# The GL loaders (glvnd's libEGL, libOpenGL, ...; 256 kB) for MuJoCo's EGL rendering of the
# pixel benches: a bare GPU machine may have the NVIDIA driver's EGL but no loader
# (/work/.library/device/README.md). gpu_check.sh unpacks them there only when libEGL is
# missing. GL=0 skips them.
if [ "${GL:-1}" = 1 ]; then
  mkdir -p "$DEST/gl" /tmp/gpu_wheels_apt/partial
  apt=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/gpu_wheels_apt)
  apt-get "${apt[@]}" update >/dev/null
  (cd "$DEST/gl" && apt-get "${apt[@]}" download libegl1 libglvnd0 libopengl0 libgl1 libglx0 \
    libgles2 >/dev/null 2>&1)
  echo "$DEST/gl: $(ls "$DEST"/gl/*.deb | wc -l) debs, $(du -cb "$DEST"/gl/*.deb | tail -1 | cut -f1) bytes"
fi
echo "total: $(du -cb "$DEST"/py*/*.whl "$DEST"/gl/*.deb 2>/dev/null | tail -1 | cut -f1) bytes" \
  "($(du -csh "$DEST"/py*/*.whl "$DEST"/gl/*.deb 2>/dev/null | tail -1 | cut -f1))"
