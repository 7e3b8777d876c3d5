"""A Composer logger that appends metrics as JSON lines: easy to plot, diff and test against.

mamba.runs.metrics reads the file back (read_metrics, series) without importing Composer."""
from __future__ import annotations

import json
import os
from typing import Optional

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist


class JSONLinesLogger(LoggerDestination):
    """Rank 0 writes one line per batch: {"batch": n, "<metric>": value, ...}.

    Composer logs a batch's metrics in several calls; they are collected and flushed as one line
    when the batch ends. The file is appended to, so a resumed run continues the same file (a
    resumed batch appears again, after the interruption, with the resumed run's values).
    """

    def __init__(self, path: str):
        self.path = path
        self._pending: dict[str, float] = {}
        self._file = None

    def init(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses no full line

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        if self._file is not None:
            self._pending.update({k: _plain(v) for k, v in metrics.items()})

    def batch_end(self, state: State, logger: Logger) -> None:
        self._flush(int(state.timestamp.batch))

    def eval_end(self, state: State, logger: Logger) -> None:
        self._flush(int(state.timestamp.batch))

    def _flush(self, batch: int) -> None:
        if self._file is not None and self._pending:
            self._file.write(json.dumps({"batch": batch, **self._pending}) + "\n")
            self._pending = {}

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _plain(value):
    """Tensors and numpy scalars to Python floats so that json can write them."""
    return value.item() if hasattr(value, "item") else value
