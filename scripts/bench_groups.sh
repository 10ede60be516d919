#!/usr/bin/env bash
# `make bench-groups`: throughput of one 1-rank group against one 2-rank (tensor-parallel)
# group on this machine, each behind the gateway and loaded by k6 over /v1/embeddings.
# Both runs use all cores: 1 rank x all threads, or 2 ranks x half the threads each.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=target/release
export VUS=${VUS:-32} ITERATIONS=${ITERATIONS:-2000} MAX_DURATION=${MAX_DURATION:-120s}
OUT=$(mktemp -d)
trap 'stop_all; rm -rf "$OUT"' EXIT

for ranks in 1 2; do
  $BIN/rankway-worker launch --groups 1 --ranks-per-group "$ranks" --port 19100 --follower-port 19200 \
    --master-port 29900 2>"$OUT/launch-$ranks.log" &
  pids+=($!)
  $BIN/rankway-gateway --http-listen 127.0.0.1:18100 --grpc-listen 127.0.0.1:18101 \
    --group "g=127.0.0.1:19100" 2>"$OUT/gateway-$ranks.log" &
  pids+=($!)
  wait_ready 127.0.0.1:18100
  (cd loadtest && BASE_URL=http://127.0.0.1:18100 ../.venv/bin/k6 run --no-usage-report -q \
    --summary-export "$OUT/k6-$ranks.json" rest_embeddings.js >/dev/null)
  stop_all
done

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for ranks in (1, 2):
    m = json.load(open(f"{out}/k6-{ranks}.json"))["metrics"]
    rows[ranks] = (m["iterations"]["rate"], m["http_req_duration"]["med"], m["http_req_duration"]["p(99)"])
print(f"{'group':<16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs 1 rank':>10}")
for ranks, (rate, p50, p99) in rows.items():
    print(f"{str(ranks) + ' rank(s)':<16} {rate:>8.1f} {p50:>8.1f} {p99:>8.1f} {rate / rows[1][0]:>10.2f}")
PY
