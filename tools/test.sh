#!/usr/bin/env bash
# README's test command: set up the venv of one stack (tools/install.sh; pinned by default) with
# the dev extras (transformers is the reference our model is checked against) and run the whole
# suite in it. CI runs it for both stacks.
#   bash tools/test.sh [--torch pinned|current] [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
stack=pinned
case "${1:-}" in
  --torch) stack="${2:-}"; shift 2 ;;
  --torch=*) stack="${1#--torch=}"; shift ;;
esac
venv=$(bash tools/install.sh --torch "$stack" dev)
echo "tests on the $stack stack: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')" >&2
"$venv/bin/python" -m pytest "$@"
