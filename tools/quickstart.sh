#!/usr/bin/env bash
# The README's quickstart: set up, pack CPython's standard library with a BPE trained on it, and
# train a tiny Mamba on 2 CPU ranks with FSDP2 for a few minutes. Everything lands in runs/quickstart/.
#   bash tools/quickstart.sh [--torch pinned|current]
# Re-running reuses the venv and the packed data (pack is skipped when its index.json exists) and
# autoresume continues from the last checkpoint; delete runs/quickstart/ to start over.
# For its test (tests/tools/test_quickstart.py), the environment may shrink it:
#   QUICKSTART_OUT (default runs/quickstart), QUICKSTART_INPUT (default the whole standard library),
#   QUICKSTART_STEPS (default the planner's).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${QUICKSTART_OUT:-runs/quickstart}

# The pinned stack's .venv/ by default; `--torch current` for the current one (README "Stacks").
venv=$(bash tools/install.sh "$@")

input=${QUICKSTART_INPUT:-$($venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')}
if [ ! -f "$out/packed/index.json" ]; then
  $venv/bin/python tools/pack.py --tokenizer bpe:8192 --on-bad-input skip --exclude site-packages --out "$out/packed" "$input"
fi

$venv/bin/python create_mamba_config.py --preset tiny --data "$out/packed" --out "$out/tiny.yaml" \
  --run-name quickstart "trainer.save_folder=$out/checkpoints" "logging.metrics_file=$out/metrics.jsonl" \
  ${QUICKSTART_STEPS:+"trainer.max_duration=${QUICKSTART_STEPS}ba" scheduler.t_warmup=1ba}

# One thread per rank: two ranks on two cores oversubscribe OpenMP otherwise (about 4x slower).
# A finished run (its export is written last) is not launched again: a re-run only shows the sample.
if [ ! -f "$out/checkpoints/hf/config.json" ]; then
  OMP_NUM_THREADS=1 $venv/bin/composer -n 2 mamba/train.py "$out/tiny.yaml" trainer.export_hf=true
fi

echo
echo "== a greedy sample from the trained model (prompt 'def '):"
$venv/bin/python tools/generate.py "$out/checkpoints/hf" --prompt 'def ' --max-new-tokens 48
echo
cat <<NEXT
== done. The run's files: checkpoints $out/checkpoints, metrics $out/metrics.jsonl,
   Hugging Face export $out/checkpoints/hf, config $out/tiny.yaml. Next:
  $venv/bin/python tools/generate.py $out/checkpoints/hf --prompt 'import ' --temperature 0.8 --top-p 0.95
  $venv/bin/python tools/plot_metrics.py $out/metrics.jsonl --out $out/curves.png
  $venv/bin/python tools/export_hf.py $out/checkpoints DIR          # any checkpoint, e.g. an earlier one
  $venv/bin/python create_mamba_config.py --help                    # plan a real run (README "Entry points")
NEXT
