#!/usr/bin/env bash
# Pack one dataset on many machines: a Slurm array job whose task I packs part I of N of the inputs
# (tools/pack.py --part I/N). Submit from the repository root, N = the array's size:
#
#   sbatch --array=0-7 tools/pack_slurm.sh 8 --tokenizer tokenizer.json --out data/big corpus/ [pack options]
#
# Each task writes OUT/part-I-of-N/ and the last one to finish merges every part into OUT (one
# index.json over all parts' shards; nothing is copied). A failed or killed task re-runs alone and
# resumes where it stopped: `sbatch --array=5 tools/pack_slurm.sh 8 <same arguments>`; submitting
# the whole array again is fine too, since a finished part returns at once. Parts never share a
# tokenizer trained on the fly: give --tokenizer a tokenizer.json (train one with a pack of a sample,
# --tokenizer bpe:N). Tokenizing processes per task: the task's CPUs, unless --workers says otherwise.
#
#SBATCH --job-name=pack
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

parts=${1:-}
if ! [[ "$parts" =~ ^[1-9][0-9]*$ ]] || [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
  echo "usage: sbatch --array=0-\$((N-1)) tools/pack_slurm.sh N PACK_ARGUMENTS... (got N='$parts'," \
       "array task '${SLURM_ARRAY_TASK_ID:-none}')" >&2
  exit 2
fi
shift
# sbatch runs a copy of this file from Slurm's spool directory: work from where it was submitted.
cd "${SLURM_SUBMIT_DIR:-$PWD}"
exec python tools/pack.py --part "$SLURM_ARRAY_TASK_ID/$parts" --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
