"""How one rank process lives and fails under `composer -n N`: it dies with its launcher, and the
first error of the run reaches the console first, naming the rank that raised it.

Dying with the launcher. Composer starts each rank with Popen and kills them only on its way out;
a launcher killed with SIGKILL (or OOM-killed) never does, and its ranks would train on into the
save folder a relaunch uses. Linux's PR_SET_PDEATHSIG makes the kernel send a signal to the rank
when its parent dies. The signal is SIGKILL, not SIGTERM: SIGTERM would start the checkpoint-at-
the-next-batch protocol (signals.py) with nobody left to collect it, while SIGKILL leaves the
folder as a kill -9 of the whole job does, resumable from its last complete checkpoint.

Errors first. Composer's launcher passes rank 0's stdout/stderr through to the console but sends
the other ranks' to temp files, printed only after it has torn every rank down. A data error on
rank 1 thus surfaces as rank 0's "Connection closed by peer" traceback, the real message buried
further down. So a failing rank writes "rank N: <error>" to a small file in a per-launch folder
(all ranks of one node share it) before it exits, and a rank that fails after it (rank 0, whose
collective broke when rank 1 left) prints that earlier error first, then its own. On a multi-node
job the ranks of one node share no temp folder with the others', so once the run holds its save
folder (storage every node sees: the checkpoints go there) the files go to its `.rank-errors/`
(`share_rank_errors`), and a node's ranks relay the other nodes' errors too. That needs the shared
file system to show a new file to the other nodes at once (Lustre, GPFS and local disks do; an
NFS client caching directory listings may show it late, and the console then shows the
connection error first, the clear one in the failing node's block).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import psutil

from mamba.files import write_atomic

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def launched_rank() -> str | None:
    """This process's global rank when a launcher started it, else None. The launcher sets RANK and
    MASTER_PORT; Composer's single-process init sets RANK (not MASTER_PORT) in a plain run too."""
    return os.environ.get("RANK") if "MASTER_PORT" in os.environ else None


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this rank when its launcher dies; exit now if it already has.

    Only for ranks a launcher started: a plain `python mamba/train.py` under nohup must outlive
    the shell that started it.
    """
    if launched_rank() is None:
        return
    if not sys.platform.startswith("linux"):
        log.debug("not Linux: ranks do not die with their launcher (no PR_SET_PDEATHSIG on %s)", sys.platform)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (%s): this rank will outlive a killed launcher",
                    os.strerror(ctypes.get_errno()))
        return
    # The signal only covers a death from now on; a launcher that died since it started this
    # process has already handed it to init (pid 1).
    if _orphaned():
        print(f"rank {launched_rank()}: its launcher died before training started; exiting", file=sys.stderr)
        os._exit(1)


def _orphaned() -> bool:
    """Whether init adopted this process, i.e. its launcher is gone, unless init is the launcher
    itself (a container whose command is `composer ...`). A subreaper (systemd --user) adopts
    orphans instead of init and is not detected: that leaves only the instants before prctl."""
    if os.getppid() != 1:
        return False
    try:
        return b"composer" not in Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return True


ERRORS_PREFIX = "mamba-rank-errors-"
SHARED_ERRORS = ".rank-errors"  # in the save folder
_shared_folder: Path | None = None


def share_rank_errors(save_folder: Path) -> None:
    """From now on record this rank's error in the run's save folder, where every node's ranks look
    (module doc). Call once the run holds the folder (run_lock.py): before, it may be another run's."""
    global _shared_folder
    _shared_folder = save_folder / SHARED_ERRORS


def _node_folder() -> Path:
    """One folder per launch on this node: the rendezvous port and the launcher's pid."""
    return Path(tempfile.gettempdir()) / f"{ERRORS_PREFIX}{os.environ['MASTER_PORT']}-{os.getppid()}"


def _sweep_finished_launches(keep: Path) -> None:
    """Remove the folders of launches whose launcher is gone (their ranks died with it)."""
    for folder in keep.parent.glob(f"{ERRORS_PREFIX}*"):
        launcher = folder.name.rsplit("-", 1)[-1]
        if folder != keep and launcher.isdigit() and not psutil.pid_exists(int(launcher)):
            shutil.rmtree(folder, ignore_errors=True)


def report_failure(err: BaseException, summary: str, found_here: bool = False) -> str | None:
    """On a launched rank: print the earlier error of another rank of this launch, if any, first
    (unless this rank `found_here` its own config or data error, which needs no other cause);
    record this rank's error for the ranks that fail after it. Returns "rank N: <summary>" for the
    caller to print (None in a single process, or for an exit that is no error: SystemExit from
    SIGTERM, Ctrl-C)."""
    rank = launched_rank()
    if rank is None:
        return None
    node = _node_folder()
    folders = [node] if _shared_folder is None else [node, _shared_folder]
    # Files of earlier launches (an earlier failure of this run, in the shared folder) are older
    # than this process.
    started = psutil.Process().create_time()
    earlier = []
    for folder in folders:
        try:
            earlier += [p for p in folder.glob("rank*") if p.name != f"rank{rank}" and p.stat().st_mtime >= started]
        except OSError:
            pass
    if earlier and not found_here:
        first = min(earlier, key=lambda p: p.stat().st_mtime_ns).read_text().strip()
        print(f"{first}\n(rank {rank} fails because of it; its own error follows)", file=sys.stderr, flush=True)
    if not isinstance(err, Exception):
        return None
    line = f"rank {rank}: {summary}"
    try:
        _sweep_finished_launches(node)
        folder = folders[-1]
        folder.mkdir(exist_ok=True)
        write_atomic(folder / f"rank{rank}", lambda f: f.write(line.encode("utf-8")))
    except OSError as write_err:  # the console still gets the line; only the relay is lost
        log.warning("could not record this rank's error in %s: %s", folder, write_err)
    return line
