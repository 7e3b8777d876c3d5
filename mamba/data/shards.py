"""The writing side of a pack run's output directory: shards streamed out in order, the resume
journal, and what an interrupted or failed run leaves behind.

Each output (the dataset directory, or train/ and val/ with a validation fraction) has a
SplitOutput: its ShardWriter plus a cursor, the (chunk index, word offset in that chunk) where its
next shard starts, and its per-source [documents, tokens] counts as of that cursor. After every
chunk that completes a shard, the Journal rewrites `.pack_progress.json` in the top directory:

    fingerprint      run_fingerprint(): inputs (path, size, mtime) and the options; a re-run
                     resumes only if it is equal
    trained_sha256   sha256 of the tokenizer.json trained for "bpe:N" (absent otherwise)
    writers          {split: {shards: [index.json shard entries], cursor: [chunk, offset],
                     counts: {source index: [documents, tokens]}}}

A resumed run re-reads the chunks before the earliest cursor without tokenizing them, skips the
words of each cursor's chunk already in shards, and continues the shard numbering.

A full disk (or quota) is raised as a WriteError naming the file; pack keeps the finished shards and
the journal then, so the same command resumes once space is freed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mamba import layout
from mamba.data.manifest import INDEX_NAME, SHARD_NAME, TOKENIZER_NAME, sha256_file
from mamba.files import write_atomic, write_json_atomic

DEFAULT_SHARD_TOKENS = 1 << 24  # 64 MiB of int32 per shard
PROGRESS_NAME = ".pack_progress.json"  # the resume journal; removed when packing completes
SPLITS = ("train", "val")  # subdirectories written with a validation fraction


class WriteError(OSError):
    """An OSError while writing `filename`, which the original did not name."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror} (errno {errno.errorcode.get(self.errno, self.errno)})"


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the output filesystem is out of space or quota: freeing some is enough to
    go on, so what is finished stays for a re-run to resume."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Raise an OSError without a file name (write() and fsync() on a full disk) as a WriteError
    naming `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise WriteError(e.errno, e.strerror, str(path)) from e


class ShardWriter:
    """Streams layout words into shard_00000.npy, shard_00001.npy ... of exactly `shard_tokens`
    words each (the last one shorter), and keeps their manifest entries in `.shards`.
    `shards`: entries of shards already written by an interrupted run, to continue after."""

    def __init__(self, out_dir: Path, shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: Callable | None = None,
                 shards: list[dict] | None = None):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir, self.shard_tokens, self.progress = Path(out_dir), shard_tokens, progress
        self.shards: list[dict] = list(shards or [])
        self._pending: list[np.ndarray] = []  # buffered words, fewer than shard_tokens in all
        self.pending_tokens = 0

    def add(self, words: np.ndarray) -> int:
        """Append (n,) int32 layout words; write every shard they complete; return how many."""
        self._pending.append(words)
        self.pending_tokens += len(words)
        if self.pending_tokens < self.shard_tokens:
            return 0
        buf = np.concatenate(self._pending)
        full = len(buf) // self.shard_tokens * self.shard_tokens
        for start in range(0, full, self.shard_tokens):
            self._write(buf[start:start + self.shard_tokens])
        self._pending = [buf[full:]]
        self.pending_tokens = len(buf) - full
        return full // self.shard_tokens

    def close(self) -> list[dict]:
        """Write the remaining words as the last shard; return all shard entries."""
        if self.pending_tokens:
            self._write(np.concatenate(self._pending))
        self._pending, self.pending_tokens = [], 0
        return self.shards

    def _write(self, words: np.ndarray) -> None:
        name = SHARD_NAME.format(len(self.shards))
        path = self.out_dir / name

        def write(f):
            # np.save's bytes, but written by Python's write(): np.save's tofile() reports a full
            # disk as "N requested and M written", without the errno.
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(words))
            f.write(memoryview(np.ascontiguousarray(words)))

        with naming(path):
            write_atomic(path, write)
        ids, positions, _ = layout.decode(words)
        self.shards.append({
            "file": name,
            "tokens": int(len(words)),
            "documents": int((positions == 0).sum()),  # documents that start in this shard
            "max_token_id": int(ids.max()),  # lets the loader check the vocabulary without reading shards
            "sha256": sha256_file(path),
        })
        if self.progress:
            self.progress(f"wrote {path} ({len(words)} tokens)")


class SplitOutput:
    """One output directory being written: its ShardWriter, cursor and per-source counts, restored
    from `entry` (the journal's record of it; {} to start from the beginning)."""

    def __init__(self, out_dir: Path, shard_tokens: int, progress: Callable | None, entry: dict):
        self.writer = ShardWriter(out_dir, shard_tokens, progress, entry.get("shards"))
        self.cursor = tuple(entry.get("cursor", (0, 0)))
        self.counts: dict[int, list[int]] = {int(k): v for k, v in entry.get("counts", {}).items()}
        self._counts_at_cursor = {k: list(v) for k, v in self.counts.items()}

    def add(self, index: int, words: np.ndarray, counts: dict) -> bool:
        """Take chunk `index`'s (n,) int32 words for this output and its {source: [documents,
        tokens]}; return whether a shard was written (the journal is then due)."""
        if index < self.cursor[0]:
            return False  # this output's shards already hold this chunk
        before = {k: list(v) for k, v in self.counts.items()}
        for k, (documents, tokens) in counts.items():
            c = self.counts.setdefault(k, [0, 0])
            c[0] += documents
            c[1] += tokens
        skip = self.cursor[1] if index == self.cursor[0] else 0
        if not self.writer.add(words[skip:]):
            return False
        # The next shard starts inside this chunk (its unwritten words are the writer's pending
        # tail), so a resume re-reads the chunk and counts it again: record the counts before it.
        self.cursor = (index, len(words) - self.writer.pending_tokens)
        self._counts_at_cursor = before
        return True

    @property
    def documents(self) -> int:
        return sum(documents for documents, _ in self.counts.values())

    def journal_entry(self) -> dict:
        return {"shards": self.writer.shards, "cursor": self.cursor, "counts": self._counts_at_cursor}


class Journal:
    """`.pack_progress.json` of the output directory `out` (see the module doc). `state`: the
    journal of an interrupted run with the same fingerprint (prepare_out_dir), else None."""

    def __init__(self, out: Path, fingerprint: dict, state: dict | None):
        self.path, self.fingerprint = out / PROGRESS_NAME, fingerprint
        self.state = state or {"fingerprint": fingerprint, "writers": {}}

    @property
    def trained_sha256(self) -> str | None:
        return self.state.get("trained_sha256")

    @property
    def resuming(self) -> bool:
        """Whether an interrupted run already wrote shards."""
        return bool(self.state["writers"])

    def entry(self, split: str) -> dict:
        return self.state["writers"].get(split, {})

    def restart(self, trained_sha256: str) -> None:
        """A tokenizer was just trained: no shard written before counts, record the new tokenizer."""
        self.state = {"fingerprint": self.fingerprint, "trained_sha256": trained_sha256, "writers": {}}
        self._save()

    def record(self, outputs: dict[str, SplitOutput]) -> None:
        self.state["writers"] = {split: output.journal_entry() for split, output in outputs.items()}
        self._save()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        with naming(self.path):
            write_json_atomic(self.path, self.state, indent=None)


def run_fingerprint(sources: list[str], options: dict) -> dict:
    """What a resumed run must share with the interrupted one: inputs (size, mtime) and options."""
    stats = []
    for s in sources:
        p = Path(s)
        st = p.stat() if p.is_file() else None
        stats.append([s, st.st_size if st else None, st.st_mtime_ns if st else None])
    return {"inputs": stats, **options}


def _is_ours(p: Path) -> bool:
    """Whether `p` is a file a pack run writes (shards, tokenizer.json, journal, temporary files)."""
    return (p.name.startswith("shard_") and p.name.endswith(".npy")) or p.name in (TOKENIZER_NAME, PROGRESS_NAME) \
        or (p.name.startswith(".") and ".tmp" in p.name)


def prepare_out_dir(out: Path, fingerprint: dict, split_dirs: list[Path]) -> dict | None:
    """Make `out` ready. Returns the progress journal of an interrupted run with the same
    fingerprint (to resume); otherwise removes such leftovers (shards, tokenizer.json, temporary
    files, journal; never anything else) and returns None."""
    journal = out / PROGRESS_NAME
    if journal.is_file():
        state = json.loads(journal.read_text())
        if state.get("fingerprint") == fingerprint:
            # Killed between val's and train's index.json: val's is rewritten, identical, at the end.
            for d in split_dirs:
                (d / INDEX_NAME).unlink(missing_ok=True)
            return state
    if any((d / INDEX_NAME).exists() for d in split_dirs):
        raise FileExistsError(f"{out} already holds a packed dataset ({INDEX_NAME}); remove it or choose another --out")
    if out.is_dir():
        entries = list(out.iterdir())
        subdirs = [p for p in entries if p.is_dir() and p.name in SPLITS]
        foreign = [p.name for p in entries if p not in subdirs and not _is_ours(p)]
        foreign += [f"{d.name}/{p.name}" for d in subdirs for p in d.iterdir() if not _is_ours(p)]
        if foreign:
            raise FileExistsError(f"{out}: output directory is not empty ({', '.join(sorted(foreign)[:5])} ...); "
                                  f"pack into a new or empty directory")
        for d in subdirs:
            shutil.rmtree(d)
        for p in entries:
            if p not in subdirs:
                p.unlink()
    for d in split_dirs:
        d.mkdir(parents=True, exist_ok=True)
    return None


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, outermost first: what
    prepare_out_dir will create, and discard_output remove."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.insert(0, p)
    return missing


def discard_output(out: Path, split_dirs: list[Path], created: list[Path] = ()) -> None:
    """After a failure: remove the shards, tokenizer.json files and journal written so far, split
    directories left empty, and the directories of `created` (missing_dirs before the run) left
    empty. A killed run never gets here, and pack does not call it after an interrupt or a full
    disk once the journal exists, so those keep their journal and shards for a re-run to resume."""
    for d in split_dirs:
        for p in d.glob("shard_*.npy"):
            p.unlink()
        (d / TOKENIZER_NAME).unlink(missing_ok=True)
        if d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    (out / TOKENIZER_NAME).unlink(missing_ok=True)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    for d in reversed(created):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
