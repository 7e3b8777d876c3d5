"""The packing engine: text files -> tokenized, position-annotated int32 shards + index.json.

A packed dataset directory holds

    tokenizer.json        the tokenizer (absent for the built-in "byte" tokenizer)
    shard_00000.npy ...   1-D int32 .npy arrays of mamba.layout words, `shard_tokens` each
                          (the last one shorter); documents run on across shard boundaries
    index.json            the manifest, written last: without it the directory is incomplete

One input file is one document: its tokens, then EOS, at positions 0..n (EOS included), all with
the loss bit set. Every file is written under a temporary name in the same directory and renamed
when complete, and a failed run removes what it wrote, so a crash or an error never leaves a
directory that looks like a finished dataset.
"""
from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mamba import layout
from mamba.data.tokenizer import load_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 24  # 64 MiB of int32 per shard
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_NAME = "shard_{:05d}.npy"
# Text handed to the tokenizer per call: large enough that a HF tokenizer keeps all cores busy,
# small enough that a batch's token lists (~28 bytes per Python int) stay a few hundred MiB.
BATCH_BYTES = 8 << 20
POLICIES = ("fail", "skip")
# File names taken from input directories unless include patterns are given: text and source code.
DEFAULT_INCLUDE = tuple(f"*.{ext}" for ext in (
    "txt md rst tex org adoc csv tsv json jsonl yaml yml toml ini cfg xml html htm css "
    "py pyi pyx ipynb c h cc cpp cxx hh hpp cu cuh rs go java kt scala js jsx ts tsx mjs "
    "rb php pl pm lua r jl hs ml swift m mm cs fs zig dart el clj ex exs erl sql sh bash zsh "
    "ps1 bat cmake make mk proto graphql vue svelte"
).split()) + ("Makefile", "Dockerfile", "README", "LICENSE", "CMakeLists.txt")


