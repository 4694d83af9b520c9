# cnnlab: `make run` trains the default model, `make test` runs the tests; both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The offline copy of fashion_mnist beside this repo; elsewhere TFDS downloads it.
SHARED_DATA ?= $(abspath ../shared/data/tfds_array_record)
export TFDS_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: help setup setup-tpu run test test-quick test-full strength lint bench faults mutants clean

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
# `make test` runs every test (CI runs it: .ci/run); tests/conftest.py starts the longest first.
# --durations: CI's log names the slowest tests beside the suite's time (a target: 35 min on 2 cores).
PYTEST := $(BIN)/pytest -q -n 3 --dist worksteal
test: setup setup-tpu ## run the whole test suite, slow tests included (what CI runs)
	$(PYTEST) --durations=25 $(ARGS)

test-quick: setup setup-tpu ## the edit-test loop: every test but those marked slow
	$(PYTEST) -m "not slow" --durations=15 $(ARGS)

test-full: test ## the same as `make test` (its name before every test ran there)

strength: setup ## count each test file's strong, medium and smoke tests (docs/development.md)
	$(BIN)/python tests/strength.py $(ARGS)

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
