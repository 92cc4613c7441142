# Two commands: `make demo` (main job on embedded data) and `make test`.
# Both create or refresh .venv from the pinned constraints, using only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,tensorboard]'
	touch $(STAMP)

demo: $(STAMP)
	MPLBACKEND=Agg $(PY) examples/quickstart.py --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MPLBACKEND=Agg $(PY) -m pytest -q

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/overhead.py --out benchmarks/results/overhead-cpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
