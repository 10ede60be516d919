#!/usr/bin/env bash
# Builds the two container images with podman, without a registry, and smoke-runs them.
#   1. A Debian bookworm base made by debootstrap (--variant=minbase), imported as
#      localhost/rankway-base:bookworm (the Dockerfiles default to debian:bookworm-slim).
#   2. Staging folders in target/image/: the release binaries, the libraries the worker
#      links outside the base system (found with ldd: libtorch, c10, gomp, CUDA runtime),
#      the MiniLM weights and the SmolLM2 GGUF.
#   3. podman build of deploy/docker/{gateway,worker}.Dockerfile.
#   4. Smoke run: a MiniLM worker, a SmolLM2 worker (the GGUF path deploy/groups/chat
#      gives) and the gateway containers (read-only root, non-root user, host network on
#      loopback) answer one embedding and one chat completion, log JSON lines, and all
#      stop cleanly on SIGTERM.
# Needs: the release binaries (make build) and scripts/setup.sh done. Installs podman,
# runc and debootstrap with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source scripts/lib.sh
log() { echo "build_images: $*" >&2; }

apt_install_missing podman runc debootstrap
export CONTAINERS_CONF=$ROOT/deploy/docker/podman-ci.conf
BASE=localhost/rankway-base:bookworm

if ! podman image exists "$BASE"; then
  rootfs=$ROOT/target/rootfs-bookworm
  if [ ! -x "$rootfs/bin/sh" ]; then
    log "debootstrap bookworm (minbase) into $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" >/dev/null
  fi
  tar -C "$rootfs" -c . | podman import -q - "$BASE" >/dev/null
fi

stage=$ROOT/target/image
rm -rf "$stage"
mkdir -p "$stage"/gateway/bin "$stage"/worker/{bin,lib,models}
# Without debug info: the release profile keeps it for profiling, images need not.
strip --strip-debug -o "$stage/gateway/bin/rankway-gateway" target/release/rankway-gateway
strip --strip-debug -o "$stage/worker/bin/rankway-worker" target/release/rankway-worker
# Every library ldd resolves outside the system folders (the base image has those).
ldd target/release/rankway-worker | awk '$3 ~ /^\// && $3 !~ /^\/(usr\/)?lib/ {print $3}' |
  while read -r lib; do cp -L "$lib" "$stage/worker/lib/"; done
cp -r models/minilm models/smollm2 "$stage/worker/models/"
log "staged: $(du -sh "$stage/worker" | cut -f1) worker, $(du -sh "$stage/gateway" | cut -f1) gateway"

for img in gateway worker; do
  log "podman build rankway-$img"
  podman build -q --network=host --build-arg BASE="$BASE" -f "deploy/docker/$img.Dockerfile" \
    -t "localhost/rankway-$img:latest" "$stage/$img" >/dev/null
done
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep rankway- >&2

# Smoke run on loopback.
WPORT=$(free_port); CPORT=$(free_port); HPORT=$(free_port); GPORT=$(free_port)
SMOKE=(rankway-smoke-gateway rankway-smoke-worker rankway-smoke-chat)
cleanup() { podman rm -f -t 0 "${SMOKE[@]}" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
common=(--network=host --read-only --cap-drop=ALL --security-opt=no-new-privileges)
podman run -d --name rankway-smoke-worker "${common[@]}" -e RANKWAY_TORCH_THREADS=1 \
  localhost/rankway-worker:latest serve --listen "127.0.0.1:$WPORT" >/dev/null
gguf=$(awk '/name: RANKWAY_GGUF/ {getline; print $2}' deploy/groups/chat/kustomization.yaml)
podman run -d --name rankway-smoke-chat "${common[@]}" -e RANKWAY_TORCH_THREADS=1 \
  -e RANKWAY_MODEL=smollm2 -e RANKWAY_GGUF="$gguf" -e RANKWAY_KV_CACHE_TOKENS=1024 \
  localhost/rankway-worker:latest serve --listen "127.0.0.1:$CPORT" --metrics-listen 127.0.0.1:0 >/dev/null
podman run -d --name rankway-smoke-gateway "${common[@]}" localhost/rankway-gateway:latest \
  --http-listen "127.0.0.1:$HPORT" --grpc-listen "127.0.0.1:$GPORT" \
  --group "a=127.0.0.1:$WPORT" --group "chat=127.0.0.1:$CPORT" >/dev/null
if ! wait_ready "127.0.0.1:$HPORT"; then
  podman logs rankway-smoke-worker | tail -20 >&2
  podman logs rankway-smoke-gateway | tail -20 >&2
  log "FAILED: the containers did not become ready"
  exit 1
fi
curl -sf "http://127.0.0.1:$HPORT/v1/embeddings" -H 'content-type: application/json' \
  -d '{"model": "minilm", "input": "containers on loopback"}' |
  .venv/bin/python -c '
import json, math, sys
v = json.load(sys.stdin)["data"][0]["embedding"]
norm = math.sqrt(sum(x * x for x in v))
assert len(v) == 384 and abs(norm - 1) < 1e-3, (len(v), norm)
print(f"build_images: embedding from the containers: {len(v)} floats, norm {norm:.6f}", file=sys.stderr)
'
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$HPORT/v2/models/smollm2/ready" >/dev/null && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$HPORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8, "temperature": 0}' |
  .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
text = r["choices"][0]["message"]["content"]
assert r["usage"]["completion_tokens"] > 0 and text, r
print(f"build_images: chat completion from the containers: {text!r}", file=sys.stderr)
' || { podman logs rankway-smoke-chat | tail -20 >&2; log "FAILED: no chat completion"; exit 1; }
# The images log JSON by default: every line of each container's log is an object.
for c in "${SMOKE[@]}"; do
  podman logs "$c" 2>&1 | .venv/bin/python -c 'import json, sys; [json.loads(l) for l in sys.stdin if l.strip()]' ||
    { log "FAILED: $c does not log JSON lines"; exit 1; }
done
for c in "${SMOKE[@]}"; do
  podman stop -t 30 "$c" >/dev/null
  code=$(podman inspect -f '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || { log "FAILED: $c exited $code on SIGTERM"; exit 1; }
done
podman image prune -f >/dev/null # the previous builds' layers
log "ok: images built, served an embedding and a chat completion, stopped cleanly"
