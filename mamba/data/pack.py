"""The packing engine: inputs -> tokenized, position-annotated int32 shards + index.json.

A packed dataset directory holds

    tokenizer.json        the tokenizer (absent for the built-in "byte" tokenizer)
    shard_00000.npy ...   1-D int32 .npy arrays of mamba.layout words, `shard_tokens` each
                          (the last one shorter); documents run on across shard boundaries
    index.json            the manifest (mamba.data.manifest), written last: without it the
                          directory is incomplete

With val_fraction > 0 the output directory holds two such datasets, train/ and val/; each
document goes to val/ when a hash of (seed, source, document number in source) falls below the
fraction, so the split depends on neither worker count nor document order.

A document is [BOS] tokens [EOS] (BOS and EOS each optional) at positions 0, 1, ...; positions
saturate at layout.MAX_POSITION, so position 0 marks true document starts only. Loss bits: 1 on
every text token and the EOS, 0 on BOS and on chat tokens outside assistant messages.

Documents are read in a fixed order and grouped into chunks of ~BATCH_BYTES; chunks are
tokenized by `workers` processes and written in order, so the bytes never depend on `workers`.
After each shard, `.pack_progress.json` records the finished shards and, per output, the chunk
and word offset where the next shard starts (mamba.data.shards). A re-run with the same arguments
resumes there: earlier chunks are read again (to find the chunk boundaries) but not tokenized or
written.
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
from mamba.data import parts, readers
from mamba.data.manifest import INDEX_NAME, TOKENIZER_NAME, sha256_file, write_index
from mamba.data.progress import PackMeter
from mamba.data.readers import DEFAULT_INCLUDE, BadInputError, collect_inputs
from mamba.data.shards import (DEFAULT_SHARD_TOKENS, SPLITS, Journal, SplitOutput, discard_output, disk_full,
                               missing_dirs, naming, prepare_out_dir, run_fingerprint)
from mamba.data.tokenizer import SPECIAL_CANDIDATES, load_tokenizer
from mamba.files import write_atomic

__all__ = ["pack", "ChunkEncoder", "encode_documents", "iter_chunks", "split_of", "BATCH_BYTES", "POLICIES",
           "DEFAULT_INCLUDE", "DEFAULT_SHARD_TOKENS"]

# Text per chunk: large enough that a HF tokenizer keeps its threads busy (benchmarks/data.py
# measures pack with chunks of this size), small enough that a chunk's token lists (~28 bytes per
# Python int) stay a few hundred MiB and the progress meter moves every few seconds.
BATCH_BYTES = 4 << 20
# Text per group read to train a "bpe:N" tokenizer: only how often the meter moves.
TRAINING_CHUNK_BYTES = 1 << 20
POLICIES = ("fail", "skip")


def pack(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, tokenizer: str = "byte",
         shard_tokens: int = DEFAULT_SHARD_TOKENS, on_bad_input: str = "fail",
         include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = (), eos: str | None = None,
         progress: Callable | None = None, workers: int = 1, text_field: str | None = None,
         add_bos: bool = False, add_eos: bool = True, val_fraction: float = 0.0, seed: int = 0,
         chunk_bytes: int = BATCH_BYTES, meter: PackMeter | None = None, strip_html: bool = False,
         part: tuple[int, int] | None = None) -> dict:
    """Pack the inputs into out_dir (or out_dir/train and out_dir/val); return the train manifest
    (with val_fraction > 0 it carries the val manifest under "val_manifest").

    inputs, include, exclude: see readers.collect_inputs. tokenizer: a load_tokenizer spec; "bpe:N"
    is trained on the inputs, a tokenizer.json is copied next to the shards. on_bad_input: "fail"
    raises on the first bad input, "skip" leaves it out and lists it in the manifest. eos: the EOS
    token's name if not a usual one. add_bos / add_eos: put BOS / EOS around every document.
    workers: tokenizing processes (the output does not depend on it). text_field: the JSONL /
    Parquet / dataset field holding the text. val_fraction, seed: the document split.
    chunk_bytes: characters of text per tokenizing job (and so how often progress is journaled).
    progress: called with a line for each shard written and on resuming; meter: shows how far
    the reading and tokenizing are (pass its `message` as progress, so lines and meter do not mix).
    strip_html: HTML inputs as their text without tags. part: (I, N) packs part I of N of the
    inputs into out_dir/part-I-of-N (mamba.data.parts, which merges the parts).

    A failure (an exception: bad input, bad option, ...) removes everything the run wrote, and the
    output directory and its parents if the run made them; so does an interrupt (Ctrl-C) or a full
    disk (shards.disk_full) before the journal recorded anything. An interrupted or disk-full run
    that journaled shards (or its trained tokenizer) keeps them, like a killed one, and a re-run
    with the same arguments resumes there.
    """
    _check_options(on_bad_input, val_fraction, workers)
    # The plan: inputs, output directories, and what a resumed run must share with this one.
    sources, unmatched = collect_inputs(inputs, include, exclude)
    out = Path(out_dir)
    if part is not None:
        if tokenizer.startswith("bpe:"):
            raise ValueError(f"--tokenizer {tokenizer} with --part: every part must use one tokenizer, so train it "
                             f"once (tools/pack.py --tokenizer {tokenizer} on the inputs or a sample of them) and "
                             f"give the parts its tokenizer.json")
        all_inputs = run_fingerprint(sources, {})["inputs"]
        sources, out = parts.part_sources(sources, *part), parts.part_dir(out, *part)
    dirs = {s: out / s for s in SPLITS} if val_fraction > 0 else {"train": out}
    # Loaded before out_dir is prepared, since a tokenizer.json may be read from there.
    tok = None if tokenizer.startswith("bpe:") else load_tokenizer(tokenizer, eos=eos)
    # special_tokens: a tokenizer_config.json edited between runs changes the BOS / EOS ids.
    options = {"tokenizer": tokenizer, "tokenizer_sha256": tok and tok.identity["sha256"],
               "special_tokens": tok and tok.special_tokens, "shard_tokens": shard_tokens,
               "on_bad_input": on_bad_input, "eos": eos, "text_field": text_field, "add_bos": add_bos,
               "add_eos": add_eos, "val_fraction": val_fraction, "seed": seed, "chunk_bytes": chunk_bytes,
               "strip_html": strip_html}
    fingerprint = run_fingerprint(sources, options)
    part_record = None
    if part is not None:
        # The tokenizer is named by its sha256, not by its path, which may differ between machines.
        part_record = {"index": part[0], "count": part[1], "inputs": parts.inputs_identity(all_inputs),
                       "options": parts.options_identity({k: v for k, v in options.items() if k != "tokenizer"})}
        if done := parts.finished_part(out, part_record, list(dirs)):
            return {**done["train"], "val_manifest": done["val"]} if val_fraction > 0 else done["train"]
    created = missing_dirs(out)
    journal = Journal(out, fingerprint, prepare_out_dir(out, fingerprint, list(dirs.values())))
    try:
        if tok is None:
            chunks = iter_chunks(sources, text_field, on_bad_input, [], seed, 0, TRAINING_CHUNK_BYTES, strip_html)
            tok = _trained_tokenizer(tokenizer, eos, out, journal, _texts(chunks, meter, fingerprint["inputs"]))
        _copy_tokenizer(tok, dirs.values())
        encoder = _document_encoder(tok, tokenizer, add_bos, add_eos)

        outputs = {s: SplitOutput(d, shard_tokens, progress, journal.entry(s)) for s, d in dirs.items()}
        if journal.resuming and progress:
            progress(f"resuming {out}: {sum(len(o.writer.shards) for o in outputs.values())} shards already written")
        skipped: list[dict] = []
        chunks = iter_chunks(sources, text_field, on_bad_input, skipped, seed, val_fraction, chunk_bytes, strip_html)
        if meter:
            meter.phase(f"tokenizing ({workers} worker{'s' if workers > 1 else ''})", fingerprint["inputs"], True)
        _write_shards(chunks, encoder, eos, workers, outputs, journal, meter)
        if meter:
            meter.end()

        if part is None:  # a part may hold no val (or no) documents: merge checks the whole
            check_documents(outputs["train"].documents, outputs.get("val") and outputs["val"].documents,
                            len(sources), skipped, val_fraction)
        manifests = _write_manifests(outputs, fingerprint, tok, skipped, unmatched, add_bos, add_eos, part_record)
        journal.remove()
        if val_fraction > 0:
            return {**manifests["train"], "val_manifest": manifests["val"]}
        return manifests["train"]
    except BaseException as e:
        if meter:
            meter.close()
        # A failure leaves nothing behind; an interrupt (Ctrl-C) or a full disk after the journal
        # recorded something, like a killed run, keeps the journal and shards so a re-run resumes.
        if not journal.path.is_file() or (isinstance(e, Exception) and not disk_full(e)):
            discard_output(out, list(dirs.values()), created)
        raise


def _check_options(on_bad_input: str, val_fraction: float, workers: int) -> None:
    if on_bad_input not in POLICIES:
        raise ValueError(f"on_bad_input must be one of {POLICIES}, got {on_bad_input!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def _texts(chunks: Iterator[list], meter: PackMeter | None, inputs: list[list]) -> Iterator[str]:
    """The documents' texts, to train a tokenizer on; the meter shows how much has been read."""
    if meter:
        meter.phase("training the tokenizer: reading", inputs, False)
    for chunk in chunks:
        yield from (text for _, _, segs in chunk for text, _ in segs)
        if meter:
            meter.advance(meter.locate(chunk))
    if meter:  # the rest of the training has no progress to show
        meter.end()
        meter.message("training the tokenizer: computing merges")


