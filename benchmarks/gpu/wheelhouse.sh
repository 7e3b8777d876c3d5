#!/usr/bin/env bash
# Build the bundle that benchmarks/gpu/prove.sh installs from on a GPU machine without network:
#
#   bash benchmarks/gpu/wheelhouse.sh OUT_DIR [--python-version 3.12] [--budget-mib 60] [--python PY]
#
# Run it here, on a CPU machine that reaches PyPI, from the repository root. It downloads
#   - a wheel of every [always] and [if-missing] line of benchmarks/gpu/requirements-gpu.txt, for
#     the GPU machine's Python (--python-version, default 3.12) on manylinux x86-64, without their
#     dependencies (the list names every one that is needed: pip would otherwise pull torch);
#   - the [sdist] lines (mamba-ssm, causal-conv1d) as source, which prove.sh compiles there against
#     that machine's own torch and CUDA;
# then writes OUT_DIR/MANIFEST.tsv (file, bytes, sha256) and fails, naming the total, when the
# files exceed the budget: a device call carries at most 64 MiB of ignored files, and the default
# 60 MiB leaves room for the rest. OUT_DIR is emptied of earlier bundle files first, so two versions
# of one package (which stop pip's install there) cannot pile up across runs.
#
# The device session then names the folder in its `carry` (README "Benchmarks": `.whl`, which
# .gitignore ignores) and runs `bash benchmarks/gpu/prove.sh OUT --wheels .whl`.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=benchmarks/gpu

out="" pyver=3.12 budget_mib=60 py="${PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    --budget-mib) budget_mib="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "wheelhouse.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
[ -n "$out" ] || { echo "wheelhouse.sh: OUT_DIR missing (see --help)" >&2; exit 2; }
# The sdists' setup.py imports torch just to report their metadata, so pip runs under a Python
# that has torch: the project's venv when there is one.
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
mkdir -p "$out"
rm -f "$out"/*.whl "$out"/*.tar.gz "$out"/*.zip "$out"/MANIFEST.tsv

reqs=$(mktemp -d)
trap 'rm -rf "$reqs"' EXIT
"$py" $here/bundle.py reqs --section always --section if-missing > "$reqs/wheels.txt"
"$py" $here/bundle.py reqs --section sdist > "$reqs/sdist.txt"

# Binary wheels for the target interpreter. pip matches each manylinux tag exactly, so the usual
# ones are all named; --implementation cp and --python-version give cp3X and abi3 wheels as well
# as pure-Python ones. PIP_CONSTRAINT is cleared: a machine-wide constraints file (torch caps)
# has nothing to say about this list and would only make pip refuse a pin.
platforms=()
for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64 \
           manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux_2_12_x86_64; do
  platforms+=(--platform "$tag")
done
echo "wheelhouse.sh: wheels for Python $pyver (x86-64) into $out" >&2
PIP_CONSTRAINT="" "$py" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$pyver" "${platforms[@]}" -d "$out" -r "$reqs/wheels.txt"

# Source distributions. pip prepares their metadata by running setup.py, which imports `wheel`
# and torch; *_SKIP_CUDA_BUILD keeps it from looking for nvcc here. `wheel` may be missing from
# the venv: it comes from a throwaway folder on PYTHONPATH instead of being installed into it.
echo "wheelhouse.sh: mamba-ssm / causal-conv1d sources" >&2
if ! "$py" -c "import wheel" 2>/dev/null; then
  PIP_CONSTRAINT="" "$py" -m pip install --quiet --no-deps --target "$reqs/wheel" wheel
  export PYTHONPATH="$reqs/wheel${PYTHONPATH:+:$PYTHONPATH}"
fi
MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE PIP_CONSTRAINT="" \
  "$py" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$out" -r "$reqs/sdist.txt"

# One line per file; checked by the tests and by prove.sh (sha256) before it installs anything.
"$py" $here/bundle.py manifest "$out" --budget-mib "$budget_mib"
