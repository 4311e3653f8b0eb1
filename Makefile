# Set-up and the two entry points of the README: `make demo` (main job) and `make test` (test suite).
# Both create .venv on first use and install the package with the pinned, tested CPU torch.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-cpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/inplace-abn demo

test: setup
	$(PY) -m pytest -q

bench-cpu: setup
	$(PY) benchmarks/cpu_layer.py --json cpu_layer.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
