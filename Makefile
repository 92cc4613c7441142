# Two commands: `make demo` (main job on embedded data) and `make test`.
# Both create or refresh .venv from the pinned constraints, using only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,tensorboard]'
	touch $(STAMP)

# The default run: LeNet-5 on the embedded digits, economy metrics, checkpoints, plots,
# then the checkpoint analyses (paths, landscape, trajectory, robustness) in runs/demo/analysis,
# then the diagnosis of the run (runs/demo/diagnosis.json, diagnosis.png; its exit status 1
# means "a problem was found", which is a result, not a failure of the demo).
demo: $(STAMP)
	rm -rf runs/demo
	MPLBACKEND=Agg $(VENV)/bin/jaxscope train --out runs/demo --no-plots
	MPLBACKEND=Agg $(VENV)/bin/jaxscope plot runs/demo
	MPLBACKEND=Agg $(VENV)/bin/jaxscope analyze runs/demo all --grid -1:1:11 --eval-examples 300
	MPLBACKEND=Agg $(VENV)/bin/jaxscope diagnose runs/demo || test $$? -eq 1

# Tests share XLA's persistent compilation cache (also across the CLI subprocesses they
# start): the same programs are compiled by many tests, and a cache hit costs a file read
# instead of a compilation. It lives in .cache/jax (git-ignored; `rm -rf .cache` empties it).
JAX_CACHE := JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(JAX_CACHE) MPLBACKEND=Agg $(PY) -m pytest -q -n 2 --dist worksteal

# The inner loop: ruff and the tests not marked slow (under 3 minutes on 2 cores).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(JAX_CACHE) MPLBACKEND=Agg $(PY) -m pytest -q -n 2 -m "not slow"

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/overhead.py --out benchmarks/results/overhead-cpu.json
	$(PY) benchmarks/throughput.py --out benchmarks/results/throughput-cpu.json
	$(PY) benchmarks/ratio_lr.py --out benchmarks/results/ratio-lr-cpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
