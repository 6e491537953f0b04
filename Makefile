# The two commands of the README: `make demo` (the tiny pipeline) and `make test` (lint, types, the suite). Each installs
# what it needs into .venv: torch==2.13.0 first (a CPU build where one is available; otherwise pip would pull a
# multi-GB CUDA build through a dependency), then the exact pins of requirements.lock.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock | cksum | cut -d' ' -f1)
CONFIG ?= configs/tiny.yaml

export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONPATH := $(CURDIR)

S3_PORT ?= 9000
MLFLOW_PORT ?= 5000
SERVICES ?=

.PHONY: install demo test images clean-runs services services-stop

$(STAMP): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# SERVICES=1: log to the `make services` MLflow server (artifacts on its S3 endpoint) instead of runs/mlflow.db
demo: $(STAMP)
	$(if $(SERVICES),eval "$$($(BIN)/python -m common.services env)" && )$(BIN)/pyflyte run workflows/pipeline.py \
		train_video_model --config $(CONFIG)

# An S3 endpoint (moto) and an MLflow server (SQLite + artifacts on that endpoint) in the background: pid files and
# logs in runs/services/; prints the URLs and the variables to export. `make services-stop` stops both.
services: $(STAMP)
	$(BIN)/python -m common.services start --s3-port $(S3_PORT) --mlflow-port $(MLFLOW_PORT)

services-stop:
	$(BIN)/python -m common.services stop

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadfile   # 2 workers, a module on one (order: tests/conftest.py)

# Both ImageSpecs of containers/images.py (content-derived tags), built and pushed where `docker info` succeeds;
# elsewhere it prints that no Docker engine exists and the names it would build, and exits 0.
images: $(STAMP)
	$(BIN)/python -m containers.images

clean-runs:
	rm -rf runs
	$(BIN)/pyflyte local-cache clear
