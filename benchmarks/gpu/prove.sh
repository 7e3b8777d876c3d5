#!/usr/bin/env bash
# The GPU proof in one command, from the repository root of a lent GPU machine (no network there):
#
#   bash benchmarks/gpu/prove.sh OUT_DIR [--wheels DIR] [--budget-s 540] [--steps "A B ..."]
#                                [--work DIR] [--python PY] [--rehearse]
#
#   --wheels DIR  the bundle of benchmarks/gpu/wheelhouse.sh (carried as .whl): verified against its
#                 MANIFEST.tsv, installed with `pip --no-index` into WORK/site, and its mamba-ssm /
#                 causal-conv1d sources compiled there for this GPU's architecture alone, in the
#                 background (setsid, so a build outlives a command cut by its limit)
#   --budget-s N  wall-clock seconds for the whole run (default 540: a device command is cut at
#                 600); a step gets min(its box, what is left) and is skipped when under 20 s remain
#   --steps LIST  which steps, in this order (default: all, in the order below)
#   --rehearse    CPU-sized versions of every step (smoke shapes, the tiny preset, a small pack), so
#                 the whole script runs on a machine without a GPU; tests/benchmarks uses it
#
# Steps, each in its own time box (`timeout`, box in seconds after the name; PROVE_BOX_<STEP>=N
# overrides one, PROVE_CMD_<STEP>='...' replaces its command, PROVE_STEPS the list):
#   prepare 120        pack ~12 MB of CPython's stdlib (bpe:8192) and write the 130m config that
#                      create_mamba_config.py plans for this GPU (1 GPU, FSDP2, bf16, its micro batch)
#   torch_eager 90     torch path (model.kernels=torch), Mamba-1/2 130m, and the kernels if built
#   torch_compile 150  the same under torch.compile; these two run while the kernels compile
#   kernels_cold 240   pytest tests/model/test_kernels*.py with an empty Triton cache (MIMO: skips without tilelang)
#   bench_130m 180     benchmarks/model_gpu.py 130m (ours vs mamba-ssm), then mamba1 at the planner's
#                      micro batch (the Composer run's), then Mamba-3 (our kernel path, mamba-ssm
#                      2.3.2.post1's Triton kernel, vs our torch path)
#   composer_130m 150  composer -n 1 mamba/train.py on the prepared config, 20 steps: steady
#                      tokens/s and peak memory vs the planner's estimate
#   kernels_warm 120   the kernel tests again, Triton's cache filled: cold - warm = compile time
#   bench_370m 150, bench_1_4b 180   model_gpu.py, Mamba-1/2 at those shapes (1.4b at micro batch 4)
# The kernel steps first wait for the build (box PROVE_BOX_BUILD=420 s from its start) and are
# skipped, saying why, when it failed. Each step appends a line to OUT_DIR/results.json and
# rewrites OUT_DIR/results.md as it ends, and OUT_DIR/logs.tgz holds every log, so a run stopped
# at any point keeps what finished. It exits 0 whatever the steps did; the table says.
set -uo pipefail
SELF=$(readlink -f "$0")
REPO=$(cd "$(dirname "$SELF")/../.." && pwd)
cd "$REPO"
H=benchmarks/gpu
# In order of what the proof needs most, within what the GPU can do at each moment: the torch path
# while the kernels compile (the GPU is idle then), the kernel tests first once they are built.
ALL_STEPS="prepare torch_eager torch_compile kernels_cold bench_130m composer_130m kernels_warm bench_370m bench_1_4b"
KERNEL_STEPS=" kernels_cold kernels_warm bench_130m composer_130m bench_370m bench_1_4b "
GPU_STEPS="$KERNEL_STEPS torch_eager torch_compile "

box_default() {  # seconds; each is a few times what the step should take on an H100/H200
  case "$1" in
    torch_eager) echo 90 ;; torch_compile|composer_130m|bench_370m) echo 150 ;; bench_1_4b|bench_130m) echo 180 ;;
    kernels_cold) echo 240 ;; build) echo 420 ;; *) echo 120 ;;
  esac
}
box_of() { local var="PROVE_BOX_${1^^}"; echo "${!var:-$(box_default "$1")}"; }

# --- the steps (run as `bash prove.sh __step NAME` inside the time box; ROWS is their JSON lines) --

