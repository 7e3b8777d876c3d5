"""Training progress as one plain line per log interval, for consoles that are files.

Composer's progress bar (tqdm) redraws one line with carriage returns: on a terminal that is a live
bar, in a Slurm log or `> train.log` it leaves a `\\r`-separated smear; its console logger, the
alternative, prints one line per metric (a dozen lines per interval). So where stderr is not a
terminal (or logging.progress_bar=false) rank 0 prints this instead, every logging.log_interval
batches, the first and the last batch too:

    [train] batch 40/300 (13%)  loss 5.2345  lr 1.20e-03  grad_norm 0.812  3,412 tok/s  0:00:52 elapsed, ~0:05:38 left
    [eval]  batch 40  loss 5.3011  perplexity 200.5

Durations count this launch only: a resumed run's rate is measured from its own start.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Optional

from composer.core import State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

# Composer's metric names (mamba/training/callbacks.py lists what is logged) -> the line's labels.
TRAIN_KEYS = (("loss/train/total", "loss", "{:.4f}"), ("train/grad_norm", "grad_norm", "{:.3g}"))
EVAL_KEYS = (("metrics/eval/LanguageCrossEntropy", "loss", "{:.4f}"),
             ("metrics/eval/LanguagePerplexity", "perplexity", "{:.1f}"))


def use_progress_bar(enabled: bool) -> bool:
    """The live bar only where someone watches a terminal; lines everywhere else."""
    return enabled and sys.stderr.isatty()


class ConsoleLines(LoggerDestination):
    """Rank 0 prints one line per `interval` (a Composer time string: "10ba", "1e6tok", "0.05dur")
    and at the first and the last batch, to stderr."""

    def __init__(self, interval: str):
        self.interval = Time.from_timestring(interval)
        self._printed_interval = -1
        self._metrics: dict[str, float] = {}
        # At this launch's start: monotonic seconds, tokens trained, fraction of max_duration done.
        self._start: Optional[tuple[float, int, float]] = None

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self._metrics.update({k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()})

    def fit_start(self, state: State, logger: Logger) -> None:
        done = state.get_elapsed_duration()
        self._start = (time.monotonic(), int(state.timestamp.token), 0.0 if done is None else float(done))

    def batch_end(self, state: State, logger: Logger) -> None:
        done = state.get_elapsed_duration()
        last = done is not None and float(done) >= 1.0
        index = self._interval_index(state)
        if dist.get_global_rank() == 0 and (index != self._printed_interval or last):
            print(self.train_line(state), file=sys.stderr, flush=True)
        self._printed_interval = index
        self._metrics = {k: v for k, v in self._metrics.items() if k.startswith("metrics/eval/")}

    def _interval_index(self, state: State) -> int:
        """Which interval the run is in: a new one starts a line (the first batch is in a new one)."""
        if self.interval.unit == TimeUnit.DURATION:
            done = state.get_elapsed_duration()
            position = 0.0 if done is None else float(done)
        else:
            position = state.timestamp.get(self.interval.unit).value
        return int(position // self.interval.value) if self.interval.value > 0 else int(position)

    def eval_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            fields = _fields(self._metrics, EVAL_KEYS)
            print(f"[eval]  batch {int(state.timestamp.batch)}  {fields}", file=sys.stderr, flush=True)

    def train_line(self, state: State) -> str:
        batch = int(state.timestamp.batch)
        lr = next((v for k, v in self._metrics.items() if k.startswith("lr-")), None)  # LRMonitor's lr-<optimizer>/group0
        parts = [f"[train] batch {batch}{_of_total(state)}", _fields(self._metrics, TRAIN_KEYS[:1]),
                 "" if lr is None else f"lr {lr:.2e}", _fields(self._metrics, TRAIN_KEYS[1:])]
        if self._start is not None:
            seconds = time.monotonic() - self._start[0]
            tokens = int(state.timestamp.token) - self._start[1]
            if seconds > 0 and tokens > 0:
                parts.append(f"{tokens / seconds:,.0f} tok/s")
            parts.append(f"{_clock(seconds)} elapsed{_left(state, seconds, self._start[2])}")
        return "  ".join(p for p in parts if p)


def _fields(metrics: dict[str, float], keys) -> str:
    return "  ".join(f"{label} {fmt.format(metrics[k])}" for k, label, fmt in keys if k in metrics)


def _of_total(state: State) -> str:
    """'/300 (13%)' when max_duration is in batches; '(13%)' for other units."""
    done = state.get_elapsed_duration()
    if done is None:
        return ""
    total = f"/{state.max_duration.value}" if state.max_duration.unit == TimeUnit.BATCH else ""
    return f"{total} ({float(done):.0%})"


def _left(state: State, seconds: float, start_fraction: float) -> str:
    """', ~H:MM:SS left' at this launch's rate so far (nothing until it has progressed)."""
    done = state.get_elapsed_duration()
    progressed = 0.0 if done is None else float(done) - start_fraction
    if progressed <= 0:
        return ""
    return f", ~{_clock(seconds * (1.0 - float(done)) / progressed)} left"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
