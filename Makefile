# The two commands: `make run` serves the API, `make test` runs the offline suite.
# Both create .venv and install the pinned dependencies on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-integration lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime-installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime-installed $@

run: $(VENV)/.runtime-installed
	cd backend && ../$(BIN)/python -m uvicorn main:app --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	cd backend && ../$(BIN)/python -m pytest

# Needs STORAGE_BUCKET and AWS credentials in the environment; skipped with a reason otherwise.
test-integration: $(VENV)/.dev-installed
	cd backend && ../$(BIN)/python -m pytest -m integration

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.dev-installed
	cd backend && ../$(BIN)/python ../bench/run.py

clean:
	rm -rf $(VENV)