def _trained_tokenizer(spec: str, eos: str | None, out: Path, journal: Journal, texts: Iterator[str]):
    """The "bpe:N" tokenizer trained on `texts` and saved as out/tokenizer.json, or an interrupted
    run's, if the journal records that very file (training again would discard its shards)."""
    trained = out / TOKENIZER_NAME
    if not (trained.is_file() and sha256_file(trained) == journal.trained_sha256):
        tok = load_tokenizer(spec, inputs_for_training=texts, save_dir=out, eos=eos)
        journal.restart(tok.identity["sha256"])
    tok = load_tokenizer(str(trained), eos=eos)
    tok.identity.update(kind="bpe", name=spec)
    return tok


def _tokenizer_file(tok) -> Path | None:
    """The tokenizer.json `tok` was loaded from; None for the built-in byte tokenizer."""
    return None if tok.identity["kind"] == "byte" else Path(tok.identity["path"])


def _copy_tokenizer(tok, dirs: Iterable[Path]) -> None:
    """Put the tokenizer.json next to every output's shards (unless it was loaded from there)."""
    source = _tokenizer_file(tok)
    for d in dirs:
        if source is not None and source != (d / TOKENIZER_NAME).resolve():
            with naming(d / TOKENIZER_NAME):
                write_atomic(d / TOKENIZER_NAME, lambda f: f.write(tok.json_bytes))


