"""What a pack run shows while it works: on a terminal one line rewritten in place, elsewhere (a
log file, a pipe) a plain line every `interval` seconds, so logs get no carriage-return fragments.

pack() starts a phase when it reads the inputs to train a "bpe:N" tokenizer and when it
tokenizes them, locates every chunk of documents it reads (how far into the inputs it reaches)
and advances the meter when the chunk's tokens are written; message() prints a line that stays
(a shard written, a resume). Drawing is throttled by time and a chunk is a few MiB of text, so
the meter costs a clock read and a pass over the chunk's document list per chunk.

Progress is in input bytes where every input's size is known (files; a compressed file counts
when finished, since its text is larger than its bytes), else in inputs finished (hf: datasets).
"""
from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from mamba.data.readers import COMPRESSED


class PackMeter:
    """Progress of a pack run on `stream` (default stderr). interval: seconds between draws
    (default 0.5 on a terminal, 10 elsewhere)."""

    def __init__(self, stream: TextIO | None = None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self._width = 0  # characters of the in-place line now on the terminal
        self.label = None

    def phase(self, label: str, inputs: list[list], tokens: bool) -> None:
        """Start a phase over `inputs` ([path, bytes or None, ...] each, as in the pack
        fingerprint); tokens: whether it produces tokens (counted and rated)."""
        self.label, self.counting = label, tokens
        sizes = [size for _, size, *_ in inputs]
        self.total = sum(sizes) if None not in sizes else None
        self._prefix = [0]  # bytes of the inputs before each one
        for size in sizes:
            self._prefix.append(self._prefix[-1] + (size or 0))
        self._sizes = sizes
        self._partial = [size is not None and not path.endswith(COMPRESSED) for path, size, *_ in inputs]
        self._source, self._chars = 0, 0
        self.done, self.tokens = (0, 0), 0
        self.start = self._base_time = time.monotonic()
        self._base_fraction, self._drawn = 0.0, float("-inf")
        self._draw(force=True)

    def locate(self, chunk: list) -> tuple[int, int]:
        """(inputs finished, input bytes read) once `chunk` ([(input index, split, segments)], in
        input order) is read."""
        last = chunk[-1][0]
        if last != self._source:
            self._source, self._chars = last, 0
        self._chars += sum(len(text) for source, _, segs in chunk if source == last for text, _ in segs)
        within = min(self._chars, self._sizes[last]) if self._partial[last] else 0
        return last, self._prefix[last] + within

    def advance(self, position: tuple[int, int], tokens: int = 0, skipped: bool = False) -> None:
        """The chunk at `position` (locate's) is done, with `tokens` tokens; skipped: it was
        already written by an interrupted run, so the rate is measured from here on."""
        self.done, self.tokens = position, self.tokens + tokens
        if skipped:
            self._base_time, self._base_fraction = time.monotonic(), self._fraction()
        self._draw()

    def end(self) -> None:
        """The phase is complete: draw its final line (and end the in-place one)."""
        self.done = (len(self._sizes), self._prefix[-1])
        self._draw(force=True, final=True)
        self.close()

    def message(self, text: str) -> None:
        """A line that stays, printed above the in-place line."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(text, file=self.stream, flush=True)
        if self.tty and self.label is not None:  # in a log the next periodic line follows anyway
            self._draw(force=True)

    def close(self) -> None:
        """End the phase, leaving the terminal on a new line (also after a failure or an interrupt)."""
        if self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
        self.label = None

    def _fraction(self) -> float:
        if self.total:
            return self.done[1] / self.total
        return self.done[0] / max(len(self._sizes), 1)

    def _draw(self, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < self.interval:
            return
        self._drawn = now
        elapsed = now - self.start
        fraction = self._fraction()
        # Short enough for an 80-column terminal: bytes where known, else inputs.
        if self.total is not None:
            parts = [f"{_short(self.done[1])}B/{_short(self.total)}B"]
        else:
            parts = [f"{self.done[0]:,}/{len(self._sizes):,} inputs"]
        if self.counting:
            rate = f" at {_short(self.tokens / max(elapsed, 1e-9))}/s" if self.tokens else ""
            parts.append(f"{_short(self.tokens)} tokens{rate}")
        speed = (fraction - self._base_fraction) / max(now - self._base_time, 1e-9)
        if final:
            parts.append(f"{elapsed:.1f} s")
        elif speed > 0:
            eta = round((1 - fraction) / speed)
            parts.append(f"ETA {eta // 60}:{eta % 60:02d}")
        line = f"{self.label} {fraction:4.0%}: " + ", ".join(parts)
        if self.tty:  # a line longer than the terminal would wrap, and "\r" return to its last row only
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns  # 0: not known
            except (OSError, ValueError):  # a stream that says it is a terminal but has no descriptor
                columns = 0
            line = line[:columns - 1] if columns else line
            self.stream.write("\r" + line.ljust(self._width))
            self.stream.flush()
            self._width = max(self._width, len(line))
        else:
            print(line, file=self.stream, flush=True)


def _short(n: float) -> str:
    """12345678 -> "12.3M": the in-place line must fit a terminal row."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}"
