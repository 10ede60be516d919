#!/usr/bin/env bash
# `make run`: one MiniLM worker group and the gateway on loopback, stopped with Ctrl-C.
# Ports: REST 8000, gRPC 8001 (gateway), 9000 (worker rank 0). Override with the
# RANKWAY_* variables the binaries read (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
HTTP=${RANKWAY_HTTP_LISTEN:-127.0.0.1:8000}
GRPC=${RANKWAY_GRPC_LISTEN:-127.0.0.1:8001}
WORKER=${RANKWAY_WORKER_LISTEN:-127.0.0.1:9000}

pids=()
stop() {
  trap - INT TERM EXIT
  echo "run: stopping" >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

$BIN/rankway-worker serve --listen "$WORKER" --group a &
pids+=($!)
$BIN/rankway-gateway --http-listen "$HTTP" --grpc-listen "$GRPC" --group "a=$WORKER" &
pids+=($!)

for _ in $(seq 1 600); do
  if curl -fsS "http://$HTTP/v2/health/ready" >/dev/null 2>&1; then break; fi
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "run: a process exited" >&2; exit 1; }; done
  sleep 0.1
done
curl -fsS "http://$HTTP/v2/health/ready" >/dev/null || { echo "run: gateway never became ready" >&2; exit 1; }

cat <<MSG

Rankway is ready: REST http://$HTTP, gRPC $GRPC (model "minilm"). Try:

  curl -s http://$HTTP/v1/embeddings -H 'content-type: application/json' \\
    -d '{"model": "minilm", "input": ["Rankway batches requests", "across worker groups"]}'

  curl -s http://$HTTP/v2/models/minilm/infer -H 'content-type: application/json' \\
    -d '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}'

  curl -s http://$HTTP/metrics

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
