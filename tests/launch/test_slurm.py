"""slurm.sh on a real Slurm: two "nodes" (two slurmd on this machine, tools/slurm_local.sh), one
rank each, the tiny config on packed stdlib text.

  A  an uninterrupted 2-node job: it trains (every batch logged, loss finite) and checkpoints;
  B  the same job, interrupted mid-run with USR1 to the batch script (exactly what
     `--signal=B:USR1@120` delivers before the time limit): slurm.sh's trap stops the training
     step and runs `scontrol requeue`; Slurm restarts the job (SLURM_RESTART_COUNT=1), which
     autoresumes from its newest checkpoint and must end with exactly A's final loss;
  C  the same through tools/submit.py (submitit), preempted with USR2: same final loss as A;
  D  2 ranks per node, a truncated shard in the copy of the data only rank 3 (node 2's second
     rank) reads: the job log's first error is rank 3's, naming the shard, although node 1's
     ranks only see their collective break (rank_process.py relays errors across nodes).
  E  tools/pack_slurm.sh as an array job of 3 parts: the last part merges, and the merged dataset's
     token stream is the one-machine pack's; a lost part re-run alone (--array=1) merges again.

Skipped, with the reason, only where Slurm cannot be installed here (not root, or no apt-get).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from mamba.runs.metrics import read_metrics, series

REPO = Path(__file__).resolve().parents[2]
BATCHES = 16

if os.geteuid() != 0 or not (shutil.which("apt-get") or shutil.which("slurmctld")):
    pytest.skip("installing and running Slurm needs root and apt-get (tools/slurm_local.sh)", allow_module_level=True)


def sh(*args: str, **kw) -> str:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """A running 2-node Slurm, packed data and a tiny config; returns the work folder."""
    sh("bash", "tools/slurm_local.sh", "start", timeout=600)
    work = tmp_path_factory.mktemp("slurm")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(stdlib.glob("*.py"))[:40]
    sh(sys.executable, "tools/pack.py", "--tokenizer", "bpe:512", "--out", str(work / "packed"), *map(str, sources))
    sh(sys.executable, "create_mamba_config.py", "--preset", "tiny", "--data", str(work / "packed"),
       "--out", str(work / "tiny.yaml"), "model.d_model=64", "model.n_layer=2", "data.seq_len=256",
       "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "scheduler.t_warmup=4ba",
       f"trainer.max_duration={BATCHES}ba", "trainer.save_interval=4ba", "logging.progress_bar=false",
       "logging.log_interval=1ba", f"trainer.save_folder={work}/{{run_name}}/ckpt",
       f"logging.metrics_file={work}/{{run_name}}/metrics.jsonl")
    return work


def submit(work: Path, run_name: str, *sbatch_args: str, overrides: tuple[str, ...] = (), ranks_per_node: int = 1) -> int:
    """sbatch slurm.sh on 2 CPU nodes with `ranks_per_node` ranks each; returns the job id."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               NPROC_PER_NODE=str(ranks_per_node))
    out = sh("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
             f"--output={work}/{run_name}.out", *sbatch_args, "slurm.sh", str(work / "tiny.yaml"),
             f"run_name={run_name}", *overrides, env=env)
    return int(out.strip().split(";")[0])


def job_state(job: int) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def wait_for(condition, what: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.25)  # short: the interrupts below must land before a ~4 s run ends


def wait_done(job: int, log: Path) -> None:
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"),
             f"job {job}")
    assert job_state(job) == "COMPLETED", f"job {job} ended {job_state(job)}:\n{log.read_text()[-4000:]}"


def losses(work: Path, run_name: str) -> dict[int, float]:
    """Batch -> loss, the last logged value of each batch (a resumed run logs its batches again)."""
    return series(read_metrics(str(work / run_name / "metrics.jsonl")), "loss/train/total")


def checkpoints(work: Path, run_name: str) -> list[str]:
    folder = work / run_name / "ckpt"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def whole(cluster) -> dict[int, float]:
    """Run A (uninterrupted); its losses."""
    job = submit(cluster, "whole")
    wait_done(job, cluster / "whole.out")
    return losses(cluster, "whole")


def test_two_node_job_trains_and_checkpoints(cluster, whole):
    log = (cluster / "whole.out").read_text()
    assert "2 node(s) x 1 process(es)" in log, log[-3000:]
    assert sorted(whole) == list(range(1, BATCHES + 1))
    assert all(0 < v < 20 for v in whole.values()), whole
    assert any(f"ba{BATCHES}" in name for name in checkpoints(cluster, "whole")), checkpoints(cluster, "whole")


