# dreambench — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
# requirements/lock.txt: every package .venv gets, exact versions with hashes, resolved by uv from
# pyproject.toml's ranges (`make lock`). torch in it is 2.13.0+cpu, the CPU build on the project's machines.
LOCK := requirements/lock.txt
# TORCH=<requirement>: replace the locked torch by another build after the locked install (e.g. a CUDA build:
# TORCH=torch==2.13.0 PIP_EXTRA_INDEX_URL=<a PyTorch CUDA index>); `make test` then leaves torch out of its
# comparison of .venv with the lock.
TORCH ?=
# LATEST=1: the newest versions pyproject.toml allows instead of the lock (what install-latest/test-latest use).
LATEST ?=
# Where uv finds torch's CPU build for `make lock` (on the project's machines; elsewhere pass
# UV_ARGS='--extra-index-url <the PyTorch CPU index>'). UPGRADE=1: newest allowed versions, not the fewest changes.
TORCH_LINKS ?= $(wildcard /opt/wheels)
UV_ARGS ?=
UPGRADE ?=
PYTEST_ARGS ?=

# The DreamBench data set: ../shared/dreambench-dataset when it exists, unless DREAMBENCH_DATA is set.
SHARED_DATA := $(abspath ../shared/dreambench-dataset)
ifeq ($(DREAMBENCH_DATA),)
ifneq ($(wildcard $(SHARED_DATA)/prompts_and_classes.txt),)
export DREAMBENCH_DATA := $(SHARED_DATA)
endif
endif

.DEFAULT_GOAL := help
.PHONY: help install install-latest lock lock-check postgres demo demo-tiny test test-fast test-latest clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_.-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-16s %s\n", $$1, $$2}'

ifeq ($(LATEST),)
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(if $(TORCH),$(PIP) install -q "$(TORCH)")
	touch $(STAMP)
else
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade --upgrade-strategy eager -r requirements/tools.in -e ".[dev,cluster]" \
	  $(if $(TORCH),"$(TORCH)",-c requirements/constraints.txt)
	touch $(STAMP)
endif

install: $(STAMP) ## create .venv and install exactly requirements/lock.txt (torch: the CPU build; no torchvision)

install-latest: ## .venv-latest: the newest versions pyproject.toml allows, not the lock
	$(MAKE) install VENV=.venv-latest LATEST=1
	@$(MAKE) --no-print-directory lock-diff VENV=.venv-latest LATEST=1

lock: $(STAMP) ## regenerate requirements/lock.txt from pyproject.toml with uv (UPGRADE=1: newest allowed versions)
	$(BIN)/uv pip compile pyproject.toml requirements/tools.in --extra dev --extra cluster \
	  --constraint requirements/constraints.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  $(addprefix --find-links ,$(TORCH_LINKS)) $(UV_ARGS) $(if $(UPGRADE),--upgrade) --generate-hashes \
	  --custom-compile-command "make lock" --quiet -o $(LOCK)
	$(BIN)/python requirements/lock.py stamp

lock-check: $(STAMP) ## the lock matches pyproject.toml, and .venv holds exactly the locked versions
	$(BIN)/python requirements/lock.py check
	$(BIN)/python requirements/lock.py env $(if $(TORCH),--allow torch)

.PHONY: lock-diff
lock-diff:
	@$(BIN)/python requirements/lock.py env --report

# Debian's PostgreSQL server for tests/test_sweep_storage.py (the test starts its own throw-away cluster).
postgres: ## install Debian's PostgreSQL server for the tests when it is missing (as root; a warning otherwise)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing Debian's postgresql package (tests/test_sweep_storage.py needs its server)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
	      || echo "make: could not install postgresql; the tests marked postgres will fail" >&2; \
	  else \
	    echo "make: PostgreSQL's server is missing and this is not root: the tests marked postgres will fail" \
	      "(sudo apt-get install postgresql, or PYTEST_ARGS='-m \"not postgres\"')" >&2; \
	  fi; }

# The demo: DreamBooth on a subject of the toy world (docs/TOY_WORLD.md), on model=toy, which the first run builds
# into the cache (~15-20 min on 2 CPU cores, once). samples/before_after.png shows what training changed.
DEMO_SUBJECT ?= toy_car1
demo: $(STAMP) ## DreamBooth on a toy-world subject (CPU; builds model=toy once, ~20 min) and print the run folder
	$(BIN)/python -m dreambench.world build --no-encoders
	$(BIN)/python -m dreambench.train +experiment=$(DEMO_SUBJECT)

demo-tiny: $(STAMP) ## the dog experiment on the random tiny model (CPU, ~1 min): a smoke run, nothing to see
	$(BIN)/python -m dreambench.train +experiment=dog model=tiny +preset=smoke

