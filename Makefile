# Rankway: `make run` serves on loopback, `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo
JOBS ?= 2
# libtorch comes from the torch wheel in the project's venv (scripts/setup.sh). Looked up
# with $(shell) when a recipe runs, after `setup` created .venv: $(wildcard) would answer
# from make's cached directory listing, empty on a fresh clone.
export LIBTORCH = $(shell ls -d $(CURDIR)/.venv/lib/python3*/site-packages/torch 2>/dev/null | head -n1)
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: all setup build run test structure manifests images example-agent bench bench-overhead bench-generate bench-vs-llamacpp bench-groups bench-pool bench-tracing fuzz lint clean

all: build

setup:
	scripts/setup.sh

build: setup
	$(CARGO) build --release -j$(JOBS) --workspace --bins

## The main job on loopback: one worker with MiniLM behind the gateway.
run: build
	scripts/run.sh

## The whole test suite: manifest schemas, unit tests, then integration tests on the
## real binaries (deploy_manifests.rs runs the rendered Kubernetes manifests).
test: build structure manifests
	$(CARGO) test --release -j$(JOBS) --workspace -- --test-threads=1

## The fuzz targets (`fuzz_*` property tests: REST JSON tensors, OpenAI bodies, OIP gRPC
## validation, raw BYTES, grpc-timeout and Request-Timeout, the step header, safetensors
## headers) at a million cases each; `make test` runs them at 2,000.
FUZZ_CASES ?= 1000000
fuzz: build
	RANKWAY_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --release -j$(JOBS) --workspace --lib fuzz_ -- --test-threads=1 --nocapture

## The layout's rules, checked: no import cycle between files of a crate; models free of
## wire types; front ends never touch the pool; no source file over 500 lines before its
## unit tests; every doc link and make target named in the docs resolves
## (docs/architecture.md, "Layout rules").
structure:
	python3 scripts/check_module_cycles.py --self-test
	python3 scripts/check_module_cycles.py
	@if grep -rnE '\b(rankway_proto|prost|tonic)\b' worker/src/models | grep -v 'rankway_proto::limits'; then \
	  echo "structure: worker/src/models must not use wire types"; exit 1; fi
	@if grep -rnE '\bpool\b' gateway/src/frontend; then \
	  echo "structure: gateway/src/frontend must not reach the pool"; exit 1; fi
	python3 scripts/check_file_length.py
	python3 scripts/check_docs.py --self-test
	python3 scripts/check_docs.py
	@echo "structure: ok"

## Every kustomization in deploy/, rendered and validated against Kubernetes 1.37 schemas.
manifests: setup
	.venv/bin/python scripts/check_manifests.py

## Container images built with podman (no registry), then smoke-run on loopback.
images: build
	scripts/build_images.sh

## Direct model throughput vs through the gateway (k6 and the lean load generator, 32 clients).
bench: build
	$(CARGO) build --release -j$(JOBS) -p rankway-gateway --example loadgen
	scripts/bench.sh

## The gateway's own cost: a no-op model behind it, a lean load generator at 1, 8 and 64
## connections over REST and gRPC.
bench-overhead: build
	$(CARGO) build --release -j$(JOBS) -p rankway-gateway --example loadgen
	scripts/bench_overhead.sh

## The LangGraph agent (examples/langgraph_agent) against `make run` on :8000.
example-agent: setup
	.venv-clients/bin/python examples/langgraph_agent/agent.py $(QUESTION)

## Streaming generation through the gateway vs straight at rank 0, 1/8/32 streams.
bench-generate: build
	$(CARGO) build --release -j$(JOBS) -p rankway-gateway --example genload
	scripts/bench_generate.sh

## Rankway against llama.cpp's llama-server on the same GGUF, load and host, 1/8/32
## streams (builds llama-server from the llama-cpp-python sdist once, into .llamacpp/).
bench-vs-llamacpp: build
	$(CARGO) build --release -j$(JOBS) -p rankway-gateway --example genload
	scripts/bench_vs_llamacpp.sh

## One 1-rank group vs one 2-rank group, same machine, through the gateway.
bench-groups: build
	scripts/bench_groups.sh

## Two groups vs one, and p99 at 70% load before and after losing a group.
bench-pool: build
	scripts/bench_pool.sh

## One 2-rank group with tracing off vs on (100% sampled, exported to a loopback sink).
bench-tracing: build
	scripts/bench_tracing.sh

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release -j$(JOBS) --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
