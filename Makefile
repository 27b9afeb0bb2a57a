# One-line entry points (README): `make demo` runs the main job, `make test` the tests.
# Both create .venv, install torch==2.13.0 (CPU) when no torch is importable there, build
# the extension in place (incrementally, with ninja) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.dmmd-deps
INSTALLED := $(VENV)/.dmmd-installed
export MAX_JOBS ?= 2

.PHONY: all build test bench bench-quick demo lint info clean

all: test

LOG := build/make.log

# Each step's output goes to $(LOG); the terminal gets one line per step (and the log's tail
# when a step fails).
define quiet
	@mkdir -p build; echo "$(1) (log: $(LOG))"; ( $(2) ) >> $(LOG) 2>&1 || { tail -n 40 $(LOG); exit 1; }
endef

$(DEPS): pyproject.toml
	$(call quiet,python environment $(VENV),test -x $(PY) || $(PYTHON) -m venv $(VENV))
	$(call quiet,torch,$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0)
	$(call quiet,python packages,$(PY) -m pip install -q setuptools wheel ninja numpy tqdm safetensors transformers matplotlib pytest "pytest-xdist>=3.2" pytest-benchmark scipy scikit-learn pillow ruff)
	@touch $@

# The package in editable mode, without compiling: `build` compiles the extension once, in place.
$(INSTALLED): $(DEPS) setup.py
	$(call quiet,dmmd (editable),DMMD_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .)
	@touch $@

build: $(INSTALLED)
	$(call quiet,compiling dmmd_ops._C (incremental),$(PY) setup.py build_ext --inplace)
	@$(PY) -c "import dmmd_ops, sys; sys.exit(0 if dmmd_ops.EXTENSION_LOADED else 1)"

# The test suite in TEST_WORKERS pytest-xdist workers, one per core (worksteal: an idle worker
# takes tests queued for the other, so the slow ones do not leave a core idle at the end), with
# its 15 slowest tests (12 min 45 s to 14 min 25 s on the 2-core AMD EPYC of 2026-12-07, idle; 26 min 40 s in
# one process there), then a smoke run of the benchmarks (2 min).
TEST_WORKERS ?= 2
test: build
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15
	DMMD_BENCH_QUICK=1 $(PY) -m pytest -q -p no:cacheprovider bench --benchmark-disable

bench: build
	mkdir -p runs
	$(PY) -m pytest -q bench --benchmark-json=runs/bench.json
	$(PY) bench/report.py runs/bench.json --wide

bench-quick: build
	mkdir -p runs
	DMMD_BENCH_QUICK=1 $(PY) -m pytest -q bench --benchmark-json=runs/bench-quick.json
	$(PY) bench/report.py runs/bench-quick.json --wide

# The main job (README): `dmmd demo`: teachers and few-step D-MMD students on digits, uniform and
# masked, tables, verdicts, grids and plots under runs/demo (re-running resumes).
# DEMO_FLAGS=--quick for the smoke-test version; DEMO_FLAGS="--data digits words" adds the
# Markov chain over words; DEMO_FLAGS="--data text" runs the embedded text.
demo: build
	$(PY) -m dmmd demo $(DEMO_FLAGS)

lint: $(DEPS)
	$(PY) -m ruff check dmmd_ops dmmd tests bench scripts setup.py

info: build
	$(PY) -m dmmd_ops.info

clean:
	rm -rf build build-cuda dmmd_ops/_C*.so dmmd_ops/_build_info.json *.egg-info