class BadInputError(ValueError):
    """An input file that is not UTF-8 text. `path` and `reason` are kept for the skip report."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}; fix or remove it, or pass --on-bad-input skip")
        self.path, self.reason = path, reason


def collect_inputs(inputs: Iterable[str | os.PathLike], include: Iterable[str] = DEFAULT_INCLUDE,
                   exclude: Iterable[str] = ()) -> tuple[list[Path], int]:
    """Files named in `inputs`, plus the matching files under the directories named there.

    Directories are walked recursively. include: glob patterns for the names of files found there
    (default: common text and source files; ["*"] takes every file). exclude: glob patterns for
    names of files and directories not to enter (e.g. "site-packages"). Files named explicitly are
    always taken. Returns (sorted unique paths, number of files in the walked directories that
    matched no include pattern); sorting makes the document order, and so every shard's bytes,
    depend only on the inputs.
    """
    include, exclude = list(include), list(exclude)
    files, unmatched = set(), 0
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, g) for g in exclude)]
                for name in names:
                    if any(fnmatch.fnmatch(name, g) for g in exclude):
                        continue
                    if any(fnmatch.fnmatch(name, g) for g in include):
                        files.add(Path(root) / name)
                    else:
                        unmatched += 1
        elif path.exists():
            files.add(path)
        else:
            raise FileNotFoundError(f"{path}: no such input file or directory")
    if not files:
        raise ValueError(f"no input files found in {[str(a) for a in inputs]} (include patterns: {include})")
    return sorted(files), unmatched


def read_document(path: Path) -> str:
    """The exact text of a file (no newline translation), or BadInputError if it is not UTF-8 text."""
    data = path.read_bytes()
    if b"\0" in data:
        raise BadInputError(path, "binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(path, f"not valid UTF-8 (byte offset {e.start}: {e.reason})") from None


def iter_documents(files: list[Path], on_bad_input: str, skipped: list[dict]) -> Iterator[tuple[Path, int, str]]:
    """Yield (path, size in bytes, text) per readable file; bad files raise, or with "skip" are
    recorded in `skipped` as {"path", "reason"} and left out."""
    for path in files:
        try:
            text = read_document(path)
        except BadInputError as e:
            if on_bad_input == "fail":
                raise
            skipped.append({"path": str(path), "reason": e.reason})
            continue
        yield path, path.stat().st_size, text


def encode_documents(id_lists: list[list[int]], eos_id: int) -> np.ndarray:
    """Layout words for a batch of documents: each document's ids then EOS, at positions 0..n.

    id_lists: one token-id list per document (EOS not included). Returns (sum(n_i + 1),) int32.
    """
    lengths = np.fromiter((len(ids) + 1 for ids in id_lists), dtype=np.int64, count=len(id_lists))
    ends = np.cumsum(lengths)  # one past each document's EOS
    total = int(ends[-1])
    tokens = np.full(total, eos_id, dtype=np.int64)
    not_eos = np.ones(total, dtype=bool)
    not_eos[ends - 1] = False
    tokens[not_eos] = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=total - len(id_lists))
    positions = np.arange(total) - np.repeat(ends - lengths, lengths)
    return layout.encode(tokens, positions, np.ones(total, dtype=bool))


def write_atomic(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file next to `path`, fsync, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardWriter:
    """Streams layout words into shard_00000.npy, shard_00001.npy ... of exactly `shard_tokens`
    words each (the last one shorter), and keeps their manifest entries in `.shards`."""

    def __init__(self, out_dir: Path, shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: Callable | None = None):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir, self.shard_tokens, self.progress = Path(out_dir), shard_tokens, progress
        self.shards: list[dict] = []
        self._pending: list[np.ndarray] = []  # buffered words, fewer than shard_tokens in all
        self._pending_tokens = 0

    def add(self, words: np.ndarray) -> None:
        """Append (n,) int32 layout words; writes every shard they complete."""
        self._pending.append(words)
        self._pending_tokens += len(words)
        if self._pending_tokens < self.shard_tokens:
            return
        buf = np.concatenate(self._pending)
        full = len(buf) // self.shard_tokens * self.shard_tokens
        for start in range(0, full, self.shard_tokens):
            self._write(buf[start:start + self.shard_tokens])
        self._pending = [buf[full:]]
        self._pending_tokens = len(buf) - full

    def close(self) -> list[dict]:
        """Write the remaining words as the last shard; return all shard entries."""
        if self._pending_tokens:
            self._write(np.concatenate(self._pending))
        self._pending, self._pending_tokens = [], 0
        return self.shards

    def remove_written(self) -> None:
        """Delete the shards written so far (used when packing fails part way)."""
        for shard in self.shards:
            (self.out_dir / shard["file"]).unlink(missing_ok=True)

    def _write(self, words: np.ndarray) -> None:
        name = SHARD_NAME.format(len(self.shards))
        path = self.out_dir / name
        write_atomic(path, lambda f: np.save(f, words, allow_pickle=False))
        ids, positions, _ = layout.decode(words)
        self.shards.append({
            "file": name,
            "tokens": int(len(words)),
            "documents": int((positions == 0).sum()),  # documents that start in this shard
            "max_token_id": int(ids.max()),  # lets check_vocab work without reading shards
            "sha256": sha256_file(path),
        })
        if self.progress:
            self.progress(f"wrote {name} ({len(words)} tokens)")


def write_index(out_dir: Path, shards: list[dict], tokenizer: dict, eos_id: int,
                sources: Iterable[dict] = (), skipped: Iterable[dict] = (), unmatched: int = 0) -> dict:
    """Write index.json (the manifest) atomically; call it after every shard is in place."""
    manifest = {
        "layout_version": layout.LAYOUT_VERSION,
        "tokenizer": tokenizer,
        "eos_id": eos_id,
        "total_tokens": sum(s["tokens"] for s in shards),
        "total_documents": sum(s["documents"] for s in shards),
        "shards": list(shards),
        "sources": list(sources),  # {"path", "bytes", "tokens"} per packed file, EOS counted
        "skipped": list(skipped),  # {"path", "reason"} per file left out by --on-bad-input skip
        "unmatched_files": unmatched,  # files in input directories that matched no include pattern
    }
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    write_atomic(Path(out_dir) / INDEX_NAME, lambda f: f.write(text.encode("utf-8")))
    return manifest


def _batches(docs: Iterator[tuple[Path, int, str]], max_bytes: int) -> Iterator[list[tuple[Path, int, str]]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += doc[1]
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prepare_out_dir(out: Path) -> None:
    """Make `out` an empty directory. Leftovers of an interrupted run (shards, tokenizer.json and
    temporary files, but no index.json) are removed; anything else there is refused."""
    if (out / INDEX_NAME).exists():
        raise FileExistsError(f"{out} already holds a packed dataset ({INDEX_NAME}); remove it or choose another --out")
    if out.is_dir():
        leftovers = list(out.iterdir())
        foreign = [p.name for p in leftovers if not (
            fnmatch.fnmatch(p.name, "shard_*.npy") or p.name == TOKENIZER_NAME or fnmatch.fnmatch(p.name, ".*.tmp*"))]
        if foreign:
            raise FileExistsError(f"{out}: output directory is not empty ({', '.join(sorted(foreign)[:5])} ...); "
                                  f"pack into a new or empty directory")
        for p in leftovers:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def pack(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, tokenizer: str = "byte",
         shard_tokens: int = DEFAULT_SHARD_TOKENS, on_bad_input: str = "fail",
         include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = (), eos: str | None = None,
         progress: Callable | None = None) -> dict:
    """Pack the input files into a dataset directory; return the manifest written to index.json.

    inputs, include, exclude: see collect_inputs. tokenizer: a load_tokenizer spec; "bpe:N" is
    trained on the inputs and saved in out_dir, a tokenizer.json is copied there. out_dir: new,
    empty, or left by an interrupted run. on_bad_input: "fail" raises on the first file that is
    binary or not UTF-8, "skip" leaves it out and lists it in the manifest.
    """
    if on_bad_input not in POLICIES:
        raise ValueError(f"on_bad_input must be one of {POLICIES}, got {on_bad_input!r}")
    files, unmatched = collect_inputs(inputs, include, exclude)
    out = Path(out_dir)
    # Loaded before out_dir is cleared, since a tokenizer.json may be read from there.
    tok = None if tokenizer.startswith("bpe:") else load_tokenizer(tokenizer, eos=eos)
    _prepare_out_dir(out)
    writer = ShardWriter(out, shard_tokens, progress)
    try:
        if tok is None:
            texts = (text for _, _, text in iter_documents(files, on_bad_input, []))
            tok = load_tokenizer(tokenizer, inputs_for_training=texts, save_dir=out)
        elif tok.identity["kind"] == "hf":
            write_atomic(out / TOKENIZER_NAME, lambda f: f.write(tok.json_bytes))
        sources, skipped = [], []
        for batch in _batches(iter_documents(files, on_bad_input, skipped), BATCH_BYTES):
            id_lists = tok.encode_batch([text for _, _, text in batch])
            writer.add(encode_documents(id_lists, tok.eos_id))
            sources.extend({"path": str(p), "bytes": n, "tokens": len(ids) + 1} for (p, n, _), ids in zip(batch, id_lists))
        if not sources:
            raise ValueError(f"nothing to pack: all {len(files)} input files were skipped as bad input")
        shards = writer.close()
        return write_index(out, shards, tok.identity, tok.eos_id, sources, skipped, unmatched)
    except BaseException:
        writer.remove_written()
        (out / TOKENIZER_NAME).unlink(missing_ok=True)
        raise