def _document_encoder(tok, spec: str, add_bos: bool, add_eos: bool) -> ChunkEncoder:
    """The main process's encoder; --bos with a tokenizer that has no BOS token is refused here."""
    bos_id = tok.bos_id if add_bos else None
    if add_bos and bos_id is None:
        raise ValueError(f"tokenizer {spec}: --bos needs a BOS token, none found "
                         f"(looked for {', '.join(SPECIAL_CANDIDATES['bos'])})")
    return ChunkEncoder(tok, bos_id, tok.eos_id if add_eos else None)


def _write_shards(chunks: Iterator[list], encoder: ChunkEncoder, eos: str | None, workers: int,
                  outputs: dict[str, SplitOutput], journal: Journal, meter: PackMeter | None) -> None:
    """Tokenize the chunks from the first one an output still needs, hand each output its words,
    and journal after every chunk that completed a shard."""
    first = min(o.cursor[0] for o in outputs.values())
    positions = {}  # chunk index -> how far into the inputs it reaches, for the meter

    def needed():
        for index, chunk in enumerate(chunks):
            if meter:
                positions[index] = meter.locate(chunk)
                if index < first:
                    meter.advance(positions.pop(index), skipped=True)
            if index >= first:
                yield index, chunk

    for index, result in _tokenize(needed(), encoder, eos, workers):
        wrote = False
        for split, (words, counts) in result.items():
            if outputs[split].add(index, words, counts):
                wrote = True
        if wrote:
            journal.record(outputs)
        if meter:
            meter.advance(positions.pop(index), sum(len(words) for words, _ in result.values()))


def check_documents(train: int, val: int | None, n_sources: int, skipped: list[dict], val_fraction: float) -> None:
    """Refuse to finish a train (or, with a split, val) dataset without a single document."""
    if not train:
        raise ValueError(f"nothing to pack: all {n_sources} inputs were skipped as bad input"
                         if skipped else f"nothing to pack into train from {n_sources} inputs")
    if val_fraction > 0 and not val:
        raise ValueError(f"val_fraction {val_fraction} put none of the {train} documents in val; "
                         f"raise it or pack without a split")


