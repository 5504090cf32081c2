# The two commands a newcomer needs: `make demo` and `make test`. Both set up first (idempotent).
.PHONY: setup demo test test-fast lint bench-train

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/fedforge demo

test: setup
	.venv/bin/pytest

test-fast: setup
	.venv/bin/pytest -m "not integration"

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench-train: setup
	.venv/bin/python scripts/bench_train.py