# On the lock (not LATEST=1): first check that requirements/lock.txt is pyproject.toml's and .venv is that lock.
TEST_CHECK := $(if $(LATEST),,lock-check)

test: $(STAMP) postgres $(TEST_CHECK) ## the test suite (CPU; includes the slower end-to-end tests), on the lock
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

test-fast: $(STAMP) postgres $(TEST_CHECK) ## the test suite without tests marked slow
	$(BIN)/python -m pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

test-latest: ## the test suite on the newest versions pyproject.toml allows (.venv-latest), not the lock
	$(MAKE) install-latest
	$(MAKE) test VENV=.venv-latest LATEST=1

clean-runs: ## remove the run folders under experiments/ (keeps the recipes)
	find experiments -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +

# docs/BENCHMARKS.md. BENCH_ARGS: e.g. --quick, --cases overhead,startup, --reps 7.
BENCH_ARGS ?=
.PHONY: bench
bench: $(STAMP) ## dreambench vs a plain PyTorch reference loop, side by side (+ GPU cases when CUDA is there) -> bench/results/
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# One prepared call for a session with a GPU (bench/gpu_check.py): SD 1.5 step (ms, MFU, peak vs plan, reference),
# class and evaluation images/s, syncs, a bf16 end-to-end run with compile off and on; stops itself inside
# GPU_CHECK_ARGS' --budget-s (default 480 s). On a CPU the GPU cases say "skipped" and the end-to-end chain runs
# on the tiny model.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: $(STAMP) ## everything a GPU session should measure, in one call inside 8 minutes -> bench/results/gpu-*
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

# The paper's tables (experiments/README.md). TABLE_ARGS: more Hydra overrides for training; SUBJECTS=a,b and
# SEEDS=0,1 narrow or widen a table; OUT=... moves its folder.
TABLE_ARGS ?= trainer=gpu
.PHONY: table1 table3 table4 table1-smoke table3-smoke table4-smoke table1-toy table3-toy table4-toy toy-tables toolbox-toy

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

# On the toy world (docs/TOY_WORLD.md; `make toy-world` first): its 20 subjects x seeds 0,1,2 unless SUBJECTS= / SEEDS=.
table1-toy: $(STAMP) ## Table 1 on the toy world (model=toy, metrics=toy; CPU)
	PY=$(BIN)/python bash experiments/table1.sh --toy

table3-toy: $(STAMP) ## Table 3 on the toy world (CPU)
	PY=$(BIN)/python bash experiments/table3.sh --toy

table4-toy: $(STAMP) ## Table 4 on the toy world (CPU)
	PY=$(BIN)/python bash experiments/table4.sh --toy

# All three tables from one set of runs, the shared DreamBooth row trained once (experiments/tables.sh), two
# single-threaded groups of subjects side by side on a 2-core machine. TOY_SUBJECTS: one subject of each of 8
# classes, as in docs/TOY_WORLD.md's tables; SUBJECTS= / SEEDS= / JOBS= override, SUBJECTS=all runs all 20 (~75 min
# on 2 cores); TABLE_ARGS=resume=auto extends an earlier run (its finished runs are left as they are).
TOY_SUBJECTS := toy_ball1,toy_box1,toy_cup2,toy_house1,toy_tree1,toy_star1,toy_fish1,toy_car1
toy-tables: toy-world ## Tables 1, 3 and 4 on the toy world, one report (8 subjects x seeds 0,1,2; CPU)
	S=$${SUBJECTS:-$(TOY_SUBJECTS)}; [ "$$S" = all ] && S=; \
	SUBJECTS=$$S JOBS=$${JOBS:-$$(( $$(nproc) < 2 ? $$(nproc) : 2 ))} \
	  PY=$(BIN)/python bash experiments/tables.sh --toy $(TABLE_ARGS)

toolbox-toy: $(STAMP) ## each training switch against DreamBooth with none, on the toy world (docs/TOOLBOX.md; CPU)
	PY=$(BIN)/python bash experiments/toolbox.sh --toy

# The toy world (docs/TOY_WORLD.md): a data set, a pretrained model (model=toy) and encoders (metrics=toy) the
# project builds itself, once, into the cache.
.PHONY: toy-world toy-check
toy-world: $(STAMP) ## build the toy world's data set, model=toy and metrics=toy into the cache (once; ~40 min on 2 CPU cores)
	$(BIN)/python -m dreambench.world build

toy-check: toy-world ## how well model=toy draws what class prompts name, and whether the toy encoders rank as DINO/CLIP should
	$(BIN)/python -m dreambench.world check --out toy-check
