# Set-up is part of every target: a fresh machine needs only python3 (3.11) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sicfed-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench docs lint format clean image

install: $(STAMP)

# torch and torchvision first, at the exact versions that lie on local disk; any other
# version would pull gigabytes of CUDA wheels. Everything a site also installs comes at the
# versions its Docker image pins (docker/site-requirements.txt, used as constraints).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c docker/site-requirements.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m server demo

bench: $(STAMP)
	$(PY) -m bench

# The documentation site, docs/ -> site/ (reference pages are generated from the code).
docs: $(STAMP)
	$(PY) -m mkdocs build --strict

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The site image, sicfed-site:<version>, with docker (if its daemon answers) or podman.
# BUILD_ARGS passes more, e.g. --build-arg TORCH_VARIANT=cpu or --build-arg BASE_IMAGE=...
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= sicfed-site:$(VERSION)
ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null 2>&1; then echo podman; fi)
BUILD_ARGS ?=
# podman: runc where installed (crun refuses hybrid cgroup hosts) and explicit open-file and
# process limits (podman's defaults fail where root may not raise its own hard limits).
PODMAN_FLAGS ?= $(if $(shell command -v runc),--runtime runc) \
	--ulimit nofile=20000:20000 --ulimit nproc=32768:32768

image:
	@test -n "$(ENGINE)" || { echo "make image: neither docker (with a running daemon) nor podman found" >&2; exit 1; }
	$(ENGINE) build $(if $(filter podman,$(ENGINE)),$(PODMAN_FLAGS)) $(BUILD_ARGS) \
		-f docker/site.Dockerfile -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
