# The two quickstart commands: `make train` and `make test`. Both create/reuse .venv first.
PY := .venv/bin/python

.PHONY: setup train test test-all lint format

setup:
	@bash deploy/bootstrap.sh

train: setup
	$(PY) -m popo.deploy.cli train

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .
