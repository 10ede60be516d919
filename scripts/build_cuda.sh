#!/usr/bin/env bash
# Compiles the worker with `--features cuda` (ProcessGroupNCCL in the c10d shim), to keep
# the GPU path building. It needs the CUDA headers and libraries torch links, so it uses a
# second venv (.venv-cuda) with the full torch wheel set (about 2.7 GB) plus the
# nvidia-cuda-crt and nvidia-cuda-cccl headers. Nothing here runs on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-cuda
stamp=$VENV/.rankway-cuda-2.13.0
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  echo "build_cuda: installing torch==2.13.0 with its CUDA dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
    torch==2.13.0 "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
  touch "$stamp"
fi
LIBTORCH=$(echo "$PWD/$VENV"/lib/python3*/site-packages/torch)
export LIBTORCH
cargo build --release -j"${JOBS:-2}" -p rankway-worker --features cuda --target-dir target/cuda
echo "build_cuda: ok (compiled, not run: no GPU here)" >&2
