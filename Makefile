# `make demo`: set up and run the example job on tiny models (one machine, no servers).
# `make test`: set up and run lint, types and the whole test suite against real services.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOME_DIR := .ipbatch

.PHONY: install services demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	bash scripts/services.sh

$(HOME_DIR)/models/TINY_MODELS.json: pipeline/tiny.py pipeline/tiny_faces.py | $(STAMP)
	$(BIN)/ipbatch models tiny $(HOME_DIR)/models

demo: install $(HOME_DIR)/models/TINY_MODELS.json
	IPBATCH_HOME=$(HOME_DIR) IPBATCH_MODELS=$(HOME_DIR)/models \
		$(BIN)/ipbatch run examples/catalog.jsonl
	IPBATCH_HOME=$(HOME_DIR) $(BIN)/ipbatch report -o $(HOME_DIR)/report.html

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layer contract in pyproject.toml

typecheck: install
	$(BIN)/mypy

test: install services lint typecheck
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) $(HOME_DIR) .pytest_cache .mypy_cache .ruff_cache
