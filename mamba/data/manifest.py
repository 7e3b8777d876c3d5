"""The packed dataset's manifest (index.json) and the state of an output directory between runs
of the pack tool (resume journal, leftovers).

index.json, written last (its presence means every shard is in place):

    layout_version   mamba.layout.LAYOUT_VERSION the shards were written with
    tokenizer        {kind, name, sha256, vocab_size[, path]}: sha256 of the tokenizer.json bytes
    eos_id           the EOS id (kept for older readers; also in special_tokens)
    special_tokens   {eos, bos, pad, fim_prefix, fim_middle, fim_suffix}: ids of those present
    bos, eos         whether each document starts with BOS / ends with EOS
    split            "train" / "val" when packed with a validation fraction, else absent
    total_tokens, total_documents
    shards           [{file, tokens, documents (starting in it), max_token_id, sha256}]
    sources          [{path, bytes, documents, tokens}] per input with documents in this dataset
    skipped          [{path, reason}] per input or record left out by --on-bad-input skip
    unmatched_files  files in input directories that matched no include pattern
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from mamba import layout
from mamba.files import write_json_atomic

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_NAME = "shard_{:05d}.npy"
PROGRESS_NAME = ".pack_progress.json"  # the resume journal; removed when packing completes
SPLITS = ("train", "val")  # subdirectories written with a validation fraction


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_index(out_dir: Path, shards: list[dict], tokenizer: dict, eos_id: int | None,
                sources: Iterable[dict] = (), skipped: Iterable[dict] = (), unmatched: int = 0,
                special_tokens: dict | None = None, **extra) -> dict:
    """Write index.json atomically; call it after every shard is in place. `extra` keys (bos,
    eos, split) are stored as given."""
    manifest = {
        "layout_version": layout.LAYOUT_VERSION,
        "tokenizer": tokenizer,
        "eos_id": eos_id,
        "special_tokens": dict(special_tokens) if special_tokens else {"eos": eos_id},
        **extra,
        "total_tokens": sum(s["tokens"] for s in shards),
        "total_documents": sum(s["documents"] for s in shards),
        "shards": list(shards),
        "sources": list(sources),
        "skipped": list(skipped),
        "unmatched_files": unmatched,
    }
    write_json_atomic(Path(out_dir) / INDEX_NAME, manifest)
    return manifest


def read_index(data_dir: str | os.PathLike) -> dict:
    """The manifest of a complete packed dataset; a clear error if the directory is not one."""
    path = Path(data_dir) / INDEX_NAME
    if not path.is_file():
        hint = " (it holds train/ and val/: name one of them)" if (Path(data_dir) / "train" / INDEX_NAME).exists() else ""
        raise FileNotFoundError(f"{data_dir}: not a complete packed dataset, {INDEX_NAME} is missing{hint}; "
                                f"run tools/pack.py (index.json is written last, when every shard is in place)")
    return json.loads(path.read_text(encoding="utf-8"))


def run_fingerprint(sources: list[str], options: dict) -> dict:
    """What a resumed run must share with the interrupted one: inputs (size, mtime) and options."""
    stats = []
    for s in sources:
        p = Path(s)
        st = p.stat() if p.is_file() else None
        stats.append([s, st.st_size if st else None, st.st_mtime_ns if st else None])
    return {"inputs": stats, **options}


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

    def ours(p: Path) -> bool:
        return (p.name.startswith("shard_") and p.name.endswith(".npy")) or p.name in (TOKENIZER_NAME, PROGRESS_NAME) \
            or (p.name.startswith(".") and ".tmp" in p.name)

    if out.is_dir():
        entries = list(out.iterdir())
        subdirs = [p for p in entries if p.is_dir() and p.name in SPLITS]
        foreign = [p.name for p in entries if p not in subdirs and not ours(p)]
        foreign += [f"{d.name}/{p.name}" for d in subdirs for p in d.iterdir() if not ours(p)]
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
