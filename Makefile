# The two commands of the README. Each sets up what a fresh machine lacks, then runs.
.PHONY: sim test bench setup

setup:
	tools/setup.sh

sim: setup
	.venv/bin/sortgate sim

test: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/pytest -q

bench: setup
	.venv/bin/sortgate bench line --parcels 2000 --rate 10 --json
