# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install the package.
# `make test` runs the fast tests; `make test-slow` the end-to-end ones marked slow; CI runs both (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-all gpu-check clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m cultureclip.train

# the fast tests run on 2 processes (pytest-xdist), a test file per process so module fixtures are built once
test: install
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q

# GPU evidence (docs/benchmarks.md): under 8 minutes on one CUDA GPU; writes gpu_check/gpu_check.{json,md}
gpu-check: install
	PYTHONPATH=. $(PY) benchmarks/gpu_check.py --out gpu_check

clean:
	rm -rf build dist *.egg-info .pytest_cache
