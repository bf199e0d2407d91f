# `make test`: fresh .venv, install with test extras, run the whole suite (what CI runs).
# `make demo`: fresh .venv, install, run the main job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo install install-test list clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.install: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.install-test: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.install
install-test: $(VENV)/.install-test

test: install-test
	$(PY) -m pytest -q

demo: install
	$(PY) -m zoo list
	$(PY) -m zoo forward

list: install
	$(PY) -m zoo list

clean:
	rm -rf $(VENV) .pytest_cache
