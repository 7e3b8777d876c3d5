"""SIGTERM and kill -9 on the real launch line: `composer -n 2 mamba/train.py` on packed stdlib text.

Three launches of one command (autoresume on, a checkpoint every 4 batches):
  1  SIGTERM to both ranks mid-run (as Slurm does): a checkpoint at the stop batch, exit code 0;
  2  autoresumes right after that batch; then kill -9 of rank 1: the launcher exits non-zero;
  3  autoresumes from the newest complete checkpoint (so it was intact) and finishes.
"""
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mamba.runs.metrics import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_fsdp_resume import COMPOSER, REPO, free_port, run  # noqa: E402


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("signals")
    stdlib = Path(sys.modules["os"].__file__).parent
    run([sys.executable, "tools/pack.py", "--tokenizer", "bpe:512", "--out", str(work / "packed"),
         *map(str, sorted(stdlib.glob("*.py"))[:60])], cwd=REPO)
    path = work / "tiny.yaml"
    run([sys.executable, "create_mamba_config.py", "--preset", "tiny", "--data", str(work / "packed"),
         "--out", str(path), "model.d_model=64", "model.n_layer=2", "data.seq_len=64", "run_name=sig",
         "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "scheduler.t_warmup=4ba",
         "scheduler.t_max=200ba", "trainer.max_duration=200ba", "trainer.save_interval=4ba",
         "trainer.save_num_checkpoints_to_keep=-1", "logging.progress_bar=false",
         f"trainer.save_folder={work}/ckpt", f"logging.metrics_file={work}/metrics.jsonl"], cwd=REPO)
    return path


def start(config: Path, *overrides: str) -> subprocess.Popen:
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([str(COMPOSER), "-n", "2", "--master_port", str(free_port()), "mamba/train.py",
                             str(config), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def batches(config: Path) -> list[int]:
    path = config.parent / "metrics.jsonl"
    return [r["batch"] for r in read_metrics(str(path)) if "loss/train/total" in r] if path.exists() else []


def wait_for_batch(proc: subprocess.Popen, config: Path, batch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not batches(config) or batches(config)[-1] < batch:
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no batch {batch} after {timeout} s"
        time.sleep(0.2)


def ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children()
    assert len(children) == 2, children
    return children


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def latest(config: Path) -> int:
    """Batch of the checkpoint that autoresume would load (the latest-rank0.pt symlink's target)."""
    target = (config.parent / "ckpt" / "latest-rank0.pt").resolve()
    assert (target / ".metadata").is_file(), f"{target} is not a complete sharded checkpoint"
    return int(target.name.split("-ba")[1])


def test_sigterm_checkpoints_and_kill9_leaves_the_last_checkpoint_resumable(config):
    # 1: SIGTERM both ranks after batch 5.
    proc = start(config)
    wait_for_batch(proc, config, 5)
    for rank in ranks(proc):
        rank.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out[-4000:]
    stopped = batches(config)[-1]
    assert stopped < 40, "SIGTERM did not stop the run"
    assert latest(config) == stopped, f"no checkpoint at the SIGTERM batch {stopped}"

    # 2: the same command resumes at stopped + 1; kill -9 rank 1 two batches after a new checkpoint.
    seen = len(batches(config))
    proc = start(config)
    next_save = (stopped // 4 + 1) * 4
    wait_for_batch(proc, config, next_save + 2)
    assert batches(config)[seen] == stopped + 1, "launch 2 did not resume from the SIGTERM checkpoint"
    ranks(proc)[1].send_signal(signal.SIGKILL)
    code, out = finish(proc)
    assert code != 0, "the launcher hid a killed rank"
    good = latest(config)
    assert good >= next_save

    # 3: resumes from the newest complete checkpoint and trains to the end.
    seen = len(batches(config))
    code, out = finish(start(config, f"trainer.max_duration={good + 2}ba"))
    assert code == 0, out[-4000:]
    assert batches(config)[seen:] == [good + 1, good + 2], "launch 3 did not resume from the last checkpoint"
