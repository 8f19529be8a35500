# The two commands a newcomer needs:  make run  (the main job)  and  make test  (the whole suite).
# Both create .venv on first use. torch is installed first and pinned: 2.13.0 is a CPU wheel on
# this machine class's disk, while any other spec downloads a multi-GB CUDA build.

VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup run quick repro test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: the whole pipeline (curriculum training, evaluation, searches, adaptation, export)
# as a Prefect flow with no server, the Memory service on loopback, MLflow in ./mlruns.
run: setup
	$(BIN)/lagent pipeline

quick: setup
	$(BIN)/lagent pipeline --quick

# The same stages through DVC (python on PATH must be the venv's).
repro: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: setup
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache models metrics plots reports results memory-data