def _write_manifests(outputs: dict[str, SplitOutput], fingerprint: dict, tok, skipped: list[dict], unmatched: int,
                     add_bos: bool, add_eos: bool, part_record: dict | None) -> dict[str, dict]:
    """Write each output's last shard and index.json, train's last (so a complete train/ means a
    complete run); return {split: manifest}."""
    manifests = {}
    for split in reversed(list(outputs)):
        output = outputs[split]
        shards = output.writer.close()
        # Sizes as stat-ed for the fingerprint: no second stat of every input.
        sources = [{"path": fingerprint["inputs"][k][0], "bytes": fingerprint["inputs"][k][1], "documents": d,
                    "tokens": t} for k, (d, t) in sorted(output.counts.items())]
        extra = {"bos": add_bos, "eos": add_eos, **({"split": split} if len(outputs) > 1 else {}),
                 **({"part": part_record} if part_record else {})}
        with naming(output.writer.out_dir / INDEX_NAME):
            manifests[split] = write_index(output.writer.out_dir, shards, tok.identity, tok.eos_id, sources,
                                           skipped, unmatched, special_tokens=tok.special_tokens, **extra)
    return manifests


def split_of(seed: int, source: str, number: int, val_fraction: float) -> str:
    """"val" for a val_fraction share of documents, by a hash of (seed, source, document number)."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(f"{seed}\0{source}\0{number}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "little") / 2.0**64 < val_fraction else "train"


def iter_chunks(sources: list[str], text_field, on_bad_input: str, skipped: list[dict], seed: int,
                val_fraction: float, chunk_bytes: int = BATCH_BYTES, strip_html: bool = False) -> Iterator[list]:
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
            for number, doc in enumerate(readers.iter_source(source, text_field, strip_html)):
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


class ChunkEncoder:
    """Turns a chunk of documents into layout words: a tokenizer, plus the BOS / EOS ids to put
    around each document (None: none). The main process uses the one pack() builds; each worker
    process builds its own once (_start_worker)."""

    def __init__(self, tok, bos_id: int | None, eos_id: int | None):
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

    def __call__(self, chunk: list) -> dict:
        """chunk = [(source, split, segments)] (iter_chunks) -> {split: (words, {source: [documents,
        tokens]})} for the splits present, words (tokens in the chunk's documents of that split,) int32."""
        ids = iter(self.tok.encode_batch([text for _, _, segs in chunk for text, _ in segs]))
        per_split: dict = {}
        extra = (self.bos_id is not None) + (self.eos_id is not None)
        for source, split, segs in chunk:
            doc = [(next(ids), trained) for _, trained in segs]
            docs, counts = per_split.setdefault(split, ([], {}))
            docs.append(doc)
            c = counts.setdefault(source, [0, 0])
            c[0] += 1
            c[1] += sum(len(i) for i, _ in doc) + extra
        return {split: (encode_documents(docs, self.bos_id, self.eos_id), counts)
                for split, (docs, counts) in per_split.items()}


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


def _tokenize(chunks: Iterator[tuple[int, list]], encoder: ChunkEncoder, eos: str | None,
              workers: int) -> Iterator[tuple[int, dict]]:
    """Yield (chunk index, encoder(chunk)) in chunk order; with workers > 1 from a pool of
    processes, at most 2 * workers chunks in flight so memory stays bounded. eos: the --eos name
    each worker loads the tokenizer with."""
    if workers == 1:
        for index, chunk in chunks:
            yield index, encoder(chunk)
        return
    tok_file = _tokenizer_file(encoder.tok)
    spec = "byte" if tok_file is None else str(tok_file)
    # spawn, not fork: a forked HF tokenizer loses its thread pool (and warns).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_start_worker, initargs=(spec, eos, encoder.bos_id, encoder.eos_id)) as pool:
        pending: list = []
        for index, chunk in chunks:
            pending.append((index, pool.apply_async(_encode_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                i, r = pending.pop(0)
                yield i, r.get()
        for i, r in pending:
            yield i, r.get()


# Set in pool worker processes only, by _start_worker, once per process: a worker's tasks are
# plain module-level calls, so this is where its encoder lives. The main process never sets it.
_worker_encoder: ChunkEncoder | None = None


def _start_worker(spec: str, eos: str | None, bos_id: int | None, eos_id: int | None) -> None:
    global _worker_encoder
    _worker_encoder = ChunkEncoder(load_tokenizer(spec, eos=eos), bos_id, eos_id)


def _encode_in_worker(chunk: list) -> dict:
    return _worker_encoder(chunk)