step_install() {
  # A second command on the same (still warm) machine finds the bundle installed already.
  if [ -f "$WHEELS/MANIFEST.tsv" ] && cmp -s "$WHEELS/MANIFEST.tsv" "$SITE/.bundle-manifest"; then
    echo "the bundle of this MANIFEST.tsv is installed in $SITE already"; return 0
  fi
  if [ -f "$WHEELS/MANIFEST.tsv" ]; then "$PY" $H/bundle.py verify "$WHEELS" || return 1; fi
  # Which wheels this interpreter lacks is asked without the bundle's own folder on the path.
  local wheels
  wheels=$(PYTHONPATH="$BASE_PYTHONPATH" "$PY" $H/bundle.py select "$WHEELS") || return 1
  echo "$wheels"
  # shellcheck disable=SC2086
  "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels || return 1
  echo "{\"wheels\": $(echo "$wheels" | wc -w)}" >> "$ROWS"
  "$PY" -c "import composer, transformers; print('composer', composer.__version__, composer.__file__); print('transformers', transformers.__version__)" || return 1
  if [ -f "$WHEELS/MANIFEST.tsv" ]; then cp "$WHEELS/MANIFEST.tsv" "$SITE/.bundle-manifest"; fi
}

step_prepare() {
  local d=$WORK/composer stdlib input flags steps=""
  rm -rf "$WORK/packed" "$d"; mkdir -p "$d"
  stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  input=${PROVE_PACK_INPUT:-$stdlib}
  [ "$REHEARSE" = 1 ] && input=${PROVE_PACK_INPUT:-$stdlib/json}
  "$PY" tools/pack.py --tokenizer bpe:8192 --on-bad-input skip --exclude site-packages --exclude test \
    --exclude tests --exclude idlelib --workers "$(nproc)" --quiet --out "$WORK/packed" "$input" || return 1
  if [ "$REHEARSE" = 1 ] || [ "$HAVE_GPU" != 1 ]; then  # the tiny preset, one CPU rank: 8 steps of 8 x 256 tokens
    flags="--preset tiny --gpus-per-node 0 --procs-per-node 1 --tokens 16384"
  else  # 20 optimizer steps of the 130m preset's global batch at the micro batch planned for this GPU;
    # model.kernels=cuda: planned (and run) on mamba-ssm's kernels, which are still compiling now
    flags="--preset 130m --nodes 1 --gpus-per-node 1 $("$PY" $H/proof.py plan-flags) --tokens 1e7"
    steps="trainer.max_duration=${PROVE_COMPOSER_STEPS:-20}ba model.kernels=cuda"
  fi
  # The key=value overrides last, together: argparse takes them as one positional list.
  # shellcheck disable=SC2086
  "$PY" create_mamba_config.py $flags --data "$WORK/packed" --out "$d/config.yaml" --run-name gpu-proof \
    "trainer.save_folder=$d/checkpoints" "logging.metrics_file=$d/metrics.jsonl" logging.progress_bar=false \
    logging.log_interval=1ba $steps > "$d/plan.log" 2>&1; local rc=$?
  cat "$d/plan.log"
  [ $rc = 0 ] || return $rc
  "$PY" $H/proof.py plan-read "$d/plan.log" "$d/config.yaml" > "$d/plan.json" || return 1
  "$PY" -c 'import json, sys; plan = json.load(open(sys.argv[2])); index = json.load(open(sys.argv[1]))
print(json.dumps({"tokens": index["total_tokens"], **plan}))' "$WORK/packed/index.json" "$d/plan.json" >> "$ROWS"
}

planned_micro_batch() {
  "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["micro_batch"])' "$WORK/composer/plan.json" 2>/dev/null || echo 32
}

step_torch_eager() {
  if [ "$REHEARSE" = 1 ]; then "$PY" $H/torch_path.py --smoke --modes eager kernels --json "$ROWS"; return; fi
  "$PY" $H/torch_path.py --shape 130m --modes eager kernels --json "$ROWS"
}

step_torch_compile() {
  if [ "$REHEARSE" = 1 ]; then "$PY" $H/torch_path.py --smoke --modes compile --backend aot_eager --json "$ROWS"; return; fi
  "$PY" $H/torch_path.py --shape 130m --modes compile --json "$ROWS"
}

run_kernel_tests() {  # pytest-timeout (on the GPU image) fails one stuck test instead of the box
  local per_test=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout "${PROVE_TEST_TIMEOUT:-150}")
  PROOF_PYTEST_ROWS="$ROWS" "$PY" -m pytest tests/model/test_kernels.py tests/model/test_kernels_mamba3_mimo.py -p proof -p no:cacheprovider -v -rA "${per_test[@]}"
}
step_kernels_cold() { rm -rf "$TRITON_CACHE_DIR"; run_kernel_tests; }
step_kernels_warm() { run_kernel_tests; }

