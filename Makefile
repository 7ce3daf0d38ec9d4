# Set-up is part of every target: a fresh machine needs only python3 (3.11) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sicfed-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench docs lint format clean

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
