#!/usr/bin/env bash
# `make bench-generate`: streaming generation through the gateway against the same group
# straight at its rank 0, at 1, 8 and 32 concurrent streams (STREAMS), with the lean
# streaming load generator (gateway/examples/genload.rs; k6 cannot read SSE as it
# arrives), for each kind of matrices in WEIGHTS (`--weights`: auto, f32, bf16, f16,
# int8; default "f32 f16 int8"; see docs/generation.md), one kind after the other. One
# 1-rank SmolLM2 group (RANKS=3 for a 3-rank group under `launch`), one gateway with
# default flags; greedy answers of up to MAX_TOKENS (64). Prints the CPU's flags that
# matter here, then per kind generated tokens/s, time to first token and inter-token time
# (p50/p99), the gateway's share of the direct tokens/s, and the group's resident memory
# (every rank's VmRSS summed, read after the runs). Everything binds to loopback; each run
# lasts DURATION (20s) after a 3 s warm-up.
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
WEIGHTS=${WEIGHTS:-f32 f16 int8}
bench_init

# Resident memory of a process and its children (the ranks under `launch`), in MiB.
group_rss_mib() {
  local total=0 p kb
  for p in "$1" $(pgrep -P "$1" || true); do
    kb=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo $((total / 1024))
}

print_cpu
for kind in $WEIGHTS; do
  HTTP=127.0.0.1:$(free_port)
  WORKER_PORT=$(free_port)
  if [ "$RANKS" = 1 ]; then
    $BIN/rankway-worker serve --model smollm2 --weights "$kind" --listen "127.0.0.1:$WORKER_PORT" \
      --metrics-listen 127.0.0.1:0 --group bench 2>"$OUT/worker-$kind.log" &
  else
    $BIN/rankway-worker launch --groups 1 --ranks-per-group "$RANKS" --port "$WORKER_PORT" --follower-port 0 \
      --metrics-port 0 --master-port "$(free_port)" -- --model smollm2 --weights "$kind" 2>"$OUT/worker-$kind.log" &
  fi
  group=$!
  pids+=("$group")
  $BIN/rankway-gateway --http-listen "$HTTP" --grpc-listen "127.0.0.1:$(free_port)" \
    --group "bench=127.0.0.1:$WORKER_PORT" 2>"$OUT/gateway-$kind.log" &
  pids+=($!)
  wait_url "http://$HTTP/v2/models/smollm2/ready" 120 || { cat "$OUT"/*.log >&2; exit 1; }
  for n in $STREAMS; do
    echo "bench-generate: $kind, $n streams, direct then through the gateway" >&2
    $GENLOAD --worker "127.0.0.1:$WORKER_PORT" --streams "$n" --duration "$DURATION" --max-tokens "$MAX_TOKENS" >"$OUT/$kind-direct-$n.json"
    $GENLOAD --gateway "$HTTP" --streams "$n" --duration "$DURATION" --max-tokens "$MAX_TOKENS" >"$OUT/$kind-gateway-$n.json"
  done
  group_rss_mib "$group" >"$OUT/$kind.rss"
  grep -o 'weights=[A-Za-z0-9]*' "$OUT/worker-$kind.log" | head -n1 | cut -d= -f2 >"$OUT/$kind.weights"
  stop_all
done

python3 - "$OUT" "$STREAMS" "$RANKS" "$WEIGHTS" <<'PY'
import json, sys
out, streams, ranks, kinds = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4].split()
def ms(v):  # None when no generation reached that point inside the window
    return f"{v:.1f}" if v is not None else "-"
for kind in kinds:
    weights = open(f"{out}/{kind}.weights").read().strip()
    rss = open(f"{out}/{kind}.rss").read().strip()
    print(f"SmolLM2, {ranks} rank(s), --weights {kind} ({weights} matrices), group RSS {rss} MiB; "
          "tokens/s over the window, TTFT and inter-token time in ms")
    print(f"{'streams':>7} {'path':<8} {'gens':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'errors':>6} {'vs direct':>9}")
    for n in streams:
        d = json.load(open(f"{out}/{kind}-direct-{n}.json"))
        for name in ("direct", "gateway"):
            r = json.load(open(f"{out}/{kind}-{name}-{n}.json"))
            ratio = r["tokens_per_sec"] / d["tokens_per_sec"] if d["tokens_per_sec"] else float("nan")
            print(f"{n:>7} {name:<8} {r['generations']:>5} {r['tokens_per_sec']:>8.1f} {ms(r['ttft_p50_ms']):>9} "
                  f"{ms(r['ttft_p99_ms']):>9} {ms(r['itl_p50_ms']):>8} {ms(r['itl_p99_ms']):>8} {r['errors']:>6} {ratio:>9.2f}")
            if r["errors"]:
                print(f"  first error: {r['first_error']}")
PY
