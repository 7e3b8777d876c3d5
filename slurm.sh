#!/usr/bin/env bash
# Multi-node training on Slurm, preemption-safe. Submit from the repository root:
#
#   sbatch slurm.sh CONFIG.yaml [section.key=value ...]
#   sbatch --nodes=4 --time=48:00:00 slurm.sh config.yaml trainer.max_duration=50000ba
#
# One Slurm task per node; each task runs Composer's launcher, which starts one training process
# per GPU. The header below is the default (2 nodes x 8 GPUs); sbatch's own options override it.
# CPU nodes (testing): `sbatch --gpus-per-node=0 ...` runs NPROC_PER_NODE processes per node
# (default 1, so a 2-node test is a 2-rank FSDP run).
#
# Time limit and preemption: Slurm sends USR1 to this script 120 s before the limit. The trap
# below has Slurm signal every process of the training step with SIGTERM (the ranks save a
# checkpoint and exit; see mamba/training/signals.py), waits for the step, then requeues the job.
# (Signalling srun itself would not do: srun takes SIGTERM as "abort the step" and kills the
# ranks.) The requeued job runs this same script with the same CONFIG and run_name, and
# trainer.autoresume picks up the newest checkpoint in save_folder. A preemption or `scontrol requeue` sends SIGTERM to every process directly, with
# the same effect (but only KillWait seconds before SIGKILL). Output goes to one file per job,
# appended across requeues.
#
#SBATCH --job-name=mamba
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: sbatch slurm.sh CONFIG.yaml [section.key=value ...]  (config ${1:-<none>} not found;" \
       "paths are relative to the submit directory ${SLURM_SUBMIT_DIR:-$PWD})" >&2
  exit 2
fi
# sbatch runs a copy of this file from Slurm's spool directory: work from where it was submitted.
cd "${SLURM_SUBMIT_DIR:-$PWD}"

# Processes per node: one per allocated GPU; on CPU nodes NPROC_PER_NODE (default 1).
gpus=${SLURM_GPUS_ON_NODE:-0}
nproc=${NPROC_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 1)}
nnodes=${SLURM_NNODES:-1}

# Rendezvous: the first node of the allocation hosts the store. The port is derived from the job
# id (stable across requeues, different for jobs sharing a node), in 20000..39999.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# Threads: each process gets its share of the task's CPUs (oversubscribed OpenMP is ~4x slower).
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
# NCCL: abort a collective that hangs (a dead node) so the job fails and can be requeued, rather
# than sitting until the time limit; WARN prints setup problems without per-call noise. Sites with
# several networks may also need NCCL_SOCKET_IFNAME / NCCL_IB_HCA (ask your admins).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
COMPOSER=${COMPOSER:-composer}

echo "[slurm.sh] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $nnodes node(s) x $nproc process(es)," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, config $*"

step=""
on_usr1() {
  echo "[slurm.sh] time limit near: stopping training (SIGTERM -> checkpoint), then requeue"
  # The batch script's first srun is step 0 of the job (in a requeued run too).
  scancel --signal=TERM "$SLURM_JOB_ID.0" || true
  [ -n "$step" ] && wait "$step" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_usr1 USR1

# The variables in single quotes are expanded by each task on its own node. On SIGTERM Composer's
# launcher passes SIGTERM on to its ranks and gives them 30 s (its CLEANUP_TIMEOUT) before SIGKILL;
# the ranks (mamba/training/signals.py) finish the batch, checkpoint and exit 0 within it.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
  exec "$0" -n "$1" --world_size "$2" --node_rank "$SLURM_NODEID" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" mamba/train.py "${@:3}"
' "$COMPOSER" "$nproc" "$((nproc * nnodes))" "$@" &
step=$!
# A trap runs only when the foreground command returns: `wait` returns as soon as USR1 arrives.
wait "$step"
