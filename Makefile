# cnnlab: `make run` trains the default model, `make test` runs the tests; both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The offline copy of fashion_mnist beside this repo; elsewhere TFDS downloads it.
SHARED_DATA ?= $(abspath ../shared/data/tfds_array_record)
export TFDS_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: help setup setup-tpu run test test-full lint bench faults mutants clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/cnnlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,prepare]'
	@touch $@

setup: $(BIN)/cnnlab ## create .venv and install cnnlab with its test tools

# `cnnlab compile tpu:...` and tests/test_compile.py: libtpu in an environment of its own that
# sees .venv's packages, cnnlab included (a .pth file), so that .venv's JAX never loads it
# (docs/scale.md).
TPU_VENV ?= .venv-tpu
$(TPU_VENV)/bin/python: pyproject.toml | $(BIN)/cnnlab
	$(PYTHON) -m venv $(TPU_VENV)
	$(abspath $(BIN))/python -c 'import site; print(f"import site; site.addsitedir({site.getsitepackages()[0]!r})")' \
	  > $$($(TPU_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/cnnlab-main.pth
	$(TPU_VENV)/bin/pip install --quiet --no-deps 'libtpu==0.0.42.*'
	@touch $@

setup-tpu: setup $(TPU_VENV)/bin/python ## .venv-tpu: .venv plus libtpu, for `cnnlab compile tpu:...`

run: setup ## train ResNet-20 on fashion_mnist (the default config) and report test error
	$(BIN)/cnnlab train $(ARGS)

# Three test processes on 2 cores: tests wait on single-threaded XLA compiles, on the processes
# they start and on files (529 tests: 6 min 38 s with three against 7 min 44 s with two).
# --durations: the suite's time is a figure we keep under 20 min; CI's log then names its slowest tests.
test: setup setup-tpu ## run the test suite (skips tests marked slow)
	$(BIN)/pytest -q -n 3 --dist worksteal -m "not slow" --durations=15 $(ARGS)

test-full: setup setup-tpu ## run every test, slow ones included
	$(BIN)/pytest -q -n 3 --dist worksteal $(ARGS)

lint: setup ## ruff
	$(BIN)/ruff check .

faults: setup ## the fault scenarios (kills, corruptions, full disk, bad values) through the CLI, counted
	$(BIN)/python benchmarks/faults.py --out benchmarks/results/faults.md $(ARGS)

mutants: setup ## break each technique in a copy of the repo, one at a time: a test must fail
	$(BIN)/python tests/mutants.py --out benchmarks/results/mutants.md $(ARGS)

bench: setup ## the benchmark suite: cnnlab vs PyTorch eager and torch.compile, 6 CNNs
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench.py $(ARGS)

clean: ## remove run outputs (not the venv)
	rm -rf outputs multirun .pytest_cache
