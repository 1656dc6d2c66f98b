# The commands of the README. Each sets up .venv first (scripts/setup.sh is idempotent).
.PHONY: setup demo test test-all

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

# The default run (what CI runs): everything except the tests marked slow (real embedded models).
test: setup
	.venv/bin/python -m pytest tests -m "not slow"

# Everything, including the slow real-model tests (tens of minutes on 2 CPU cores).
test-all: setup
	.venv/bin/python -m pytest tests
