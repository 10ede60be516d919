#!/usr/bin/env bash
# `make bench-pool`: the pool with two 1-rank groups against one, through the gateway.
#  1. capacity (k6 closed loop, $VUS VUs) with both groups, then with one;
#  2. p99 latency at 70% of the two-group capacity (k6 open loop), with both groups,
#     then after one group is lost (its rank SIGKILLed; the launcher is told not to
#     hurry back: --backoff 60s).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
BIN=target/release
bench_init
HTTP=127.0.0.1:18200

start() { # $1 = gateway group flags
  $BIN/rankway-worker --log-format json launch --groups 2 --ranks-per-group 1 --port 19300 \
    --follower-port 19400 --master-port 29950 --backoff 60s 2>"$OUT/launch.log" &
  pids+=($!)
  # shellcheck disable=SC2086
  $BIN/rankway-gateway --http-listen $HTTP --grpc-listen 127.0.0.1:18201 $1 2>"$OUT/gateway.log" &
  pids+=($!)
  wait_ready "$HTTP"
  sleep 2 # let every listed group pass a health check
}
k6() { # $1 = summary file; env decides closed/open loop
  k6_embeddings "$HTTP" "$1" || true
}
both="--group g0=127.0.0.1:19300 --group g1=127.0.0.1:19301"

start "$both"; k6 cap2; stop_all
start "--group g0=127.0.0.1:19300"; k6 cap1; stop_all
RATE=$(python3 -c "import json;print(max(1,int(0.7*json.load(open('$OUT/cap2.json'))['metrics']['iterations']['rate'])))")
export RATE DURATION=${DURATION:-20s}
start "$both"; k6 rate_both
g1_pid=$(python3 - "$OUT/launch.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        f = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if f.get("message") == "group started" and f.get("group") == "g1":
        print(f["pids"].strip("[]").split(",")[0])
PY
)
kill -9 "$g1_pid"
sleep 2
k6 rate_one
stop_all

python3 - "$OUT" "$RATE" <<'PY'
import json, sys
out, rate = sys.argv[1], sys.argv[2]
def m(name):
    return json.load(open(f"{out}/{name}.json"))["metrics"]
c2, c1 = m("cap2")["iterations"]["rate"], m("cap1")["iterations"]["rate"]
print(f"capacity: 2 groups {c2:.1f} req/s, 1 group {c1:.1f} req/s, ratio {c2 / c1:.2f}")
for name, label in (("rate_both", "both groups"), ("rate_one", "one group lost")):
    x = m(name)
    d = x["http_req_duration"]
    failed = x.get("http_req_failed", {}).get("value", 0.0)
    print(f"at {rate} req/s (70% of 2-group capacity), {label}: p50 {d['med']:.1f} ms, "
          f"p99 {d['p(99)']:.1f} ms, served {x['iterations']['rate']:.1f} req/s, failed {100 * failed:.1f}%")
PY
