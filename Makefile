# dreambench — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned: 2.13.0 is the local CPU build on the project's machines; a bare or open-ended torch
# requirement would fetch the newest CUDA build (several GB). Set TORCH=... for another build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

# The DreamBench data set: ../shared/dreambench-dataset when it exists, unless DREAMBENCH_DATA is set.
SHARED_DATA := $(abspath ../shared/dreambench-dataset)
ifeq ($(DREAMBENCH_DATA),)
ifneq ($(wildcard $(SHARED_DATA)/prompts_and_classes.txt),)
export DREAMBENCH_DATA := $(SHARED_DATA)
endif
endif

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_.-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,cluster]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install dreambench (torch pinned, no torchvision)

demo: $(STAMP) ## train the dog experiment on the tiny model (CPU, a few minutes) and print the run folder
	$(BIN)/python -m dreambench.train +experiment=dog model=tiny +preset=smoke

test: $(STAMP) ## the test suite (CPU; includes the slower end-to-end tests)
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

test-fast: $(STAMP) ## the test suite without tests marked slow
	$(BIN)/python -m pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

clean-runs: ## remove the run folders under experiments/ (keeps the recipes)
	find experiments -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +

# docs/BENCHMARKS.md. BENCH_ARGS: e.g. --quick, --cases overhead,startup, --reps 7.
BENCH_ARGS ?=
.PHONY: bench
bench: $(STAMP) ## dreambench vs a plain PyTorch reference loop, side by side (+ GPU cases when CUDA is there) -> bench/results/
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The paper's tables (experiments/README.md). TABLE_ARGS: more Hydra overrides for training; SUBJECTS=a,b and
# SEEDS=0,1 narrow or widen a table; OUT=... moves its folder.
TABLE_ARGS ?= trainer=gpu
.PHONY: table1 table3 table4 table1-smoke table3-smoke table4-smoke

table1: $(STAMP) ## Table 1: DreamBooth vs Textual Inversion, 30 subjects + real images (GPU, real SD weights)
	PY=$(BIN)/python bash experiments/table1.sh $(TABLE_ARGS)

table3: $(STAMP) ## Table 3: prior loss λ=1 vs λ=0, 30 subjects (GPU, real SD weights)
	PY=$(BIN)/python bash experiments/table3.sh $(TABLE_ARGS)

table4: $(STAMP) ## Table 4: class noun correct / none / wrong, 30 subjects (GPU, real SD weights)
	PY=$(BIN)/python bash experiments/table4.sh $(TABLE_ARGS)

table1-smoke: $(STAMP) ## Table 1 end to end on the tiny model: 2 subjects, 2 prompts (CPU, minutes)
	PY=$(BIN)/python bash experiments/table1.sh --smoke

table3-smoke: $(STAMP) ## Table 3 end to end on the tiny model (CPU, minutes)
	PY=$(BIN)/python bash experiments/table3.sh --smoke

table4-smoke: $(STAMP) ## Table 4 end to end on the tiny model (CPU, minutes)
	PY=$(BIN)/python bash experiments/table4.sh --smoke
