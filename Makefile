# dfka: the two contract commands are `make demo` and `make test` (both run `make setup` first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dfka-installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup data test test-fast lint demo stack-up stack-down images compile lock clean

setup: $(STAMP) data

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the exact pin, so no resolver step can pick a CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

data: $(STAMP)
	@if [ "$$(id -u)" = "0" ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  echo "installing Fashion-MNIST (apt: dataset-fashion-mnist)"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	  echo "warning: could not install Fashion-MNIST; Fashion tests will be skipped"; \
	elif [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then \
	  echo "note: Fashion-MNIST is not installed and this is not root; Fashion tests will be skipped"; \
	  echo "      (sudo apt-get install dataset-fashion-mnist, or set DFKA_FASHION_DIR)"; \
	fi
	$(BIN)/dfka data fetch

test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check src components pipelines tests benchmarks
	$(BIN)/ruff format --check src components pipelines tests benchmarks

demo: setup
	$(BIN)/dfka demo

compile: $(STAMP)
	$(BIN)/dfka pipeline compile

IMAGE_REGISTRY ?= ghcr.io/dfka
DFKA_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GIT_COMMIT = $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# Needs a Docker engine (none on the dev machine): the GPU stage image, its CPU variant, and MLflow's.
images:
	docker build -f images/stage.Dockerfile --build-arg DFKA_GIT_COMMIT=$(GIT_COMMIT) -t $(IMAGE_REGISTRY)/dfka-stage:$(DFKA_VERSION) .
	docker build -f images/stage-cpu.Dockerfile --build-arg DFKA_GIT_COMMIT=$(GIT_COMMIT) -t $(IMAGE_REGISTRY)/dfka-stage:$(DFKA_VERSION)-cpu .
	docker build -f images/mlflow.Dockerfile -t $(IMAGE_REGISTRY)/dfka-mlflow:3.17.2-1 images/

stack-up: $(STAMP)
	$(BIN)/dfka stack up

stack-down: $(STAMP)
	$(BIN)/dfka stack down

lock:
	rm -rf /tmp/dfka-lock && $(PYTHON) -m venv /tmp/dfka-lock
	/tmp/dfka-lock/bin/pip install -q torch==2.13.0 && /tmp/dfka-lock/bin/pip install -q -e '.[dev]'
	{ echo "# Full lock of the dfka environment (Python 3.11, linux x86_64). Regenerate with: make lock"; \
	  /tmp/dfka-lock/bin/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
