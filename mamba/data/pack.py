"""The packing engine: inputs -> tokenized, position-annotated int32 shards + index.json.

A packed dataset directory holds

    tokenizer.json        the tokenizer (absent for the built-in "byte" tokenizer)
    shard_00000.npy ...   1-D int32 .npy arrays of mamba.layout words, `shard_tokens` each
                          (the last one shorter); documents run on across shard boundaries
    index.json            the manifest, written last: without it the directory is incomplete

With val_fraction > 0 the output directory holds two such datasets, train/ and val/; each
document goes to val/ when a hash of (seed, source, document number in source) falls below the
fraction, so the split depends on neither worker count nor document order.

A document is [BOS] tokens [EOS] (BOS and EOS each optional) at positions 0, 1, ...; positions
saturate at layout.MAX_POSITION, so position 0 marks true document starts only. Loss bits: 1 on
every text token and the EOS, 0 on BOS and on chat tokens outside assistant messages.

Documents are read in a fixed order and grouped into chunks of ~BATCH_BYTES; chunks are
tokenized by `workers` processes and written in order, so the bytes never depend on `workers`.
After each shard, `.pack_progress.json` records the finished shards and, per output, the chunk
and word offset where the next shard starts. A re-run with the same arguments resumes there:
earlier chunks are read again (to find the chunk boundaries) but not tokenized or written.
"""
from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mamba import layout
from mamba.data import readers
from mamba.data.manifest import (INDEX_NAME, PROGRESS_NAME, SHARD_NAME, SPLITS, TOKENIZER_NAME, prepare_out_dir,
                                 run_fingerprint, sha256_file, write_index)
from mamba.data.readers import DEFAULT_INCLUDE, BadInputError, collect_inputs
from mamba.data.tokenizer import SPECIAL_CANDIDATES, load_tokenizer
from mamba.files import write_atomic, write_json_atomic

__all__ = ["pack", "ShardWriter", "write_index", "sha256_file", "INDEX_NAME", "BadInputError",
           "DEFAULT_INCLUDE", "DEFAULT_SHARD_TOKENS", "POLICIES", "collect_inputs", "encode_documents"]

DEFAULT_SHARD_TOKENS = 1 << 24  # 64 MiB of int32 per shard
# Text per chunk: large enough that a HF tokenizer keeps its threads busy, small enough that a
# chunk's token lists (~28 bytes per Python int) stay a few hundred MiB.
BATCH_BYTES = 8 << 20
POLICIES = ("fail", "skip")


def encode_documents(docs: list, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """Layout words for documents given as [(ids, trained), ...] segment lists.

    Each document becomes [BOS] ids... [EOS] at positions 0..n; returns (sum of lengths,) int32.
    """
    head, tail = int(bos_id is not None), int(eos_id is not None)
    # One segment (plain text) needs no copy; chats are joined segment by segment.
    flat = [d[0][0] if len(d) == 1 else list(itertools.chain.from_iterable(ids for ids, _ in d)) for d in docs]
    lengths = np.fromiter((len(ids) + head + tail for ids in flat), dtype=np.int64, count=len(docs))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1]) if len(docs) else 0
    tokens = np.empty(total, dtype=np.int64)
    loss = np.ones(total, dtype=bool)
    body = np.ones(total, dtype=bool)
    if head:
        tokens[starts] = bos_id
        loss[starts] = False  # BOS is never a target: nothing predicts the start of a document
        body[starts] = False
    if tail:
        tokens[ends - 1] = eos_id
        body[ends - 1] = False
    tokens[body] = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.int64, count=int(body.sum()))
    for d, start in zip(docs, starts):
        if all(trained for _, trained in d):
            continue
        at = int(start) + head  # chat: mask untrained segments; EOS follows the last segment
        for ids, trained in d:
            loss[at:at + len(ids)] = trained
            at += len(ids)
        if tail:
            loss[at] = d[-1][1]
    positions = np.arange(total) - np.repeat(starts, lengths)
    return layout.encode(tokens, positions, loss)


# --- worker side: one tokenizer per process, loaded once --------------------------------------
_TOK = None


def _init_worker(spec: str, eos: str | None) -> None:
    global _TOK
    _TOK = load_tokenizer(spec, eos=eos)


def _encode_chunk(job) -> dict:
    """job: (chunk, bos_id, eos_id), chunk = [(source, split, segments)]. Returns
    {split: (words, {source: [documents, tokens]})} for the splits present."""
    chunk, bos_id, eos_id = job
    ids = iter(_TOK.encode_batch([text for _, _, segs in chunk for text, _ in segs]))
    per_split: dict = {}
    for source, split, segs in chunk:
        doc = [(next(ids), trained) for _, trained in segs]
        docs, counts = per_split.setdefault(split, ([], {}))
        docs.append(doc)
        c = counts.setdefault(source, [0, 0])
        c[0] += 1
        c[1] += sum(len(i) for i, _ in doc) + (bos_id is not None) + (eos_id is not None)
    return {split: (encode_documents(docs, bos_id, eos_id), counts) for split, (docs, counts) in per_split.items()}


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
        write_atomic(path, lambda f: np.save(f, words, allow_pickle=False))
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


