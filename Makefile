# brainhpc: the two commands a newcomer needs are `make smoke` and `make test`.
# Both create .venv and install the project (editable, with dev tools) when missing or stale.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/smoke
RUN_GPU ?= runs/gpu-check
IMAGE   ?= $(SIF)
GPU_CHECK_ARGS ?=
PROFILE   ?= gpu-cluster
PARTITION ?=
SUBMIT_ARGS ?=
DATA      ?=
EVALUATE  ?=
RUN_DIR   ?= runs/paper
PYTEST_ARGS ?=

.PHONY: help install smoke test test-fast lint bench gpu-check submit-all study cluster-up cluster-down \
        cluster-status clean image sif docker-smoke container-test

help:
	@echo "make smoke        install, then run the main job end to end on phantom data ($(RUN))"
	@echo "make test         install, then run the test suite (SLURM tests need make cluster-up)"
	@echo "make test-fast    the tests without the slow end-to-end ones"
	@echo "make lint         ruff"
	@echo "make bench        benchmarks: ratios against naive baselines, measured side by side"
	@echo "make gpu-check    on a GPU node, in the image (IMAGE=brainhpc.sif|docker tag|venv): CUDA, DDP on every GPU, SIGUSR2+resume, img/s, smoke"
	@echo "make submit-all   submit the paper sweep (PROFILE=gpu-cluster DATA=\"br35h=... lgg=...\" EVALUATE=\"btm=...\" RUN_DIR= PARTITION= SUBMIT_ARGS=--dry-run)"
	@echo "make study        the CPU study through the local cluster (jobs/cpu-study-2.toml; DATA= as above)"
	@echo "make image        build the container image (VARIANT=cpu|gpu); sif, docker-smoke"
	@echo "make container-test  lint + podman build + smoke inside the image (as CI does)"
	@echo "make cluster-up   start the local single-node SLURM cluster (root; see slurm/README.md)"

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=23" "setuptools>=64" wheel
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

smoke: $(STAMP)
	$(BIN)/brainhpc smoke --out $(RUN)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check brainhpc tests benchmarks

bench: $(STAMP)
	@set -e; for b in benchmarks/bench_*.py; do \
	  echo "=== $$b"; $(BIN)/python $$b; echo; \
	done

# In the image the jobs use (a .sif through apptainer --nv, a tag through docker --gpus all), the
# checkout's .venv only with IMAGE=venv; one table, non-zero exit on any miss (no GPU included)
gpu-check: $(if $(filter venv,$(IMAGE)),$(STAMP))
	IMAGE=$(IMAGE) OUT=$(RUN_GPU) PYTHON=$(BIN)/python bash containers/gpu-check.sh $(GPU_CHECK_ARGS)

# DATA="br35h=PATH lgg=PATH" moves the datasets (and the [[evaluate]] entries that name them);
# EVALUATE="btm=PATH" the external sets that are no dataset of the sweep
submit-all: $(STAMP)
	$(BIN)/python -m brainhpc.sweep jobs/paper.toml --profile $(PROFILE) \
	  $(foreach d,$(DATA),--data $(d)) $(foreach e,$(EVALUATE),--evaluate $(e)) \
	  --run-dir $(RUN_DIR) $(if $(PARTITION),--partition $(PARTITION)) $(SUBMIT_ARGS)

study: $(STAMP)  ## the CPU study through the local cluster (make cluster-up first; resumable)
	$(BIN)/python -m brainhpc.sweep jobs/cpu-study-2.toml $(foreach d,$(DATA),--data $(d)) \
	  $(foreach e,$(EVALUATE),--evaluate $(e)) $(SUBMIT_ARGS)

# ---- containers (containers/README.md) ----
VARIANT ?= cpu
IMAGE_TAG ?= brainhpc:$(VARIANT)
SIF ?= brainhpc.sif
# docker when its daemon answers, else podman (a docker client without a daemon is not enough)
CONTAINER_ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null 2>&1; then echo podman; fi)

image:  ## build the image: make image VARIANT=cpu|gpu
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image: needs docker (with a running daemon) or podman" >&2; exit 1; }
	$(CONTAINER_ENGINE) build -f containers/Dockerfile --build-arg VARIANT=$(VARIANT) \
	  --build-arg VCS_REF=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) -t $(IMAGE_TAG) .

sif:  ## Apptainer image from the local Docker image brainhpc:gpu (make image VARIANT=gpu first)
	@command -v apptainer >/dev/null 2>&1 || { echo "make sif: apptainer is not installed here; on a machine with Apptainer run 'make image VARIANT=gpu && make sif', or build from a registry: apptainer build $(SIF) docker://REGISTRY/brainhpc:gpu (containers/README.md)" >&2; exit 1; }
	apptainer build $(SIF) containers/brainhpc.def

docker-smoke:  ## run the smoke pipeline inside the image, no network
	@test -n "$(CONTAINER_ENGINE)" || { echo "make docker-smoke: needs docker (with a running daemon) or podman" >&2; exit 1; }
	$(CONTAINER_ENGINE) run --rm --network=none $(IMAGE_TAG) smoke --out /work/out/smoke

container-test:  ## CI check: hadolint, spython, podman build (no registry), in-container smoke
	bash containers/test.sh

cluster-up:
	bash slurm/cluster.sh up

cluster-down:
	bash slurm/cluster.sh down

cluster-status:
	bash slurm/cluster.sh status

clean:
	rm -rf $(RUN) .pytest_cache .ruff_cache
