# Each target creates the virtual environment on first use (pinned by requirements.lock).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test test-all repro bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

run: $(STAMP)  ## the main job, quick profile: the whole dvc.yaml pipeline on MNIST, ending with reports/index.html
	$(BIN)/robustdata repro

test: $(STAMP)  ## the fast test suite
	$(BIN)/python -m pytest

test-all: $(STAMP)  ## every test, the slow ones too
	$(BIN)/python -m pytest -m ''

repro: run  ## the same: dvc repro of dvc.yaml with one Prefect server for all stages

bench: $(STAMP)  ## benchmarks -> reports/bench/*.json
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/audit.py
	$(BIN)/python benchmarks/robustify.py --profile full
	$(BIN)/python benchmarks/pipeline.py

clean-venv:
	rm -rf $(VENV)
