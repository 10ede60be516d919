#!/usr/bin/env bash
# `make bench-tracing`: throughput and latency of one 2-rank group behind the gateway with
# tracing off, then on at 100% sampling (every process exporting over OTLP/gRPC to a
# loopback sink, tests/examples/otlp_sink.rs), loaded the same way by k6.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=target/release
bench_init
cargo build --release -q -j2 -p rankway-system-tests --example otlp_sink
SINK=target/release/examples/otlp_sink
SINK_ADDR=127.0.0.1:$(free_port)

for mode in off on; do
  if [ "$mode" = on ]; then
    $SINK "$SINK_ADDR" >"$OUT/spans" 2>"$OUT/sink.log" &
    sink=$!
    export OTEL_EXPORTER_OTLP_ENDPOINT=http://$SINK_ADDR OTEL_TRACES_SAMPLER=always_on
  fi
  start_group_and_gateway 2 "tracing-$mode"
  k6_embeddings "$BENCH_HTTP" "k6-tracing-$mode"
  stop_all # the processes flush their spans as they stop
  if [ "$mode" = on ]; then
    kill -TERM "$sink" && wait "$sink" || true
    unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_TRACES_SAMPLER
  fi
done

scripts/k6_table.py "$OUT" tracing-off tracing-on
echo "spans received by the sink with tracing on: $(cat "$OUT/spans")"
