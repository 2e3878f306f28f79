# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first, pinned to releases pip finds on this machine's disk.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,ray,serve]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/gradcam explain examples/cat.png examples/coffee.png --out demo-out

test: $(VENV)/.installed-test
	-.ci/install-chromium
	-.ci/install-postgresql
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks

benchmark: $(VENV)/.installed-test
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) demo-out gradcam-out .pytest_cache
