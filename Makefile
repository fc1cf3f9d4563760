# The two quickstart commands: `make train` and `make test`. Both create/reuse .venv first.
PY := .venv/bin/python

.PHONY: setup train test test-all lint format

setup:
	@bash deploy/bootstrap.sh

# Prints the total time and its parts: install (or the up-to-date check), demo model, the run.
train:
	@t0=$$(date +%s); bash deploy/bootstrap.sh || exit $$?; t1=$$(date +%s); \
	$(PY) -m popo.deploy.cli demo-model || exit $$?; t2=$$(date +%s); \
	$(PY) -m popo.deploy.cli train; rc=$$?; t3=$$(date +%s); \
	echo "make train: $$((t3 - t0)) s in all: install $$((t1 - t0)) s, demo model $$((t2 - t1)) s, run $$((t3 - t2)) s"; \
	exit $$rc

test: setup
	@bash deploy/test_tools.sh
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .
