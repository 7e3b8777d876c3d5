"""SIGTERM (Slurm preemption or time limit, `kill`): finish the batch, checkpoint, exit with code 0.

Slurm sends SIGTERM to every task of a job step, then SIGKILL after KillWait (30 s by default;
ask for more with `#SBATCH --signal=TERM@120` so a large checkpoint has time to be written). The
handler only sets a flag; at the end of each batch all ranks all-reduce it, so every rank stops
after the same batch (a rank stopping alone would leave the others waiting in a collective).
Stopping goes through Composer's State.stop_training(): max_duration becomes "now", so the
CheckpointSaver's end-of-training rule writes a checkpoint at this batch and fit() returns
normally. The next launch of the same command autoresumes from it.

`composer -n N` passes a SIGTERM it receives on to its ranks and gives them 30 s (its
CLEANUP_TIMEOUT) before SIGKILL; Slurm signals the ranks directly as well. A checkpoint that takes
longer than that must be started earlier (slurm.sh's USR1 before the time limit).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)

_received = False


def sigterm_received() -> bool:
    """True once this process got SIGTERM (e.g. to skip end-of-training work after a preemption)."""
    return _received


def _on_sigterm(signum, frame) -> None:
    global _received
    _received = True


class SigtermCheckpoint(Callback):
    """Installs the SIGTERM flag handler for the length of fit() and acts on it at batch ends."""

    def __init__(self):
        self._previous = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is threading.main_thread():  # signal() refuses other threads
            self._previous = signal.signal(signal.SIGTERM, _on_sigterm)

    def batch_end(self, state: State, logger: Logger) -> None:
        flag = state.device.tensor_to_device(torch.tensor(int(_received), dtype=torch.int32))
        dist.all_reduce(flag, reduce_operation="MAX")  # one int per batch: negligible next to the step
        if flag.item():
            log.warning("SIGTERM received: stopping after batch %d; checkpointing it for autoresume",
                        int(state.timestamp.batch))
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._restore()

    def close(self, state: State, logger: Logger) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class MissingLatestCheckpoint(Callback):
    """Refuse to start from scratch when save_folder holds complete checkpoints but no latest link.

    Composer replaces `latest-rank0.pt` by unlink + symlink after a save; a kill between the two
    system calls leaves no link, and autoresume would then silently restart at batch 0. A complete
    sharded checkpoint is a directory with torch.distributed.checkpoint's `.metadata` (written by
    rank 0 after every rank's shard); a full one is a `*-rank0.pt` file.
    """

    def __init__(self, save_folder: str, autoresume: bool):
        self.save_folder, self.autoresume = Path(save_folder), autoresume

    def fit_start(self, state: State, logger: Logger) -> None:
        if not self.autoresume or int(state.timestamp.batch) > 0 or not self.save_folder.is_dir():
            return
        if os.path.lexists(self.save_folder / "latest-rank0.pt"):
            return
        complete = [p for p in self.save_folder.glob("ep*-ba*") if (p / ".metadata").is_file() or p.suffix == ".pt"]
        if complete:
            newest = max(complete, key=lambda p: int(p.name.split("-ba")[1].split("-")[0]))
            raise RuntimeError(
                f"{self.save_folder} has checkpoints but no latest-rank0.pt link (a run was killed while "
                f"moving it), so autoresume would start from scratch. Restore the link and relaunch: "
                f"ln -s {newest.name} {self.save_folder / 'latest-rank0.pt'}")
