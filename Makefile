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

$(DEPS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel ninja numpy tqdm safetensors transformers pytest pytest-benchmark scipy ruff
	touch $@

$(INSTALLED): $(DEPS) setup.py
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(INSTALLED)
	$(PY) setup.py -q build_ext --inplace 2>&1 | grep -vE "Warning|warn|^\s*$$|!!|\*\*\*\*" || true
	$(PY) -c "import dmmd_ops, sys; sys.exit(0 if dmmd_ops.EXTENSION_LOADED else 1)"

test: build
	$(PY) -m pytest -q
	DMMD_BENCH_QUICK=1 $(PY) -m pytest -q -p no:cacheprovider bench --benchmark-disable

bench: build
	mkdir -p runs
	$(PY) -m pytest -q bench --benchmark-json=runs/bench.json
	$(PY) bench/report.py runs/bench.json --wide

bench-quick: build
	mkdir -p runs
	DMMD_BENCH_QUICK=1 $(PY) -m pytest -q bench --benchmark-json=runs/bench-quick.json
	$(PY) bench/report.py runs/bench-quick.json --wide

# The main job on the embedded data, until `dmmd demo` (the distillation demo) exists: a small
# masked-diffusion teacher on the standard library's documentation text (a few minutes on
# 2 cores; resumes if run again), then samples from it at 16 steps.
demo: build
	$(PY) -m dmmd train-teacher --data text --length 64 --width 128 --depth 2 --heads 4 --batch-size 16 \
		--steps 150 --warmup 20 --lr 2e-3 --eval-every 50 --eval-batches 2 --save-every 50 --out runs/demo-teacher
	$(PY) -m dmmd sample --checkpoint runs/demo-teacher/checkpoint --steps 16 --num 2

lint: $(DEPS)
	$(PY) -m ruff check dmmd_ops dmmd tests bench scripts setup.py

info: build
	$(PY) -m dmmd_ops.info

clean:
	rm -rf build build-cuda dmmd_ops/_C*.so dmmd_ops/_build_info.json *.egg-info
