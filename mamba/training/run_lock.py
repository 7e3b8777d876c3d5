"""One live run per save folder: rank 0 holds <save_folder>/run.lock for the run's life.

Two runs writing one folder (a relaunch while the first job's ranks still train, a typo'd
run_name shared by two jobs) interleave checkpoints and rotate each other's files away. So train()
takes this lock before anything is written there, and a second launch is refused, naming the owner.

The lock file is JSON: host, pid, the pid's start time, start date, run_name. It is created under a
temp name and hard-linked to run.lock: link() fails if run.lock exists, atomically, also on NFS
(where O_EXCL and flock are not reliable across hosts). The owner is gone, and its lock stale, when
  - on this host: its pid is not running, or runs another process (the pid's start time differs);
  - on another host (a multi-node job's rank 0 elsewhere, the pid cannot be checked): the owner's
    heartbeat stopped; a thread touches the file every HEARTBEAT_S, so a lock untouched for
    STALE_AFTER_S belongs to a run that died without removing it (kill -9, node failure).
A stale lock is taken over with a warning, so a killed run's relaunch just works.

Only rank 0 takes the lock (a multi-node job is one owner); the other ranks learn the outcome by
broadcast, and every rank raises the same RunLocked if it was refused.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import psutil
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: a slow shared filesystem is not a dead run


class RunLocked(RuntimeError):
    """The save folder belongs to a live run."""


_current: SaveFolderLock | None = None  # the one this process holds: train() runs one run at a time


def release_held() -> None:
    """Release the lock this process holds, if any. At interpreter exit, and in cli.main when
    train() raised before the Trainer (which releases it at close()) existed: a refused or failed
    launch must not keep the folder locked while its process lives on (in-process runs, tests)."""
    if _current is not None:
        _current.release()


atexit.register(release_held)


def _this_process() -> dict:
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "pid_started": me.create_time()}


def _owner_alive(owner: dict, age_s: float) -> bool:
    """Whether the process that wrote this lock still runs (see the module docstring)."""
    if owner.get("host") != socket.gethostname():
        return age_s < STALE_AFTER_S
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["pid_started"]) < 1.0
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return False


def _describe(owner: dict) -> str:
    return (f"run {owner.get('run_name')!r} on host {owner.get('host')}, pid {owner.get('pid')}, "
            f"started {owner.get('started')}")


class SaveFolderLock(Callback):
    """The lock on one save folder. acquire() takes it or raises RunLocked; release() (also at
    trainer.close(), as a Composer callback, and through release_held()) removes it once."""

    def __init__(self, folder: Path, run_name: str):
        self.path = Path(folder) / LOCK_NAME
        self.run_name = run_name
        self._held = False
        self._stop = threading.Event()

    def acquire(self) -> None:
        global _current
        release_held()  # a run this process started before is over, even if it failed unreleased
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {**_this_process(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "run_name": self.run_name}
        tmp = self.path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}")
        tmp.write_text(json.dumps(me))
        try:
            while not self._link(tmp):
                self._break_if_stale(me)  # raises RunLocked while the owner lives
        finally:
            tmp.unlink()
        self._held = True
        _current = self
        threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()

    def _link(self, tmp: Path) -> bool:
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False

    def _break_if_stale(self, me: dict) -> None:
        """Remove run.lock if its owner is gone; raise RunLocked naming the owner if it lives."""
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            owner = {}  # torn by a crash while written: no owner to wait for
        if owner and _owner_alive(owner, age):
            raise RunLocked(
                f"{self.path.parent} is in use by {_describe(owner)} ({self.path}). Two runs must not write "
                f"one save folder: wait for that run to end or stop it (kill {owner.get('pid')} on "
                f"{owner.get('host')}), or give this run another run_name or trainer.save_folder. If that "
                f"process is no training run, delete {self.path}.")
        # Rename, not unlink: of two launches breaking the same stale lock at once, only one
        # moves the file it judged; the other's rename fails or moves a fresh lock, checked below.
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{me['host']}.{me['pid']}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != text:  # a fresh lock taken since we read it: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink()
            return
        aside.unlink()
        log.warning("%s: took over the stale lock of %s, which no longer runs (heartbeat %.0f s ago)",
                    self.path, _describe(owner) if owner else "an unreadable lock file", age)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as err:
                log.warning("%s: heartbeat failed (%s); another launch may take this folder over", self.path, err)

    def release(self) -> None:
        global _current
        if self._held:
            self._held = False
            _current = None
            self._stop.set()
            self.path.unlink(missing_ok=True)

    def close(self, state: State, logger: Logger) -> None:
        self.release()


def lock_save_folder(folder: str | Path, run_name: str) -> SaveFolderLock:
    """Rank 0 takes the lock on `folder`; every rank raises RunLocked if it was refused. Returns the
    lock (held on rank 0 only); pass it to the Trainer as a callback so trainer.close() releases it."""
    lock = SaveFolderLock(Path(folder), run_name)
    refusal = [None]
    if dist.get_global_rank() == 0:
        try:
            lock.acquire()
        except RunLocked as err:
            refusal[0] = str(err)
    dist.broadcast_object_list(refusal, src=0)  # the other ranks wait here for rank 0's outcome
    if refusal[0] is not None:
        raise RunLocked(refusal[0])
    return lock
