# Shared helpers of the run and bench scripts (sourced, not run).

# Processes started in the background, stopped by stop_all.
pids=()

# SIGTERM every process in $pids and wait for them.
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}

# Waits up to $2 seconds until a GET of the URL $1 succeeds.
wait_url() {
  for _ in $(seq 1 $(($2 * 10))); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$1 did not answer within $2 s" >&2
  return 1
}

# Waits (up to 60 s) until the gateway at $1 (host:port) says it is ready.
wait_ready() {
  wait_url "http://$1/v2/health/ready" 60
}

# Prints a TCP port that is free on 127.0.0.1 now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# apt-get installs those of the given Debian packages that are not installed yet
# (apt-get update costs time, so it runs only when something is missing).
apt_install_missing() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  echo "apt-get install ${missing[*]}" >&2
  local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Copies /proc/stat's CPU line to $OUT/$1.cpu-$2 ($2: before or after a run), for the
# run's steal (scripts/steal.py).
cpu_mark() {
  head -1 /proc/stat >"$OUT/$1.cpu-$2"
}

# Common start of the bench scripts: bounded k6 runs, and a scratch folder $OUT that is
# removed at exit, after every process in $pids is stopped.
bench_init() {
  export VUS=${VUS:-32} ITERATIONS=${ITERATIONS:-2000} MAX_DURATION=${MAX_DURATION:-120s}
  OUT=$(mktemp -d)
  trap 'stop_all; rm -rf "$OUT"' EXIT
}

# k6's rest_embeddings.js against the gateway at $1 (host:port); its summary goes to
# $OUT/$2.json. Closed or open loop as the environment says (loadtest/README.md).
k6_embeddings() {
  (cd loadtest && BASE_URL="http://$1" ../.venv/bin/k6 run --no-usage-report -q \
    --summary-export "$OUT/$2.json" rest_embeddings.js >/dev/null)
}

# Starts one group of $1 ranks under `launch` (rank 0 on 127.0.0.1:19100; followers and
# metrics on free ports) and a gateway for it at $BENCH_HTTP (gRPC on the next port), then
# waits until the gateway is ready. Logs go to $OUT/launch-$2.log and $OUT/gateway-$2.log.
BENCH_HTTP=127.0.0.1:18100
start_group_and_gateway() {
  $BIN/rankway-worker launch --groups 1 --ranks-per-group "$1" --port 19100 --follower-port 0 \
    --metrics-port 0 --master-port 29900 2>"$OUT/launch-$2.log" &
  pids+=($!)
  $BIN/rankway-gateway --http-listen "$BENCH_HTTP" --grpc-listen 127.0.0.1:18101 \
    --group "g=127.0.0.1:19100" 2>"$OUT/gateway-$2.log" &
  pids+=($!)
  wait_ready "$BENCH_HTTP"
}

# The CPU a benchmark ran on and the flags that decide its kernels (figures from machines
# with and without AVX-512 differ).
print_cpu() {
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; flags:" \
    "$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512_vnni|avx512_bf16|avx_vnni|amx_[a-z0-9]+)$' | sort | tr '\n' ' ')"
}
