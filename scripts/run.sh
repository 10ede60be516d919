#!/usr/bin/env bash
# `make run`: two MiniLM groups of two tensor-parallel ranks each (rankway-worker launch)
# behind the gateway, all on loopback; Ctrl-C stops everything.
# Ports: REST 8000 and gRPC 8001 (gateway); 9000 and 9001 (rank 0 of groups g0, g1);
# 9100+ (followers' health); 9400+ (each rank's /metrics); 29500+ (c10d stores). RANKWAY_RUN_GROUPS and RANKWAY_RUN_RANKS change the shape.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
HTTP=${RANKWAY_HTTP_LISTEN:-127.0.0.1:8000}
GRPC=${RANKWAY_GRPC_LISTEN:-127.0.0.1:8001}
GROUPS_N=${RANKWAY_RUN_GROUPS:-2}
RANKS_N=${RANKWAY_RUN_RANKS:-2}

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
stop() {
  trap - INT TERM EXIT
  echo "run: stopping" >&2
  stop_all
}
trap stop INT TERM EXIT

$BIN/rankway-worker launch --groups "$GROUPS_N" --ranks-per-group "$RANKS_N" &
pids+=($!)
group_flags=()
for ((g = 0; g < GROUPS_N; g++)); do group_flags+=(--group "g$g=127.0.0.1:$((9000 + g))"); done
$BIN/rankway-gateway --http-listen "$HTTP" --grpc-listen "$GRPC" "${group_flags[@]}" &
pids+=($!)

wait_ready "$HTTP" || exit 1

cat <<MSG

Rankway is ready: $GROUPS_N groups x $RANKS_N ranks, REST http://$HTTP, gRPC $GRPC (model "minilm"). Try:

  curl -s http://$HTTP/v1/embeddings -H 'content-type: application/json' \\
    -d '{"model": "minilm", "input": ["Rankway batches requests", "across worker groups"]}'

  curl -s http://$HTTP/v2/models/minilm/infer -H 'content-type: application/json' \\
    -d '{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}'

  curl -s http://$HTTP/metrics              # the gateway's
  curl -s http://127.0.0.1:9400/metrics     # rank 0 of g0 (rank i of the launch: 9400+i)

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
