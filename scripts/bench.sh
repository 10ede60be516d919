#!/usr/bin/env bash
# `make bench`: the model's in-process throughput (rankway-worker bench) against the
# same model behind the gateway, one text per request, loaded two ways: by k6 at $VUS
# virtual users over REST (OpenAI embeddings) and gRPC (OIP ModelInfer), as users load it;
# and by the lean one-thread load generator (gateway/examples/loadgen.rs) at $VUS
# connections over OIP REST and gRPC, which measures the gateway's path: on 2 cores k6's
# JavaScript takes CPU the model would use, so its rows understate what the gateway
# passes through. The lean rows send the longest of the direct bench's sentences, so
# every batch pads to the same length as the direct batches. Prints one table.
# Each row's steal (CPU time the hypervisor gave to other guests, /proc/stat) is printed:
# on a shared host it says which rows ran slow for reasons outside the code.
# Everything binds to loopback; each k6 run is bounded by ITERATIONS and MAX_DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=${BIN:-target/release}
K6=.venv/bin/k6
LOADGEN=${LOADGEN:-target/release/examples/loadgen}
export VUS=${VUS:-32} ITERATIONS=${ITERATIONS:-3000} MAX_DURATION=${MAX_DURATION:-90s}
HTTP=127.0.0.1:${BENCH_HTTP_PORT:-18000}
GRPC=127.0.0.1:${BENCH_GRPC_PORT:-18001}
WORKER=127.0.0.1:${BENCH_WORKER_PORT:-19000}
OUT=$(mktemp -d)

echo "bench: direct model throughput (rankway-worker bench)" >&2
cpu_mark direct before
$BIN/rankway-worker bench --json --batch-sizes 1,8,16,32 --duration "${BENCH_DIRECT_DURATION:-8s}" > "$OUT/direct.jsonl"
cpu_mark direct after

trap 'stop_all; rm -rf "$OUT"' EXIT
$BIN/rankway-worker serve --listen "$WORKER" --metrics-listen 127.0.0.1:0 --group bench 2>"$OUT/worker.log" &
pids+=($!)
$BIN/rankway-gateway --http-listen "$HTTP" --grpc-listen "$GRPC" --group "bench=$WORKER" 2>"$OUT/gateway.log" &
pids+=($!)
wait_ready "$HTTP" || { cat "$OUT"/*.log >&2; exit 1; }

echo "bench: k6 at $VUS VUs, $ITERATIONS requests per protocol" >&2
cpu_mark rest before
(cd loadtest && BASE_URL="http://$HTTP" ../$K6 run --no-usage-report -q --summary-export "$OUT/rest.json" rest_embeddings.js >/dev/null)
cpu_mark rest after
cpu_mark grpc before
(cd loadtest && GRPC_ADDR="$GRPC" ../$K6 run --no-usage-report -q --summary-export "$OUT/grpc.json" grpc_infer.js >/dev/null)
cpu_mark grpc after
echo "bench: lean load generator at $VUS connections, ${LEAN_DURATION:-10s} per protocol" >&2
for proto in rest grpc; do
  addr=$HTTP; [ "$proto" = grpc ] && addr=$GRPC
  cpu_mark "lean-$proto" before
  $LOADGEN --protocol "$proto" --addr "$addr" --connections "$VUS" --duration "${LEAN_DURATION:-10s}" \
    --model minilm --input text --text "Rankway batches requests from many clients before they reach the model." \
    >"$OUT/lean-$proto.json"
  cpu_mark "lean-$proto" after
done
curl -fsS "http://$HTTP/metrics" > "$OUT/metrics.txt"
# The host's speed drifts over minutes (other tenants' load): the best batch size is
# measured again once the servers are stopped, and ratios are to the mean of both runs.
stop_all
best_batch=$(python3 -c "import json;print(max((json.loads(l) for l in open('$OUT/direct.jsonl')), key=lambda r: r['rows_per_sec'])['batch_size'])")
echo "bench: direct model throughput again (batch $best_batch)" >&2
cpu_mark direct-after before
$BIN/rankway-worker bench --json --batch-sizes "$best_batch" --duration "${BENCH_DIRECT_DURATION:-8s}" > "$OUT/direct-after.jsonl"
cpu_mark direct-after after

python3 - "$OUT" <<'PY'
import json, re, sys
sys.path.insert(0, "scripts")
from steal import steal_percent
out = sys.argv[1]

direct = [json.loads(l) for l in open(f"{out}/direct.jsonl")]
after = json.loads(open(f"{out}/direct-after.jsonl").readline())
best = max(direct, key=lambda r: r["rows_per_sec"])
reference = (best["rows_per_sec"] + after["rows_per_sec"]) / 2
print(f"{'path':<34} {'rows/s':>9} {'p50 ms*':>8} {'p99 ms':>8} {'vs direct':>10} {'steal %':>8}")
for label, r, run in [(f"direct, batch {r['batch_size']}", r, "direct") for r in direct] + [(f"direct, batch {after['batch_size']}, after", after, "direct-after")]:
    print(f"{label:<34} {r['rows_per_sec']:>9.1f} {r['mean_batch_ms']:>8.1f} {'-':>8} {r['rows_per_sec'] / reference:>10.2f} {steal_percent(out, run):>8.1f}")
for name, trend in (("rest", "http_req_duration"), ("grpc", "grpc_req_duration")):
    m = json.load(open(f"{out}/{name}.json"))["metrics"]
    rate = m["iterations"]["rate"]
    d = m[trend]
    label = "gateway REST /v1/embeddings b64" if name == "rest" else "gateway gRPC ModelInfer"
    print(f"{label:<34} {rate:>9.1f} {d['med']:>8.1f} {d['p(99)']:>8.1f} {rate / reference:>10.2f} {steal_percent(out, name):>8.1f}")
for name, label in (("rest", "gateway REST OIP infer, lean"), ("grpc", "gateway gRPC ModelInfer, lean")):
    r = json.load(open(f"{out}/lean-{name}.json"))
    if r["errors"]:
        sys.exit(f"{label}: {r['errors']} errors, first: {r['first_error']}")
    print(f"{label:<34} {r['rps']:>9.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['rps'] / reference:>10.2f} {steal_percent(out, 'lean-' + name):>8.1f}")
metrics = open(f"{out}/metrics.txt").read()
def total(name):
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", metrics, re.M))
rows, batches = total("rankway_batch_rows_sum"), total("rankway_batch_rows_count")
print(f"\nmean gateway batch: {rows / max(batches, 1):.1f} rows over {int(batches)} batches; "
      f"* direct rows: mean ms per batch; ratio = rows/s over the mean of the best direct "
      f"rows/s (batch {best['batch_size']}) before and after the gateway runs")
PY
