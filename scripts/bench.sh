#!/usr/bin/env bash
# `make bench`: the model's in-process throughput (rankway-worker bench) against the
# same model behind the gateway, one text per request, loaded two ways: by k6 at $VUS
# virtual users over REST (OpenAI embeddings) and gRPC (OIP ModelInfer), as users load it;
# and by the lean one-thread load generator (gateway/examples/loadgen.rs) at $VUS
# connections over OIP REST and gRPC, which measures the gateway's path: on 2 cores k6's
# JavaScript takes CPU the model would use, so its rows understate what the gateway
# passes through. The lean rows send the longest of the direct bench's sentences, so
# every batch pads to the same length as the direct batches. The lean runs alternate with
# direct batch-32 runs (ROUNDS rounds, below). Prints one table.
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

# The host's speed drifts by 10-25% over minutes (other tenants' load), so every gateway
# run alternates with the direct batch-32 run, the issue's reference: ROUNDS rounds of
# direct, k6 REST, k6 gRPC, lean REST, lean gRPC, then direct once more. Each gateway run
# is compared with the mean of the two direct runs around it, and the medians over the
# rounds are the figures.
ROUNDS=${ROUNDS:-3}
direct32() {
  cpu_mark "direct32-$1" before
  $BIN/rankway-worker bench --json --batch-sizes 32 --duration "${BENCH_ROUND_DIRECT_DURATION:-6s}" \
    > "$OUT/direct32-$1.jsonl"
  cpu_mark "direct32-$1" after
}
for round in $(seq "$ROUNDS"); do
  echo "bench: round $round of $ROUNDS: direct batch 32; k6 at $VUS VUs, $ITERATIONS requests per protocol; the lean load generator at $VUS connections" >&2
  direct32 "$round"
  cpu_mark "k6-rest-$round" before
  k6_embeddings "$HTTP" "k6-rest-$round"
  cpu_mark "k6-rest-$round" after
  cpu_mark "k6-grpc-$round" before
  (cd loadtest && GRPC_ADDR="$GRPC" ../$K6 run --no-usage-report -q --summary-export "$OUT/k6-grpc-$round.json" grpc_infer.js >/dev/null)
  cpu_mark "k6-grpc-$round" after
  for proto in rest grpc; do
    addr=$HTTP; [ "$proto" = grpc ] && addr=$GRPC
    cpu_mark "lean-$proto-$round" before
    $LOADGEN --protocol "$proto" --addr "$addr" --connections "$VUS" --duration "${LEAN_DURATION:-8s}" \
      --model minilm --input text --text "Rankway batches requests from many clients before they reach the model." \
      >"$OUT/lean-$proto-$round.json"
    cpu_mark "lean-$proto-$round" after
  done
done
curl -fsS "http://$HTTP/metrics" > "$OUT/metrics.txt"
stop_all
echo "bench: direct batch 32 once more" >&2
direct32 $((ROUNDS + 1))

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, re, statistics, sys
sys.path.insert(0, "scripts")
from steal import steal_percent
out, rounds = sys.argv[1], int(sys.argv[2])

def jsonl(name):
    return [json.loads(l) for l in open(f"{out}/{name}.jsonl")]

direct = jsonl("direct")
direct32 = [jsonl(f"direct32-{i}")[0]["rows_per_sec"] for i in range(1, rounds + 2)]
# The first direct table compares with the mean of every direct batch-32 run.
reference = statistics.mean(direct32)
print(f"{'path':<40} {'rows/s':>9} {'p50 ms*':>8} {'p99 ms':>8} {'vs direct':>10} {'steal %':>8}")
for r in direct:
    print(f"{'direct, batch ' + str(r['batch_size']):<40} {r['rows_per_sec']:>9.1f} {r['mean_batch_ms']:>8.1f} "
          f"{'-':>8} {r['rows_per_sec'] / reference:>10.2f} {steal_percent(out, 'direct'):>8.1f}")

def k6(name):
    """rows/s, p50 and p99 ms of a k6 run from its summary."""
    m = json.load(open(f"{out}/{name}.json"))["metrics"]
    d = m["http_req_duration" if "rest" in name else "grpc_req_duration"]
    return m["iterations"]["rate"], d["med"], d["p(99)"]

def lean(name):
    """rows/s, p50 and p99 ms of a lean load generator run."""
    r = json.load(open(f"{out}/{name}.json"))
    if r["errors"]:
        sys.exit(f"{name}: {r['errors']} errors, first: {r['first_error']}")
    return r["rps"], r["p50_ms"], r["p99_ms"]

paths = [("k6-rest", "k6 REST /v1/embeddings b64", k6), ("k6-grpc", "k6 gRPC ModelInfer", k6),
         ("lean-rest", "lean REST OIP infer", lean), ("lean-grpc", "lean gRPC ModelInfer", lean)]
ratios, p99s = {p: [] for p, _, _ in paths}, {p: [] for p, _, _ in paths}
for i in range(1, rounds + 2):
    print(f"{f'round {i}: direct, batch 32':<40} {direct32[i - 1]:>9.1f} {'-':>8} {'-':>8} "
          f"{direct32[i - 1] / reference:>10.2f} {steal_percent(out, f'direct32-{i}'):>8.1f}")
    if i > rounds:
        break
    around = (direct32[i - 1] + direct32[i]) / 2
    for path, label, read in paths:
        rate, p50, p99 = read(f"{path}-{i}")
        ratios[path].append(rate / around)
        p99s[path].append(p99)
        print(f"{f'round {i}: {label}':<40} {rate:>9.1f} {p50:>8.1f} {p99:>8.1f} {ratios[path][-1]:>10.2f} "
              f"{steal_percent(out, f'{path}-{i}'):>8.1f}")
print(f"\ngateway vs direct batch 32, median of {rounds} rounds (each run against the mean of the direct "
      f"runs before and after it), and median p99:")
for path, label, _ in paths:
    print(f"  {label:<30} {statistics.median(ratios[path]):.2f}x  p99 {statistics.median(p99s[path]):.1f} ms")
metrics = open(f"{out}/metrics.txt").read()
def total(name):
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", metrics, re.M))
rows, batches = total("rankway_batch_rows_sum"), total("rankway_batch_rows_count")
print(f"mean gateway batch: {rows / max(batches, 1):.1f} rows over {int(batches)} batches; "
      f"* direct rows: mean ms per batch; the first direct rows compare with the mean "
      f"of the {rounds + 1} direct batch-32 runs ({reference:.1f} rows/s)")
PY
