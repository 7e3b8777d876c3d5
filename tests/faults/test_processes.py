"""Processes that outlive their launcher or collide with a live run, done for real.

  - The save-folder lock against real processes: another interpreter holding it refuses this
    one, naming its host and pid; after kill -9 of that interpreter the lock is taken over; a lock
    from another host counts while its heartbeat is fresh, and one whose pid now runs another
    process (pid reuse) is stale.
  - One `composer -n 2 mamba/train.py` run: a second launch into its folder is refused naming
    its rank 0; kill -9 of the launcher kills both ranks within seconds and nothing more is
    written; a relaunch takes over the dead run's lock and resumes from its last checkpoint.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launching import ENV, REPO, launch, wait_until
from mamba.runs.checkpoints import check_checkpoint, find_checkpoints
from mamba.runs.metrics import read_metrics
from mamba.training.run_lock import LOCK_NAME, STALE_AFTER_S, RunLocked, SaveFolderLock

HOLD = ("import sys, time; from mamba.training.run_lock import SaveFolderLock; "
        "SaveFolderLock(sys.argv[1], 'holder').acquire(); print('held', flush=True); time.sleep(600)")


def test_a_live_owner_refuses_and_a_dead_or_foreign_stale_one_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked) as refused:
            SaveFolderLock(tmp_path, "second").acquire()
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {holder.pid}" in message and "'holder'" in message
        assert str(tmp_path / LOCK_NAME) in message and f"kill {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()

    lock = SaveFolderLock(tmp_path, "second")
    with caplog.at_level(logging.WARNING):
        lock.acquire()  # the holder died with its lock in place
    assert f"pid {holder.pid}" in caplog.text and "stale" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the lock left files behind"

    # Another host's lock: its pid cannot be checked, its heartbeat (the file's mtime) can.
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1234, "pid_started": 0.0, "run_name": "far"}))
    with pytest.raises(RunLocked, match="host node-elsewhere, pid 1234"):
        SaveFolderLock(tmp_path, "second").acquire()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))
    lock = SaveFolderLock(tmp_path, "second")
    lock.acquire()
    lock.release()

    # This host, a live pid that is not the process which wrote the lock (its start time differs).
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "pid_started": 1.0}))
    lock = SaveFolderLock(tmp_path, "second")
    lock.acquire()
    lock.release()


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("ep*-ba*"))


def trained(metrics: Path) -> list[int]:
    return [r["batch"] for r in read_metrics(str(metrics)) if "loss/train/total" in r] if metrics.exists() else []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by init
    except psutil.NoSuchProcess:
        return True


def test_ranks_die_with_their_launcher_and_one_run_owns_its_folder(tiny_config):
    work = tiny_config.parent
    ckpt, metrics = work / "orphan" / "ckpt", work / "orphan" / "metrics.jsonl"
    run, ranks = launch(tiny_config, "run_name=orphan"), []
    try:
        wait_until(lambda: len(trained(metrics)) >= 6 and checkpoints(ckpt), "checkpoint and batch 6", 180, run)
        ranks = psutil.Process(run.pid).children()
        assert len(ranks) == 2, ranks
        owner = json.loads((ckpt / LOCK_NAME).read_text())
        assert owner["pid"] in [r.pid for r in ranks] and owner["run_name"] == "orphan"

        # A second launch into the live run's folder: refused, naming the owner, writing nothing.
        config_written = (ckpt / "config.yaml").stat().st_mtime_ns
        second = launch(tiny_config, "run_name=orphan", nproc=0)
        out, _ = second.communicate(timeout=120)
        assert second.returncode != 0, out[-3000:]
        assert f"host {socket.gethostname()}, pid {owner['pid']}" in out and "another run_name" in out, out[-3000:]
        assert (ckpt / "config.yaml").stat().st_mtime_ns == config_written

        # kill -9 of the launcher: the kernel kills both ranks (PR_SET_PDEATHSIG).
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        wait_until(lambda: all(gone(r.pid) for r in ranks), "death of both ranks", 5)
        after = checkpoints(ckpt), trained(metrics)
        time.sleep(3)  # a surviving rank trains several batches and checkpoints in this time
        assert (checkpoints(ckpt), trained(metrics)) == after, "something still writes into the run"
    finally:  # after a failure: whatever of the run survived it
        run.kill()
        for rank in ranks:
            if not gone(rank.pid):
                rank.kill()

    # The relaunch finds the dead run's lock (its pid is gone), takes it over and resumes.
    # The newest intact checkpoint: the kill may have torn one mid-save, which the relaunch skips.
    last = next(int(c.name.split("-ba")[1].split("-")[0]) for c in find_checkpoints(ckpt) if check_checkpoint(c) is None)
    seen = len(trained(metrics))
    relaunch = launch(tiny_config, "run_name=orphan", f"trainer.max_duration={last + 2}ba")
    out, _ = relaunch.communicate(timeout=300)
    assert relaunch.returncode == 0, out[-4000:]
    assert "took over the stale lock" in out and f"pid {owner['pid']}" in out, out[-4000:]
    assert trained(metrics)[seen:] == [last + 1, last + 2], "the relaunch did not resume from the last checkpoint"
    assert not (ckpt / LOCK_NAME).exists(), "the finished run left its lock"
