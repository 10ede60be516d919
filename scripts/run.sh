#!/usr/bin/env bash
# `make run`: two MiniLM groups of two tensor-parallel ranks each (rankway-worker launch)
# behind the gateway, and one generative SmolLM2 group (a second launch), all on
# loopback; Ctrl-C stops everything. Every rank of a generative group computes every step,
# so the group gets 3 ranks (SmolLM2's heads split 1 or 3 ways) only on a machine with at
# least 3 cores, else 1: more busy ranks than cores would take turns on them
# (RANKWAY_RUN_GENERATIVE_RANKS chooses; the MiniLM ranks sit idle between requests).
# Ports: REST 8000 and gRPC 8001 (gateway); 9000 and 9001 (rank 0 of groups g0, g1);
# 9100+ (followers' health); 9400+ (each rank's /metrics); 29500+ (c10d stores).
# The generative group (model "smollm2", behind the gateway too): rank 0 at 9010,
# followers' health 9110+, metrics 9410+, store 29510. RANKWAY_RUN_GROUPS and RANKWAY_RUN_RANKS change the MiniLM groups' shape;
# RANKWAY_RUN_GENERATIVE=0 leaves the generative group out.
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
GENERATIVE=${RANKWAY_RUN_GENERATIVE:-1}
CORES=$(nproc)
if [ -n "${RANKWAY_RUN_GENERATIVE_RANKS:-}" ]; then
  GEN_RANKS=$RANKWAY_RUN_GENERATIVE_RANKS
  why="RANKWAY_RUN_GENERATIVE_RANKS"
elif [ "$CORES" -ge 3 ]; then
  GEN_RANKS=3
  why="$CORES cores"
else
  GEN_RANKS=1
  why="$CORES cores: 3 busy ranks would share them"
fi
if [ "$GENERATIVE" = 1 ]; then
  echo "run: the generative group gets $GEN_RANKS rank(s) ($why)" >&2
  $BIN/rankway-worker launch --groups 1 --ranks-per-group "$GEN_RANKS" --port 9010 --follower-port 9110 \
    --metrics-port 9410 --master-port 29510 -- --model smollm2 --group smollm2 &
  pids+=($!)
fi
group_flags=()
for ((g = 0; g < GROUPS_N; g++)); do group_flags+=(--group "g$g=127.0.0.1:$((9000 + g))"); done
if [ "$GENERATIVE" = 1 ]; then group_flags+=(--group "smollm2=127.0.0.1:9010"); fi
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
MSG
if [ "$GENERATIVE" = 1 ]; then
  cat <<MSG

The generative model "smollm2" (SmolLM2-135M-Instruct, $GEN_RANKS tensor-parallel rank(s)) answers
through the gateway once its group is ready (its log says "generative group ready"):

  curl -sN http://$HTTP/v1/chat/completions -H 'content-type: application/json' \
    -d '{"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "What is the capital of France?"}]}'

  curl -s http://$HTTP/v2/models/smollm2/generate -d '{"text_input": "The capital of France is", "parameters": {"max_tokens": 16}}'
MSG
fi
cat <<MSG

Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
