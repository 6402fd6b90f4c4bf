# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first so pip does not pull a multi-GB CUDA build;
# on a GPU machine install the torch you want before `pip install -e .`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: demo demo-quick test lint clean

$(BIN)/rho1: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(BIN)/rho1

demo: $(BIN)/rho1
	$(BIN)/rho1 demo

demo-quick: $(BIN)/rho1
	$(BIN)/rho1 demo --preset quick --out runs/demo-quick

test: $(BIN)/rho1
	$(BIN)/python -m pytest

lint: $(BIN)/rho1
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
