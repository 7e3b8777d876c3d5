#!/usr/bin/env bash
# Set up a virtual environment for one of the two tested stacks (README "Stacks"):
#
#   bash tools/install.sh [--torch pinned|current] [--gpu] [EXTRAS]
#
#   pinned   (default) .venv/          torch as Composer 0.32.1 pins it (>=2.6,<2.7.1: pip takes 2.7.0),
#                                      by the book: `pip install -e .[EXTRAS]`
#   current            .venv-current/  the newest torch tested with this project (CURRENT_TORCH below);
#                                      Composer 0.32.1 is installed without its torch pin (--no-deps)
#                                      and every other requirement of Composer and of this project
#                                      is installed as they state it.
#   --gpu              also build mamba-ssm and causal-conv1d against that torch (nvcc needed);
#                      pinned: mamba-ssm 2.3.1, current: 2.3.2.post1 (the Mamba-3 layer; needs triton>=3.5)
#   EXTRAS             setup.py extras, comma-separated (dev, monitor, formats, bench, all)
#
# Re-running updates the environment in place. pip's output goes to stderr; stdout is only the
# venv's path, for callers: venv=$(bash tools/install.sh --torch current dev).
set -euo pipefail
cd "$(dirname "$0")/.."
exec 3>&1 1>&2

# The current stack: torch and the torchvision built for it (Composer imports torchvision).
CURRENT_TORCH="torch==2.14.1 torchvision==0.29.1"

stack=pinned gpu=0 extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) stack="${2:-}"; shift 2 ;;
    --torch=*) stack="${1#--torch=}"; shift ;;
    --gpu) gpu=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" >&3; exit 0 ;;
    -*) echo "tools/install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) extras="$1"; shift ;;
  esac
done
case "$stack" in
  pinned) venv=.venv ;;
  current) venv=.venv-current ;;
  *) echo "tools/install.sh: --torch $stack: choose pinned or current" >&2; exit 2 ;;
esac
spec="."
[ -n "$extras" ] && spec=".[$extras]"

# A venv set up by this script with these very inputs is left as it is: re-runs (the quickstart's,
# the tests') take a second, not pip's minute of resolving. The install is editable, so code
# changes need no reinstall; a changed setup.py or install.sh does.
stamp="$venv/.mamba-install"
want="$stack $extras gpu=$gpu $(cat setup.py "$0" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import mamba" 2>/dev/null; then
  echo "$venv" >&3
  exit 0
fi
rm -f "$stamp"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --upgrade pip
fi
pip=("$venv/bin/pip" install)

if [ "$stack" = pinned ]; then
  "${pip[@]}" -e "$spec"
  [ "$gpu" = 1 ] && "${pip[@]}" --no-build-isolation -e ".[gpu]"
else
  # torch first, then everything else constrained to it, so no requirement can swap it for another.
  "${pip[@]}" $CURRENT_TORCH
  constraints="$venv/torch-constraints.txt"
  "$venv/bin/python" -c 'from importlib.metadata import version
for name in ("torch", "torchvision"): print(name + "==" + version(name))' \
    > "$constraints"
  "${pip[@]}" --no-deps mosaicml==0.32.1 -e "$spec"
  # What Composer and this project ask for, less the torch pins this stack replaces (packaging
  # evaluates the extras and environment markers exactly as pip would).
  "${pip[@]}" -c "$constraints" packaging
  requirements="$venv/requirements-current.txt"
  "$venv/bin/python" - "$extras" > "$requirements" <<'EOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

extras = [e for e in sys.argv[1].split(",") if e]
replaced = {"torch", "torchvision", "mosaicml", "mamba-ssm", "causal-conv1d"}
for dist, wanted in (("mosaicml", []), ("mamba-recipe", extras)):
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in replaced:
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted or [""]):
            print(str(req).split(";")[0])
EOF
  "${pip[@]}" -c "$constraints" -r "$requirements"
  [ "$gpu" = 1 ] && "${pip[@]}" -c "$constraints" --no-build-isolation mamba-ssm==2.3.2.post1 "causal-conv1d>=1.4"  # PyPI has no plain 2.3.2
fi
echo "$want" > "$stamp"
echo "$venv" >&3
