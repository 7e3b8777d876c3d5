#!/usr/bin/env bash
# README's test command: set up a venv with the dev extras (transformers is the reference our model
# is checked against) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/pytest ]; then
  python3 -m venv .venv
  .venv/bin/pip install --upgrade pip
fi
.venv/bin/pip install -e '.[dev]'
.venv/bin/python -m pytest "$@"
