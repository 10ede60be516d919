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
  start_group_and_gateway "$ranks" "$ranks-rank"
  k6_embeddings "$BENCH_HTTP" "k6-$ranks-rank"
  stop_all
done

scripts/k6_table.py "$OUT" 1-rank 2-rank
