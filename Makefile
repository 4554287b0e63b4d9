VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

# The oldest JAX kopt supports (the floor in pyproject.toml), tested in a venv of its own.
OLDEST_VENV ?= .venv-oldest
OLDEST_JAX ?= 0.9.0

.PHONY: setup test test-oldest lint demo docs clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check kopt tests examples benchmarks

test: lint
	$(PY) -m pytest -n 2 tests

test-oldest:
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --upgrade pip
	$(OLDEST_VENV)/bin/pip install -e '.[test]' 'jax==$(OLDEST_JAX)' 'jaxlib==$(OLDEST_JAX)'
	$(OLDEST_VENV)/bin/python -m pytest -n 2 tests

demo: $(STAMP)
	$(PY) examples/quickstart.py

docs: $(STAMP)
	$(PIP) install -e '.[docs]'
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build dist *.egg-info
