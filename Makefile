# ghn_jax: every target installs what it needs first, so each works on a
# fresh clone. `make help` lists them.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
FASHION_MNIST_PKG := dataset-fashion-mnist
EXTRAS ?= test
WORKDIR ?= workdir/cpu_default
CONFIG ?= ghn_jax/configs/cpu_default.py
PYTEST_ARGS ?=

.PHONY: help install data test test-all lint format meta-train train eval \
	bench clean

help:
	@echo "make install     virtual environment in $(VENV), ghn_jax and the"
	@echo "                 offline dataset (Debian's $(FASHION_MNIST_PKG))"
	@echo "make meta-train  main job: CPU-sized meta-training on Fashion-MNIST,"
	@echo "                 then evaluation on held-out architectures"
	@echo "                 (CONFIG=... WORKDIR=... for other setups;"
	@echo "                 make train is the same target)"
	@echo "make test        default test suite, slow tests excluded"
	@echo "make test-all    every test, slow ones included"
	@echo "make lint        ruff format check and ruff lint on the whole tree"
	@echo "make format      reformat the tree and apply ruff's safe fixes"
	@echo "make eval        evaluate the checkpoint in $(WORKDIR)"
	@echo "make bench       speed benchmarks, side by side with the original"
	@echo "make clean       remove the environment, caches and $(WORKDIR)"

install: $(STAMP) data

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Fashion-MNIST is the offline default dataset. Debian ships it as a
# package; as root we install it, otherwise we say which command to run.
data:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing $(FASHION_MNIST_PKG) with apt-get"; \
	  (apt-get install -y -q $(FASHION_MNIST_PKG) >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && \
	    apt-get install -y -q $(FASHION_MNIST_PKG) >/dev/null)) || \
	  { echo "apt-get could not install $(FASHION_MNIST_PKG)"; exit 1; }; \
	else \
	  echo "Fashion-MNIST is missing from $(FASHION_MNIST_DIR)."; \
	  echo "Install it with: sudo apt-get install $(FASHION_MNIST_PKG)"; \
	  exit 1; \
	fi

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

meta-train: install
	$(PY) experiments/meta_train.py --config $(CONFIG) --workdir $(WORKDIR)
	$(PY) experiments/eval_cifar.py --ckpt $(WORKDIR)

train: meta-train

eval: install
	$(PY) experiments/eval_cifar.py --ckpt $(WORKDIR)

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache $(WORKDIR)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
