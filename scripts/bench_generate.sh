#!/usr/bin/env bash
# `make bench-generate`: streaming generation through the gateway against the same group
# straight at its rank 0, at 1, 8 and 32 concurrent streams (STREAMS), with the lean
# streaming load generator (gateway/examples/genload.rs; k6 cannot read SSE as it
# arrives). One 1-rank SmolLM2 group (RANKS=3 for a 3-rank group under `launch`) holding
# its matrices as DTYPE (auto: bfloat16 on a CPU with AVX512-BF16; float32 or bfloat16),
# one gateway with default flags; greedy answers of up to MAX_TOKENS (64). Prints generated
# tokens/s, time to first token and inter-token time (p50/p99), and the gateway's share of
# the direct tokens/s. Everything binds to loopback; each run lasts DURATION (20s) after
# a 3 s warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=${BIN:-target/release}
GENLOAD=${GENLOAD:-target/release/examples/genload}
DURATION=${DURATION:-20s}
MAX_TOKENS=${MAX_TOKENS:-64}
STREAMS=${STREAMS:-1 8 32}
RANKS=${RANKS:-1}
DTYPE=${DTYPE:-auto}
HTTP=127.0.0.1:$(free_port)
GRPC=127.0.0.1:$(free_port)
WORKER_PORT=$(free_port)
bench_init

if [ "$RANKS" = 1 ]; then
  $BIN/rankway-worker serve --model smollm2 --dtype "$DTYPE" --listen "127.0.0.1:$WORKER_PORT" --metrics-listen 127.0.0.1:0 \
    --group bench 2>"$OUT/worker.log" &
else
  $BIN/rankway-worker launch --groups 1 --ranks-per-group "$RANKS" --port "$WORKER_PORT" --follower-port 0 \
    --metrics-port 0 --master-port "$(free_port)" -- --model smollm2 --dtype "$DTYPE" 2>"$OUT/worker.log" &
fi
pids+=($!)
$BIN/rankway-gateway --http-listen "$HTTP" --grpc-listen "$GRPC" --group "bench=127.0.0.1:$WORKER_PORT" 2>"$OUT/gateway.log" &
pids+=($!)
for _ in $(seq 600); do
  curl -fsS "http://$HTTP/v2/models/smollm2/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://$HTTP/v2/models/smollm2/ready" >/dev/null || { cat "$OUT"/*.log >&2; exit 1; }

for n in $STREAMS; do
  echo "bench-generate: $n streams, direct then through the gateway" >&2
  $GENLOAD --worker "127.0.0.1:$WORKER_PORT" --streams "$n" --duration "$DURATION" --max-tokens "$MAX_TOKENS" >"$OUT/direct-$n.json"
  $GENLOAD --gateway "$HTTP" --streams "$n" --duration "$DURATION" --max-tokens "$MAX_TOKENS" >"$OUT/gateway-$n.json"
done

weights=$(grep -o 'weights=[A-Za-z0-9]*' "$OUT/worker.log" | head -n1 | cut -d= -f2)
python3 - "$OUT" "$STREAMS" "$RANKS" "$weights" <<'PY'
import json, sys
out, streams, ranks, weights = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
print(f"SmolLM2, {ranks} rank(s), {weights} matrices; tokens/s over the window, TTFT and inter-token time in ms")
print(f"{'streams':>7} {'path':<8} {'gens':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'errors':>6} {'vs direct':>9}")
for n in streams:
    d = json.load(open(f"{out}/direct-{n}.json"))
    for name in ("direct", "gateway"):
        r = json.load(open(f"{out}/{name}-{n}.json"))
        ratio = r["tokens_per_sec"] / d["tokens_per_sec"] if d["tokens_per_sec"] else float("nan")
        print(f"{n:>7} {name:<8} {r['generations']:>5} {r['tokens_per_sec']:>8.1f} {r['ttft_p50_ms']:>9.1f} "
              f"{r['ttft_p99_ms']:>9.1f} {r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f} {r['errors']:>6} {ratio:>9.2f}")
        if r["errors"]:
            print(f"  first error: {r['first_error']}")
PY
