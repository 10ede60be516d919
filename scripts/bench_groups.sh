#!/usr/bin/env bash
# `make bench-groups`: throughput of one 1-rank group against one 2-rank (tensor-parallel)
# group on this machine, each behind the gateway and loaded by k6 over /v1/embeddings.
# Both runs use all cores: 1 rank x all threads, or 2 ranks x half the threads each.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=target/release
bench_init

for ranks in 1 2; do
  $BIN/rankway-worker launch --groups 1 --ranks-per-group "$ranks" --port 19100 --follower-port 19200 \
    --master-port 29900 2>"$OUT/launch-$ranks.log" &
  pids+=($!)
  $BIN/rankway-gateway --http-listen 127.0.0.1:18100 --grpc-listen 127.0.0.1:18101 \
    --group "g=127.0.0.1:19100" 2>"$OUT/gateway-$ranks.log" &
  pids+=($!)
  wait_ready 127.0.0.1:18100
  k6_embeddings 127.0.0.1:18100 "k6-$ranks-rank"
  stop_all
done

scripts/k6_table.py "$OUT" 1-rank 2-rank
