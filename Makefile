VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo docs clean

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

demo: $(STAMP)
	$(PY) examples/quickstart.py

docs: $(STAMP)
	$(PIP) install -e '.[docs]'
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist *.egg-info
