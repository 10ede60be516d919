#!/usr/bin/env bash
# `make bench-vs-llamacpp`: Rankway against llama.cpp's `llama-server` on the same GGUF
# (models/smollm2), the same load (gateway/examples/genload.rs: OpenAI chat streams,
# greedy, up to MAX_TOKENS tokens) and the same host, in one run: for each STREAMS count,
# first Rankway (one 1-rank group with --weights WEIGHTS, default int8, behind the
# gateway), then llama-server (the file's own 4-bit blocks, `-np 32` slots so it never
# queues, 2 threads). llama-server is built from the source that the PyPI sdist of
# llama-cpp-python vendors (LLAMACPP_VERSION, sha256 checked), with cmake from PyPI, into
# .llamacpp/ (about 6 minutes on 2 cores, once; GGML_NATIVE, so it uses every extension
# this CPU has, as a user's build would). Prints the CPU's flags, then tokens/s, TTFT and
# inter-token time per server and Rankway's ratio. Everything binds to loopback; each run
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
WEIGHTS=${WEIGHTS:-int8}
LLAMACPP_VERSION=0.3.36
LLAMACPP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
DIR=$PWD/.llamacpp
GGUF=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SERVER=$DIR/build/bin/llama-server
bench_init

if [ ! -x "$SERVER" ]; then
  echo "bench-vs-llamacpp: building llama-server from llama-cpp-python $LLAMACPP_VERSION (once)" >&2
  mkdir -p "$DIR"
  [ -x "$DIR/venv/bin/cmake" ] || { python3 -m venv "$DIR/venv" && "$DIR/venv/bin/pip" install -q cmake; }
  sdist=$DIR/sdist/llama_cpp_python-$LLAMACPP_VERSION.tar.gz
  [ -f "$sdist" ] || "$DIR/venv/bin/pip" download -q --no-deps --no-binary=llama-cpp-python \
    "llama-cpp-python==$LLAMACPP_VERSION" -d "$DIR/sdist"
  echo "$LLAMACPP_SHA256  $sdist" | sha256sum -c --quiet
  tar xzf "$sdist" -C "$DIR"
  src=$DIR/llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp
  "$DIR/venv/bin/cmake" -S "$src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  "$DIR/venv/bin/cmake" --build "$DIR/build" --target llama-server -j2 >/dev/null
fi

print_cpu
for n in $STREAMS; do
  echo "bench-vs-llamacpp: $n streams, Rankway ($WEIGHTS) then llama-server" >&2
  HTTP=127.0.0.1:$(free_port)
  WORKER_PORT=$(free_port)
  $BIN/rankway-worker serve --model smollm2 --weights "$WEIGHTS" --listen "127.0.0.1:$WORKER_PORT" \
    --metrics-listen 127.0.0.1:0 --group bench 2>"$OUT/worker.log" &
  pids+=($!)
  $BIN/rankway-gateway --http-listen "$HTTP" --grpc-listen "127.0.0.1:$(free_port)" \
    --group "bench=127.0.0.1:$WORKER_PORT" 2>"$OUT/gateway.log" &
  pids+=($!)
  wait_url "http://$HTTP/v2/models/smollm2/ready" 120 || { cat "$OUT"/*.log >&2; exit 1; }
  $GENLOAD --gateway "$HTTP" --streams "$n" --duration "$DURATION" --max-tokens "$MAX_TOKENS" >"$OUT/rankway-$n.json"
  stop_all
  LLAMA=127.0.0.1:$(free_port)
  # 32 slots of 512 tokens each: room for every stream's prompt and answer.
  "$SERVER" -m "$GGUF" --host 127.0.0.1 --port "${LLAMA#*:}" -np 32 -c 16384 -t 2 --no-webui \
    >"$OUT/llama.log" 2>&1 &
  pids+=($!)
  wait_url "http://$LLAMA/health" 120 || { cat "$OUT"/*.log >&2; exit 1; }
  $GENLOAD --gateway "$LLAMA" --streams "$n" --duration "$DURATION" --max-tokens "$MAX_TOKENS" >"$OUT/llama-$n.json"
  stop_all
done

python3 - "$OUT" "$STREAMS" "$WEIGHTS" <<'PY'
import json, sys
out, streams, weights = sys.argv[1], sys.argv[2].split(), sys.argv[3]
def ms(v):
    return f"{v:.1f}" if v is not None else "-"
print(f"SmolLM2-135M-Instruct Q4_1 GGUF; Rankway --weights {weights}, 1 rank, through the gateway; "
      "llama-server -np 32 -t 2; tokens/s over the window, TTFT and inter-token time in ms")
print(f"{'streams':>7} {'server':<9} {'gens':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'errors':>6} {'Rankway/llama':>13}")
for n in streams:
    rw, ll = (json.load(open(f"{out}/{s}-{n}.json")) for s in ("rankway", "llama"))
    ratio = rw["tokens_per_sec"] / ll["tokens_per_sec"] if ll["tokens_per_sec"] else float("nan")
    for name, r in (("rankway", rw), ("llama.cpp", ll)):
        print(f"{n:>7} {name:<9} {r['generations']:>5} {r['tokens_per_sec']:>8.1f} {ms(r['ttft_p50_ms']):>9} "
              f"{ms(r['ttft_p99_ms']):>9} {ms(r['itl_p50_ms']):>8} {ms(r['itl_p99_ms']):>8} {r['errors']:>6} "
              f"{(f'{ratio:.2f}' if name == 'rankway' else ''):>13}")
        if r["errors"]:
            print(f"  first error: {r['first_error']}")
PY