def split_of(seed: int, source: str, number: int, val_fraction: float) -> str:
    """"val" for a val_fraction share of documents, by a hash of (seed, source, document number)."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(f"{seed}\0{source}\0{number}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2.0**64 < val_fraction else "train"


def iter_chunks(sources: list[str], text_field, on_bad_input: str, skipped: list[dict], seed: int,
                val_fraction: float, chunk_bytes: int = BATCH_BYTES) -> Iterator[list]:
    """Chunks of ~chunk_bytes of documents [(source index, split, segments)], in input order.
    Bad inputs raise, or with "skip" are appended to `skipped` as {path, reason}. Empty inputs
    (no bytes, or no records) hold no document: they are always appended to `skipped`, never
    fatal, since empty files (__init__.py) are normal in code trees."""
    chunk, size = [], 0

    def bad(e: BadInputError):
        if on_bad_input == "fail" and not e.empty:
            raise e
        skipped.append({"path": e.path, "reason": e.reason})

    for i, source in enumerate(sources):
        count = bad_records = 0
        try:
            for number, doc in enumerate(readers.iter_source(source, text_field)):
                if isinstance(doc, BadInputError):
                    bad(doc)
                    bad_records += 1
                    continue
                count += 1
                chunk.append((i, split_of(seed, source, number, val_fraction), doc))
                size += sum(len(text) for text, _ in doc)
                if size >= chunk_bytes:
                    yield chunk
                    chunk, size = [], 0
            if count == 0 and bad_records == 0:
                raise BadInputError(source, "empty input (no documents in it)", empty=True)
        except BadInputError as e:
            bad(e)
    if chunk:
        yield chunk


def _tokenizer_file(tok) -> Path | None:
    return None if tok.identity["kind"] == "byte" else Path(tok.identity["path"])


def pack(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, tokenizer: str = "byte",
         shard_tokens: int = DEFAULT_SHARD_TOKENS, on_bad_input: str = "fail",
         include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = (), eos: str | None = None,
         progress: Callable | None = None, workers: int = 1, text_field: str | None = None,
         add_bos: bool = False, add_eos: bool = True, val_fraction: float = 0.0, seed: int = 0,
         chunk_bytes: int = BATCH_BYTES) -> dict:
    """Pack the inputs into out_dir (or out_dir/train and out_dir/val); return the train manifest
    (with val_fraction > 0 it carries the val manifest under "val_manifest").

    inputs, include, exclude: see readers.collect_inputs. tokenizer: a load_tokenizer spec; "bpe:N"
    is trained on the inputs, a tokenizer.json is copied next to the shards. on_bad_input: "fail"
    raises on the first bad input, "skip" leaves it out and lists it in the manifest. eos: the EOS
    token's name if not a usual one. add_bos / add_eos: put BOS / EOS around every document.
    workers: tokenizing processes (the output does not depend on it). text_field: the JSONL /
    Parquet / dataset field holding the text. val_fraction, seed: the document split.
    chunk_bytes: characters of text per tokenizing job (and so how often progress is journaled).
    """
    if on_bad_input not in POLICIES:
        raise ValueError(f"on_bad_input must be one of {POLICIES}, got {on_bad_input!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sources, unmatched = collect_inputs(inputs, include, exclude)
    out = Path(out_dir)
    splits = list(SPLITS) if val_fraction > 0 else ["train"]
    dirs = {s: out / s for s in splits} if val_fraction > 0 else {"train": out}
    # Loaded before out_dir is prepared, since a tokenizer.json may be read from there.
    tok = None if tokenizer.startswith("bpe:") else load_tokenizer(tokenizer, eos=eos)
    options = {"tokenizer": tokenizer, "tokenizer_sha256": tok and tok.identity["sha256"], "shard_tokens": shard_tokens,
               "on_bad_input": on_bad_input, "eos": eos, "text_field": text_field, "add_bos": add_bos,
               "add_eos": add_eos, "val_fraction": val_fraction, "seed": seed, "chunk_bytes": chunk_bytes}
    fingerprint = run_fingerprint(sources, options)
    state = prepare_out_dir(out, fingerprint, list(dirs.values()))
    journal = out / PROGRESS_NAME
    try:
        if tok is None:
            trained = out / TOKENIZER_NAME
            if not (state and trained.is_file() and sha256_file(trained) == state.get("trained_sha256")):
                texts = (text for chunk in iter_chunks(sources, text_field, on_bad_input, [], seed, 0)
                         for _, _, segs in chunk for text, _ in segs)
                tok = load_tokenizer(tokenizer, inputs_for_training=texts, save_dir=out, eos=eos)
                state = {"fingerprint": fingerprint, "trained_sha256": tok.identity["sha256"], "writers": {}}
                write_json_atomic(journal, state, indent=None)
            tok = load_tokenizer(str(trained), eos=eos)
            tok.identity.update(kind="bpe", name=tokenizer)
        state = state or {"fingerprint": fingerprint, "writers": {}}
        tok_file = _tokenizer_file(tok)
        for d in dirs.values():
            if tok_file is not None and tok_file != (d / TOKENIZER_NAME).resolve():
                write_atomic(d / TOKENIZER_NAME, lambda f: f.write(tok.json_bytes))
        bos_id = tok.bos_id if add_bos else None
        if add_bos and bos_id is None:
            raise ValueError(f"tokenizer {tokenizer}: --bos needs a BOS token, none found "
                             f"(looked for {', '.join(SPECIAL_CANDIDATES['bos'])})")
        eos_id = tok.eos_id if add_eos else None

        writers, cursors, counts, at_cursor = {}, {}, {}, {}
        for s in splits:
            w = state["writers"].get(s, {})
            writers[s] = ShardWriter(dirs[s], shard_tokens, progress, w.get("shards"))
            cursors[s] = tuple(w.get("cursor", (0, 0)))
            counts[s] = {int(k): v for k, v in w.get("counts", {}).items()}
            at_cursor[s] = {k: list(v) for k, v in counts[s].items()}
        first = min(c for c, _ in cursors.values())
        if state["writers"] and progress:
            progress(f"resuming {out}: {sum(len(w.shards) for w in writers.values())} shards already written")

        skipped: list[dict] = []
        chunks = (job for job in enumerate(iter_chunks(sources, text_field, on_bad_input, skipped, seed, val_fraction,
                                                             chunk_bytes))
                  if job[0] >= first)
        for index, result in _tokenize(chunks, tok, tokenizer if tok_file is None else str(tok_file), eos,
                                       bos_id, eos_id, workers):
            wrote = False
            for s, (words, chunk_counts) in result.items():
                if index < cursors[s][0]:
                    continue  # this output's shards already hold this chunk
                before = {k: list(v) for k, v in counts[s].items()}
                for k, (d, t) in chunk_counts.items():
                    c = counts[s].setdefault(k, [0, 0])
                    c[0] += d
                    c[1] += t
                skip = cursors[s][1] if index == cursors[s][0] else 0
                if writers[s].add(words[skip:]):
                    cursors[s] = (index, len(words) - writers[s].pending_tokens)
                    at_cursor[s] = before
                    wrote = True
            if wrote:
                state["writers"] = {s: {"shards": writers[s].shards, "cursor": cursors[s], "counts": at_cursor[s]}
                                    for s in splits}
                write_json_atomic(journal, state, indent=None)

        total_docs = {s: sum(d for d, _ in counts[s].values()) for s in splits}
        if not total_docs["train"]:
            raise ValueError(f"nothing to pack: all {len(sources)} inputs were skipped as bad input"
                             if skipped else f"nothing to pack into train from {len(sources)} inputs")
        if val_fraction > 0 and not total_docs["val"]:
            raise ValueError(f"val_fraction {val_fraction} put none of the {total_docs['train']} documents in val; "
                             f"raise it or pack without a split")
        manifests = {}
        for s in reversed(splits):  # train's index.json last
            shards = writers[s].close()
            # Sizes as stat-ed for the fingerprint: no second stat of every input.
            src = [{"path": sources[k], "bytes": fingerprint["inputs"][k][1], "documents": d, "tokens": t}
                   for k, (d, t) in sorted(counts[s].items())]
            extra = {"bos": add_bos, "eos": add_eos, **({"split": s} if val_fraction > 0 else {})}
            manifests[s] = write_index(dirs[s], shards, tok.identity, tok.eos_id, src, skipped, unmatched,
                                       special_tokens=tok.special_tokens, **extra)
        journal.unlink(missing_ok=True)
        if val_fraction > 0:
            return {**manifests["train"], "val_manifest": manifests["val"]}
        return manifests["train"]
    except Exception:
        # A clean failure (bad input, bad option) leaves nothing behind; a killed run keeps its
        # journal and shards so a re-run resumes.
        for d in dirs.values():
            for p in d.glob("shard_*.npy"):
                p.unlink()
            (d / TOKENIZER_NAME).unlink(missing_ok=True)
            if d != out and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        (out / TOKENIZER_NAME).unlink(missing_ok=True)
        journal.unlink(missing_ok=True)
        raise


def _tokenize(chunks: Iterator, tok, spec: str, eos: str | None, bos_id, eos_id, workers: int) -> Iterator:
    """Yield (chunk index, _encode_chunk result) in chunk order; with workers > 1 from a pool of
    processes, at most 2 * workers chunks in flight so memory stays bounded."""
    global _TOK
    if workers == 1:
        _TOK = tok
        for index, chunk in chunks:
            yield index, _encode_chunk((chunk, bos_id, eos_id))
        return
    # spawn, not fork: a forked HF tokenizer loses its thread pool (and warns).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec, eos)) as pool:
        pending: list = []
        for index, chunk in chunks:
            pending.append((index, pool.apply_async(_encode_chunk, ((chunk, bos_id, eos_id),))))
            if len(pending) >= 2 * workers:
                i, r = pending.pop(0)
                yield i, r.get()
        for i, r in pending:
            yield i, r.get()
