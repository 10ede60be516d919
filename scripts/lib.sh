# Shared helpers of the run and bench scripts (sourced, not run).

# Processes started in the background, stopped by stop_all.
pids=()

# SIGTERM every process in $pids and wait for them.
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}

# Waits (up to 60 s) until the gateway at $1 (host:port) says it is ready.
wait_ready() {
  for _ in $(seq 1 600); do
    curl -fsS "http://$1/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "gateway at $1 not ready after 60s" >&2
  return 1
}
