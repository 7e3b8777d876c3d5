"""slurm.sh's launch from Python with submitit: requeue-and-autoresume on timeout or preemption.

    python tools/submit.py CONFIG.yaml [key=value ...] --nodes 2 --gpus-per-node 8 --time 1440
    python tools/submit.py CONFIG.yaml --local --procs-per-node 2      # this machine, no Slurm

One submitit task per node; each runs Composer's launcher (`composer -n GPUS --world_size ...
--node_rank NODE mamba/train.py CONFIG ...`) as a child process, the rendezvous taken from the
job's node list (first node, a port derived from the job id), exactly as slurm.sh does.

Timeout/preemption: submitit asks Slurm for a USR2 `--signal` before the limit. Its handler on
global rank 0 calls `Launch.checkpoint`, which sends SIGTERM to every training process of the job
(`scancel --signal=TERM`: the ranks save a checkpoint and exit, mamba/training/signals.py) and
waits for its own node's child, then returns a DelayedSubmission of the same Launch; submitit
requeues the job and the new run autoresumes from the newest checkpoint (fixed run_name). The
training processes ignore USR2 (set before exec), so only submitit's handler sees it. Composer's
launcher passes SIGTERM on to its ranks and allows them 30 s before SIGKILL.

--local uses submitit's LocalExecutor: one node, the same Launch, for a dry run of a config.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

REPO = Path(__file__).resolve().parents[1]


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class Launch:
    """A picklable callable run by submitit in every task (one task per node)."""

    def __init__(self, config: str, overrides: list[str], procs_per_node: int):
        self.config, self.overrides, self.procs_per_node = config, overrides, procs_per_node
        self._child: subprocess.Popen | None = None

    def command(self, env: submitit.JobEnvironment) -> list[str]:
        master = env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1"
        port = 20000 + int(env.raw_job_id) % 20000 if str(env.raw_job_id).isdigit() else 29500
        composer = str(Path(sys.executable).parent / "composer")
        return [composer, "-n", str(self.procs_per_node), "--world_size", str(self.procs_per_node * env.num_nodes),
                "--node_rank", str(env.node), "--master_addr", master, "--master_port", str(port),
                "mamba/train.py", self.config, *self.overrides]

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        cmd = self.command(env)
        print(f"[submit.py] {env}: {' '.join(cmd)}", flush=True)
        threads = max(1, (len(os.sched_getaffinity(0)) // self.procs_per_node))
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(threads)),
                         TORCH_NCCL_ASYNC_ERROR_HANDLING=os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"))
        # New session: checkpoint() can signal the launcher and its ranks together. USR2 ignored
        # (inherited through exec) so Slurm's warning signal reaches only submitit's handler.
        self._child = subprocess.Popen(cmd, cwd=REPO, env=child_env, start_new_session=True, preexec_fn=_ignore_usr2)
        code = self._wait()
        if code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM):
            raise RuntimeError(f"training exited with code {code} on node {env.node}: {' '.join(cmd)}")
        return code

    def _wait(self) -> int:
        """Poll, not Popen.wait(): checkpoint() runs in a signal handler while __call__ waits, and
        a second blocking wait() there would deadlock on Popen's internal lock."""
        while self._child.poll() is None:
            time.sleep(0.5)
        return self._child.returncode

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 at USR2: stop training (it saves), then requeue the same launch."""
        job = os.environ.get("SLURM_JOB_ID")
        if job:
            subprocess.run(["scancel", "--signal=TERM", job], check=False)
        elif self._child is not None:
            os.killpg(self._child.pid, signal.SIGTERM)
        if self._child is not None:
            self._wait()
        return submitit.helpers.DelayedSubmission(Launch(self.config, self.overrides, self.procs_per_node))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML written by create_mamba_config.py")
    p.add_argument("overrides", nargs="*", help="section.key=value, passed to mamba/train.py")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: CPU nodes (--procs-per-node ranks each)")
    p.add_argument("--procs-per-node", type=int, help="training processes per node (default: GPUs per node, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--time", type=int, default=24 * 60, help="minutes per job before requeue")
    p.add_argument("--partition")
    p.add_argument("--max-requeues", type=int, default=20, help="timeouts allowed before giving up")
    p.add_argument("--logs", default="runs/submitit", help="submitit's folder (logs, pickles)")
    p.add_argument("--local", action="store_true", help="run on this machine (submitit LocalExecutor)")
    p.add_argument("--wait", action="store_true", help="block until the job ends, print its result")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        sys.exit(f"submit.py: config {args.config} not found")
    procs = args.procs_per_node or args.gpus_per_node or 1
    config = str(Path(args.config).resolve())

    if args.local:
        executor = submitit.LocalExecutor(folder=args.logs)
        executor.update_parameters(timeout_min=args.time, nodes=1, tasks_per_node=1)
    else:
        executor = submitit.AutoExecutor(folder=args.logs, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
        params = {"timeout_min": args.time, "nodes": args.nodes, "tasks_per_node": 1,
                  "slurm_signal_delay_s": 120,
                  "slurm_additional_parameters": {"requeue": True}}
        if args.gpus_per_node:
            params["gpus_per_node"] = args.gpus_per_node
        if args.cpus_per_task:
            params["cpus_per_task"] = args.cpus_per_task
        if args.partition:
            params["slurm_partition"] = args.partition
        executor.update_parameters(**params)
    job = executor.submit(Launch(config, args.overrides, procs))
    print(f"submitted job {job.job_id}; logs in {args.logs}")
    if args.wait:
        print(f"job {job.job_id} finished: exit code {max(job.results())}")  # one result per node


if __name__ == "__main__":
    main()