bench() {
  if [ "$REHEARSE" = 1 ]; then "$PY" benchmarks/model_gpu.py --smoke --json "$ROWS"; return; fi
  "$PY" benchmarks/model_gpu.py --json "$ROWS" "$@"
}
step_bench_130m() {
  local rc=0
  [ "$REHEARSE" = 1 ] && { bench; return; }
  bench --shapes 130m --layers mamba1 mamba2 || rc=$?
  bench --shapes 130m --layers mamba1 --micro-batch "$(planned_micro_batch)" || rc=$?
  # Mamba-3 last: its kernel compiles (and autotunes) for these shapes first, and a box cut there
  # keeps the rows above, which the Composer comparison needs.
  bench --shapes 130m --layers mamba3 || rc=$?
  return $rc
}
step_bench_370m() { bench --shapes 370m --layers mamba1 mamba2; }  # boxes sized for two mixers
step_bench_1_4b() { bench --shapes 1.4b --layers mamba1 mamba2 --micro-batch 4; }

step_composer_130m() {
  local d=$WORK/composer rc=0
  [ -f "$d/config.yaml" ] || { echo "no $d/config.yaml: the prepare step writes it"; return 2; }
  rm -rf "$d/checkpoints" "$d/metrics.jsonl"
  [ "$REHEARSE" = 1 ] && export OMP_NUM_THREADS=1
  "$PY" -m composer.cli.launcher -n 1 mamba/train.py "$d/config.yaml" || rc=$?
  "$PY" $H/proof.py composer-rows "$d/metrics.jsonl" "$d/plan.json" >> "$ROWS" || { [ $rc != 0 ] || rc=1; }
  return $rc
}

# --- the kernel build, in its own session (`bash prove.sh __build`) -------------------------------

