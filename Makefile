# flamefit: `make demo` fits the bundled sample photo, `make test` runs the test suite.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Idempotent: rebuilt only when pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the wheels that lie on this machine's disk (plain `torch` pulls GBs).
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[mediapipe,dev,ray]"
	# the stand-in head, converted once into the model cache (~/.cache/flamefit): loads in 0.03 s, not 0.4
	$(BIN)/python -c "from priors.assets import standin_dir as d, install_model as i; d().is_dir() and print('model cache:', i(d()))"
	touch $(STAMP)

demo: setup
	$(BIN)/python cli.py fit fitter/samples/astronaut.png --out demo-out
	@echo "demo: see demo-out/astronaut/overlay.png"

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench.render

clean:
	rm -rf demo-out .pytest_cache
