"""tools/submit.py in --local mode (submitit's LocalExecutor), with a real preemption.

  A  `submit.py --local --wait`: the tiny config trains to the end and checkpoints;
  B  the same, and once its first checkpoint exists the submitit worker gets USR2 (what Slurm's
     `--signal` and submitit's own LocalJob._interrupt send): Launch.checkpoint stops training and
     returns a DelayedSubmission, submitit requeues, and the new run autoresumes from the
     checkpoint and must end with exactly A's final loss.
One training process per run keeps it to three launches; multi-rank launches are in test_slurm.py.
"""
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest

from mamba.runs.metrics import read_metrics, series

REPO = Path(__file__).resolve().parents[2]
BATCHES = 16
# Windows of 1024 tokens make a batch ~0.4 s here, so the 12 batches after the first checkpoint
# leave the preemption seconds to land; with 64-token windows the run once ended first (CI).


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("submit")
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    for args in (["tools/pack.py", "--tokenizer", "bpe:512", "--out", str(work / "packed"), *map(str, sources)],
                 ["create_mamba_config.py", "--preset", "tiny", "--data", str(work / "packed"), "--out",
                  str(work / "tiny.yaml"), "model.d_model=64", "model.n_layer=2", "data.seq_len=1024",
                  "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "scheduler.t_warmup=2ba",
                  f"trainer.max_duration={BATCHES}ba", "trainer.save_interval=4ba", "logging.progress_bar=false",
                  "logging.log_interval=1ba", f"trainer.save_folder={work}/{{run_name}}/ckpt",
                  f"logging.metrics_file={work}/{{run_name}}/metrics.jsonl"]):
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def submit(work: Path, run_name: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "tools/submit.py", str(work / "tiny.yaml"), f"run_name={run_name}",
                             "--local", "--wait", "--procs-per-node", "1", "--logs", str(work / f"logs-{run_name}")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, work: Path, run_name: str) -> str:
    out, _ = proc.communicate(timeout=600)
    logs = "\n".join(p.read_text() for p in sorted((work / f"logs-{run_name}").glob("*_log.*")))  # .out, .err
    assert proc.returncode == 0, f"{out[-3000:]}\n{logs[-4000:]}"
    return out + logs


def losses(work: Path, run_name: str) -> dict[int, float]:
    return series(read_metrics(str(work / run_name / "metrics.jsonl")), "loss/train/total")


def test_local_submission_trains_and_a_preempted_one_resumes_to_the_same_loss(work):
    out = finish(submit(work, "whole"), work, "whole")
    assert "finished: exit code 0" in out
    whole = losses(work, "whole")
    assert sorted(whole) == list(range(1, BATCHES + 1))
    assert any(f"ba{BATCHES}" in p.name for p in (work / "whole" / "ckpt").iterdir())

    proc = submit(work, "preempted")
    ckpt = work / "preempted" / "ckpt"
    end = time.monotonic() + 300
    while not (ckpt.is_dir() and any("ba4" in p.name for p in ckpt.iterdir())):
        assert time.monotonic() < end and proc.poll() is None, "no first checkpoint"
        time.sleep(0.1)
    # submitit's task worker: the process whose child is the training launcher (submit.py ->
    # submitit's local controller -> worker -> composer). Slurm signals the worker the same way.
    worker = [p for p in psutil.Process(proc.pid).children(recursive=True)
              if any("mamba/train.py" in " ".join(c.cmdline()) for c in p.children())
              and "mamba/train.py" not in " ".join(p.cmdline())]
    assert len(worker) == 1, worker
    os.kill(worker[0].pid, signal.SIGUSR2)
    out = finish(proc, work, "preempted")
    assert "Calling checkpoint method" in out and "Requeued job" in out, out[-4000:]
    # The ranks checkpoint at the batch they were on (mamba/training/signals.py); the requeued run
    # must continue right after it, each batch logged once, from the checkpoint, not from scratch.
    # (Keep-N may since have deleted that checkpoint: the requeued job's log names what it resumed.)
    stopped = int(re.search(r"stopping after batch (\d+)", out).group(1))
    assert re.search(rf"autoresume: resuming from \S*-ba{stopped}\b", out), out[-4000:]
    assert "Requeued job" in out, out[-3000:]
    rows = [r["batch"] for r in read_metrics(str(work / "preempted" / "metrics.jsonl")) if "loss/train/total" in r]
    assert rows == list(range(1, BATCHES + 1)), rows
    assert losses(work, "preempted")[BATCHES] == whole[BATCHES]