build_kernels() {
  local b=$WORK/build sm dir rc=0
  echo $$ > "$b/pid"
  sm=$("$PY" -c 'import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}{minor}")') || return 1
  echo "building mamba-ssm and causal-conv1d for sm_$sm with $(nproc) jobs each"
  rm -rf "$b/src" "$b/wheels"; mkdir -p "$b/src" "$b/wheels"
  for sdist in "$WHEELS"/mamba_ssm-*.tar.gz "$WHEELS"/causal_conv1d-*.tar.gz; do
    tar xzf "$sdist" -C "$b/src" || return 1
  done
  for dir in "$b"/src/*/; do "$PY" $H/bundle.py patch-setup "$dir/setup.py" "$sm" || return 1; done
  # Both at once: together about 14 CUDA files, fewer than the cores; nvcc's own --threads only
  # helps with several architectures.
  for dir in "$b"/src/*/; do
    (cd "$dir" && MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=$(nproc) \
      "$PY" -m pip wheel --no-build-isolation --no-deps --no-index -w "$b/wheels" . \
      > "$LOGS/build-$(basename "$dir").log" 2>&1; echo $? > "$b/$(basename "$dir").rc") &
  done
  wait
  for f in "$b"/*.rc; do
    echo "$(basename "$f" .rc): exit $(cat "$f")"; [ "$(cat "$f")" = 0 ] || rc=1
  done
  [ $rc = 0 ] || { tail -n 20 "$LOGS"/build-*.log; return 1; }
  # --upgrade: replaces an earlier build in SITE (pip --target otherwise keeps it and only warns).
  "$PY" -m pip install --no-index --no-deps --no-compile --upgrade --target "$SITE" "$b"/wheels/*.whl || return 1
  # Mamba-1/2's kernels decide the build; Mamba-3's (mamba-ssm >= 2.3.2, Triton) is reported: where
  # it does not import, its kernel tests and bench rows skip with this reason.
  "$PY" -c 'from mamba.model.ops.kernels import cuda_kernels_available as f
ok, why = f(); print("kernels:", ok, why); print("mamba3 kernel:", *f("mamba3"))
raise SystemExit(0 if ok else 1)'
}

# --- the driver -------------------------------------------------------------------------------------

record() {  # record STEP STATUS RC SECONDS BOX LOG NOTE
  [ "$2" = skipped ] && rm -f "$WORK/rows/$1.jsonl"  # no stale rows of an earlier run
  "$PY" $H/proof.py record "$OUT" --step "$1" --status "$2" ${3:+--rc "$3"} --seconds "$4" ${5:+--box "$5"} \
    ${6:+--log "$6"} --rows "$WORK/rows/$1.jsonl" --note "${7:-}" >/dev/null
  tar czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null
  echo "prove.sh: $1 $2${3:+ (rc $3)} after ${4}s${7:+: $7}" >&2
}

seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

CHILD=""
on_signal() {  # a stopped run still records the step it was in
  trap - TERM INT HUP
  if [ -n "$CHILD" ]; then
    kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null
    record "$CHILD_NAME" interrupted "" "$(seconds_since "$CHILD_T0")" "$CHILD_BOX" "$CHILD_LOG" "prove.sh was stopped"
  fi
  "$PY" $H/proof.py summary "$OUT" >/dev/null 2>&1
  exit 143
}

run_step() {  # run_step NAME: in its box, or skipped when the budget cannot give it one
  local name=$1 box left rc status log=$LOGS/$1.log
  box=$(box_of "$name"); left=$((DEADLINE - EPOCHSECONDS))
  [ "$left" -lt "$box" ] && box=$left
  if [ "$box" -lt "${PROVE_MIN_BOX:-20}" ]; then
    record "$name" skipped "" 0 "" "" "budget: ${left}s of ${BUDGET}s left"; return
  fi
  mkdir -p "$WORK/rows"; rm -f "$WORK/rows/$name.jsonl"
  echo "prove.sh: $name (box ${box}s)" >&2
  CHILD_NAME=$name CHILD_T0=$EPOCHREALTIME CHILD_BOX=$box CHILD_LOG=$log
  ROWS="$WORK/rows/$name.jsonl" timeout -k 10 "$box" bash "$SELF" __step "$name" > "$log" 2>&1 &
  CHILD=$!
  echo "$CHILD" > "$WORK/current.pid"  # timeout leads the step's process group
  wait "$CHILD"; rc=$?
  CHILD=""
  case $rc in 0) status=ok ;; 124|137) status=timed_out ;; *) status=failed ;; esac
  record "$name" "$status" "$rc" "$(seconds_since "$CHILD_T0")" "$box" "$log"
}

start_build() {  # BUILD: started | present | skipped:<why>
  local b=$WORK/build
  mkdir -p "$b"
  if [ "$REHEARSE" = 1 ] || [ "$HAVE_GPU" != 1 ]; then BUILD="skipped:no GPU"; return; fi
  # Present: Mamba-1/2's kernels and Mamba-3's, so an older mamba-ssm there (2.3.1) is built over.
  if "$PY" -c 'from mamba.model.ops.kernels import cuda_kernels_available as f
raise SystemExit(0 if f()[0] and f("mamba3")[0] else 1)' 2>/dev/null; then
    BUILD=present; return
  fi
  if [ -z "$WHEELS" ] || ! ls "$WHEELS"/mamba_ssm-*.tar.gz "$WHEELS"/causal_conv1d-*.tar.gz >/dev/null 2>&1; then
    BUILD="skipped:no mamba-ssm / causal-conv1d sources (--wheels)"; return
  fi
  command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { BUILD="skipped:no nvcc"; return; }
  BUILD=started
  if [ -f "$b/done" ] || { [ -f "$b/pid" ] && kill -0 "$(cat "$b/pid")" 2>/dev/null; }; then
    echo "prove.sh: reusing the kernel build in $b" >&2; return  # an earlier run's, finished or running
  fi
  date +%s > "$b/started"
  setsid nice -n 10 bash -c 'bash "$0" __build > "$1/build.log" 2>&1; echo $? > "$1/done"' "$SELF" "$b" \
    < /dev/null > /dev/null 2>&1 &
}

wait_build() {  # sets KERNELS (1/0) and KERNELS_WHY, once; records the build as a step
  [ -n "${KERNELS:-}" ] && return
  local b=$WORK/build started until log=$LOGS/build.log
  case $BUILD in
    present) KERNELS=1; return ;;
    skipped:*) KERNELS=0 KERNELS_WHY=${BUILD#skipped:}; record build skipped "" 0 "" "" "$KERNELS_WHY"; return ;;
  esac
  started=$(cat "$b/started" 2>/dev/null || echo "$EPOCHSECONDS")
  until=$((started + $(box_of build))); [ "$until" -gt "$DEADLINE" ] && until=$DEADLINE
  echo "prove.sh: waiting for the kernel build (until $((until - EPOCHSECONDS))s from now)" >&2
  while [ ! -f "$b/done" ] && [ "$EPOCHSECONDS" -lt "$until" ]; do sleep 2 & wait $!; done
  cp "$b/build.log" "$log" 2>/dev/null
  if [ ! -f "$b/done" ]; then
    KERNELS=0 KERNELS_WHY="kernel build still running after $((EPOCHSECONDS - started))s"
    record build timed_out 124 "$((EPOCHSECONDS - started))" "$(box_of build)" "$log" "$KERNELS_WHY"
  elif [ "$(cat "$b/done")" = 0 ]; then
    KERNELS=1; record build ok 0 "$(( $(stat -c %Y "$b/done") - started ))" "$(box_of build)" "$log"
  else
    KERNELS=0 KERNELS_WHY="kernel build failed (see build)"
    record build failed "$(cat "$b/done")" "$(( $(stat -c %Y "$b/done") - started ))" "$(box_of build)" "$log"
  fi
}

# The environment every step and the build see.
setup_env() {
  export PY WORK SITE LOGS WHEELS REHEARSE HAVE_GPU BASE_PYTHONPATH="${PYTHONPATH:-}"
  export PYTHONPATH="$SITE:$REPO:$REPO/$H${PYTHONPATH:+:$PYTHONPATH}"
  export TRITON_CACHE_DIR="$WORK/triton" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT="" TOKENIZERS_PARALLELISM=false
  if [ -d /usr/local/cuda/bin ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi  # nvcc, for the build
}

case "${1:-}" in
  __step)  # inside a step's box: the command that replaces it, or its function
    var="PROVE_CMD_${2^^}"
    if [ -n "${!var:-}" ]; then exec bash -c "${!var}"; fi
    "step_$2"; exit $? ;;
  __build) build_kernels; exit $? ;;
esac

OUT="" WHEELS="" BUDGET=${PROVE_BUDGET_S:-540} STEPS=${PROVE_STEPS:-$ALL_STEPS} WORK=${PROVE_WORK:-}
PY=${PYTHON:-python3} REHEARSE=${PROVE_REHEARSE:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$(readlink -f "$2"); shift 2 ;;
    --budget-s) BUDGET=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    -h|--help) sed -n '2,34p' "$SELF"; exit 0 ;;
    -*) echo "prove.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "prove.sh: OUT_DIR missing (see --help)" >&2; exit 2; }
for step in $STEPS; do
  case " $ALL_STEPS " in *" $step "*) ;; *) echo "prove.sh: unknown step $step (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"; OUT=$(readlink -f "$OUT")
WORK=$(readlink -f "${WORK:-/tmp/gpu-proof-work}"); SITE=$WORK/site LOGS=$WORK/logs
mkdir -p "$WORK" "$LOGS" "$WORK/rows"
START=$EPOCHSECONDS DEADLINE=$((EPOCHSECONDS + BUDGET))
# What this machine is, for the table's first line; the exit status says whether a GPU is there.
HAVE_GPU=0
env_note=$("$PY" - "$REHEARSE" <<'EOF' 2>&1
import platform, shutil, subprocess, sys
parts, gpu = [f"Python {platform.python_version()}"], False
try:
    import torch
    parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    gpu = torch.cuda.is_available()
    if gpu:
        p = torch.cuda.get_device_properties(0)
        parts.insert(0, f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    import triton
    parts.append(f"triton {triton.__version__}")
except Exception as exc:  # noqa: BLE001 - what is missing is itself the finding
    parts.append(f"{type(exc).__name__}: {exc}")
nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
try:
    parts.append(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
except Exception:  # noqa: BLE001
    parts.append("no nvcc")
print("; ".join(parts) + ("; REHEARSAL (CPU-sized steps)" if sys.argv[1] == "1" else ""))
raise SystemExit(0 if gpu else 1)
EOF
) && HAVE_GPU=1
setup_env
trap on_signal TERM INT HUP
record env ok 0 0 "" "" "$env_note"
[ "$HAVE_GPU" = 1 ] || [ "$REHEARSE" = 1 ] || echo "prove.sh: no GPU here; GPU steps are skipped (--rehearse runs CPU-sized ones)" >&2

[ -n "$WHEELS" ] && run_step install
start_build
for step in $STEPS; do
  var="PROVE_CMD_${step^^}"
  if [ -z "${!var:-}" ] && [ "$REHEARSE" != 1 ]; then
    case "$GPU_STEPS" in
      *" $step "*) if [ "$HAVE_GPU" != 1 ]; then record "$step" skipped "" 0 "" "" "no GPU"; continue; fi ;;
    esac
    case "$KERNEL_STEPS" in
      *" $step "*) wait_build
        if [ "$KERNELS" != 1 ]; then record "$step" skipped "" 0 "" "" "$KERNELS_WHY"; continue; fi ;;
    esac
  fi
  run_step "$step"
done
# The build is recorded even when no kernel step asked for it (a run of torch steps only).
[ "$BUILD" = started ] && [ -z "${KERNELS:-}" ] && [ -f "$WORK/build/done" ] && wait_build
"$PY" $H/proof.py summary "$OUT"
echo "prove.sh: results in $OUT (results.md, results.json, logs.tgz); $((EPOCHSECONDS - START))s of ${BUDGET}s" >&2
exit 0
