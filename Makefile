# Two commands on a fresh machine with Python 3.11 and make: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

# Also installs the `distributed` extra (Ray), pinned, so that the tests of `circuits batch run --backend ray` run,
# and the test-only packages: Playwright (drives Debian's chromium), nbclient (runs the tutorial), circuit-tracer.
$(STAMP): requirements.lock requirements-test.lock pyproject.toml scripts/batch/requirements-distributed.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q -r scripts/batch/requirements-distributed.lock -c requirements.lock
	$(BIN)/python -m pip install -q -r requirements-test.lock -c requirements.lock
	$(BIN)/python -m pip install -q --no-deps circuit-tracer==0.5.0
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/circuits suite-eval --model mini --json --out out/demo
	$(BIN)/circuits trace --model mini --threshold 0.05 --prompt "$$(printf 'import os\nimport sys\n\ndef main(args):\n    for name in args:\n        print(name')" --out out/demo

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "not gpu"

clean:
	rm -rf out .pytest_cache
