# The two commands: `make run` serves the API, `make test` runs the offline suite.
# Both create .venv and install the pinned dependencies on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

# Whatever starts a Ray cluster (the ray-marked tests, the worker benchmarks) runs in a private
# network namespace with only loopback, where the machine allows one.
PRIVATE_NETWORK := tools/private_network.sh
WORKER_HOST ?= 127.0.0.1

.PHONY: run run-tiny tiny-model worker test test-integration test-gpu lint bench bench-readme bench-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime-installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.worker-installed: requirements.txt requirements-worker.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-worker.txt
	touch $(VENV)/.runtime-installed $@

$(VENV)/.dev-installed: requirements.txt requirements-worker.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime-installed $(VENV)/.worker-installed $@

# The contract tests' Node tools (TypeScript client generation, tsc, Redocly), pinned by
# package-lock.json; without npm those tests skip, saying so.
CONTRACT := backend/test/contract
NODE_TOOLS := $(VENV)/contract

$(NODE_TOOLS)/.installed: $(CONTRACT)/package.json $(CONTRACT)/package-lock.json | $(BIN)/python
	@if command -v npm >/dev/null; then \
		mkdir -p $(NODE_TOOLS) && \
		cp $(CONTRACT)/package.json $(CONTRACT)/package-lock.json $(NODE_TOOLS)/ && \
		npm ci --prefix $(NODE_TOOLS) --no-audit --no-fund --loglevel=error && touch $@; \
	else \
		echo "npm not found: the TypeScript contract tests will skip" >&2; \
	fi

# ministack, the suite's second S3 server: its own environment, as it pins another botocore.
MINISTACK := $(VENV)/ministack

$(MINISTACK)/.installed: requirements-ministack.txt | $(BIN)/python
	$(BIN)/python -m venv $(MINISTACK)
	$(MINISTACK)/bin/python -m pip install --quiet -r requirements-ministack.txt
	touch $@

run: $(VENV)/.runtime-installed
	cd backend && ../$(BIN)/python -m server --host $(HOST) --port $(PORT)

# A tiny random-weight FLUX.2 [klein] pipeline, so the whole flow (references included) runs with
# no GPU, token or network.
TINY_MODEL := backend/mv/models/tiny-flux2-klein

tiny-model: $(VENV)/.runtime-installed
	cd backend && ../$(BIN)/python -m tools.make_tiny_model mv/models/tiny-flux2-klein

run-tiny: tiny-model
	LOCAL_MODEL_ID=$(CURDIR)/$(TINY_MODEL) LOCAL_DEVICE=cpu $(MAKE) run

# The GPU worker tier (Ray Serve) on this machine, or on the cluster RAY_ADDRESS names; prints
# the WORKER_URL (and WORKER_TOKEN) for `make run`; Ctrl-C stops it and Ray with it.
worker: $(VENV)/.worker-installed
	cd backend && ../$(BIN)/python -m gpu_worker --host $(WORKER_HOST)

test: $(VENV)/.dev-installed $(NODE_TOOLS)/.installed $(MINISTACK)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd backend && $(PRIVATE_NETWORK) ../$(BIN)/python -m pytest

# Needs STORAGE_BUCKET and AWS credentials in the environment; skipped with a reason otherwise.
test-integration: $(VENV)/.dev-installed
	cd backend && ../$(BIN)/python -m pytest -m integration

# The gpu-marked tests; needs CUDA.
test-gpu: $(VENV)/.dev-installed
	cd backend && ../$(BIN)/python -m pytest -m gpu

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every benchmark in one run, one table of ratios against baselines measured in the same run
# (the real-size GPU rows too, when CUDA is present).
bench: $(VENV)/.dev-installed
	cd backend && $(PRIVATE_NETWORK) ../$(BIN)/python ../bench/all.py

# `make bench`, then its table written into the README (bench/readme_table.py).
bench-readme: $(VENV)/.dev-installed
	$(MAKE) --no-print-directory bench | tee .bench-last-run.txt
	$(BIN)/python bench/readme_table.py .bench-last-run.txt

# Real-size FLUX.2 [klein] 4B, FLUX.1-schnell and SDXL-Turbo architectures with random weights;
# needs CUDA.
bench-gpu: $(VENV)/.runtime-installed
	cd backend && ../$(BIN)/python ../bench/gpu_generation.py

clean:
	rm -rf $(VENV)
