# The two commands of the README. Each sets up .venv first (scripts/setup.sh is idempotent).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest tests
