# One command sets up and runs the bundled example (make demo); one runs the tests (make test).
# TORCH picks the torch build: the default is the release the project is tested with. On a GPU machine,
# `make TORCH=torch setup` takes the CUDA build from the registry.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.mpexport-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/mpexport convert models/digits_resnet.pt2 --val-data models/digits_resnet.val.npz --out build/digits_resnet --force
	$(BIN)/mpexport convert models/digits_transformer.pt2 --val-data models/digits_transformer.val.npz --out build/digits_transformer --force
	$(BIN)/mpexport inspect build/digits_transformer
	$(BIN)/mpexport verify build/digits_resnet
	$(BIN)/mpexport verify build/digits_transformer

# One worker per core, each test file on one worker (module fixtures built once; the Ray tests stay together), one
# thread per worker (tests/conftest.py). `$(BIN)/python -m pytest tests/graph` runs a folder alone, in one process.
test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf build .pytest_cache