def test_usr1_requeues_and_the_job_resumes_to_the_same_loss(cluster, whole):
    job = submit(cluster, "requeued")
    # Interrupt once the first checkpoint (batch 4) exists and before the run ends.
    wait_for(lambda: any("ba4" in n for n in checkpoints(cluster, "requeued")), "the first checkpoint")
    sh("scancel", "--batch", "--signal=USR1", str(job))
    wait_for(lambda: "restart 1" in (cluster / "requeued.out").read_text(), "the requeued job to restart")
    wait_done(job, cluster / "requeued.out")

    log = (cluster / "requeued.out").read_text()
    assert "time limit near" in log, log[-3000:]
    # The ranks checkpoint at the batch they were on (mamba/training/signals.py) and the requeued
    # job continues right after it: every batch logged once, none replayed from scratch.
    assert "stopping after batch" in log, log[-3000:]
    rows = [r["batch"] for r in read_metrics(str(cluster / "requeued" / "metrics.jsonl")) if "loss/train/total" in r]
    assert rows == list(range(1, BATCHES + 1)), rows
    requeued = losses(cluster, "requeued")
    assert requeued[BATCHES] == whole[BATCHES], json.dumps({"whole": whole, "requeued": requeued})


def test_submitit_launch_is_preempted_requeued_and_resumes_to_the_same_loss(cluster, whole):
    """tools/submit.py on the same 2 nodes: USR2 (what submitit's --signal delivers before the
    time limit) makes its checkpoint hook stop the ranks (they save) and requeue the job, which
    autoresumes and must end with exactly A's final loss."""
    proc = subprocess.Popen(
        [sys.executable, "tools/submit.py", str(cluster / "tiny.yaml"), "run_name=submitit", "--nodes", "2",
         "--gpus-per-node", "0", "--procs-per-node", "1", "--cpus-per-task", "1", "--time", "10",
         "--logs", str(cluster / "submitit-logs"), "--wait"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any("ba4" in n for n in checkpoints(cluster, "submitit")), "the first checkpoint")
        job = next(p.name.split("_")[0] for p in (cluster / "submitit-logs").glob("*_submitted.pkl"))
        sh("scancel", "--signal=USR2", job)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    logs = "\n".join(p.read_text() for p in sorted((cluster / "submitit-logs").glob("*_log.*")))
    assert proc.returncode == 0 and "finished: exit code 0" in out, f"{out[-3000:]}\n{logs[-4000:]}"
    assert "Calling checkpoint method" in logs and "Requeued job" in logs, logs[-4000:]
    assert "stopping after batch" in logs and "Autoresuming training from checkpoint" in logs, logs[-4000:]
    rows = [r["batch"] for r in read_metrics(str(cluster / "submitit" / "metrics.jsonl")) if "loss/train/total" in r]
    assert rows == list(range(1, BATCHES + 1)), rows
    assert losses(cluster, "submitit")[BATCHES] == whole[BATCHES]


def test_a_data_error_on_the_second_node_is_the_first_error_in_the_job_log(cluster):
    for rank in range(4):  # the launcher expands $RANK in each rank's arguments
        shutil.copytree(cluster / "packed", cluster / f"copy{rank}")
    shard = sorted((cluster / "copy3").glob("*.npy"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    job = submit(cluster, "torn", overrides=(f"data.sources=[{{path: '{cluster}/copy$RANK'}}]",), ranks_per_node=2)
    wait_for(lambda: job_state(job) in ("FAILED", "COMPLETED", "CANCELLED", "GONE"), f"job {job} to end")
    log = (cluster / "torn.out").read_text()
    assert job_state(job) == "FAILED", log[-4000:]
    errors = [line for line in log.splitlines()
              if re.search(r"[A-Za-z]+(Error|Exception)\b|^rank \d+: (data|config) error: ", line)]
    assert errors, log[-4000:]
    assert errors[0].startswith("rank 3: data error: ") and str(shard) in errors[0] and "truncated" in errors[0], \
        log[-6000:]


def token_stream(data_dir: Path) -> np.ndarray:
    index = json.loads((data_dir / "index.json").read_text())
    return np.concatenate([np.load(data_dir / s["file"]) for s in index["shards"]])


def test_an_array_job_packs_in_parts_and_the_last_part_merges(cluster):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [str(p) for p in sorted(stdlib.glob("*.py"))[:40]]  # the cluster fixture's inputs
    out = cluster / "packed3"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def run_array(tasks: str) -> None:
        job = sh("sbatch", "--parsable", f"--array={tasks}", "--cpus-per-task=1", "--time=10",
                 f"--output={cluster}/pack-%a.out", "tools/pack_slurm.sh", "3", "--tokenizer",
                 str(cluster / "packed" / "tokenizer.json"), "--out", str(out), *sources, env=env).strip()
        wait_for(lambda: not sh("squeue", "-h", "-j", job).strip(), f"array job {job}")
        logs = "\n".join(p.read_text() for p in sorted(cluster.glob("pack-*.out")))
        assert (out / "index.json").is_file(), logs[-4000:]

    run_array("0-2")
    logs = [(cluster / f"pack-{i}.out").read_text() for i in range(3)]
    assert sum(log.rstrip().splitlines()[-1].startswith(f"merged 3 parts into {out}") for log in logs) >= 1, logs
    assert np.array_equal(token_stream(out), token_stream(cluster / "packed"))
    # Part 1 lost: only it runs again, and being the last to finish it merges.
    shutil.rmtree(out / "part-00001-of-00003")
    (out / "index.json").unlink()
    run_array("1")
    assert (cluster / "pack-1.out").read_text().rstrip().splitlines()[-1].startswith(f"merged 3 parts into {out}")
    assert np.array_equal(token_stream(out), token_stream(cluster / "packed"))
