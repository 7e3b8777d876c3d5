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
import signal
import threading

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
