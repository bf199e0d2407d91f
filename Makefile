# `make test`: fresh .venv, install with test extras, run the whole suite (what CI runs).
# `make demo`: fresh .venv, install, train and evaluate a small model on the bundled digits.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo install install-test list clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.install: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.install-test: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.install
install-test: $(VENV)/.install-test

# pytest-xdist: one worker per core (at most 4); idle workers steal queued tests, and the Triton
# interpreter runs come in shards so that they are shared too (tests/conftest.py). The slowest
# tests are listed at the end: CI has 30 minutes on 2 cores, and this says where they go.
test: install-test
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist worksteal --durations=15

# The main job on the embedded default data: scikit-learn's handwritten digits as an ImageFolder,
# a small NAT trained by the demo recipe, then evaluated on the held-out split.
demo: install
	$(PY) -m zoo.demo data/digits
	rm -rf runs/demo  # a new run refuses a directory that holds an earlier run's checkpoints
	$(PY) train.py configs/train/demo.yaml
	$(PY) eval.py zoo_nat_demo --checkpoint runs/demo/best --data data/digits

list: install
	$(PY) -m zoo list

clean:
	rm -rf $(VENV) .pytest_cache
