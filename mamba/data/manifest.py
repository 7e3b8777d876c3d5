"""The packed dataset's manifest (index.json) and the atomic file writing both sides rely on.

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
from pathlib import Path
from typing import Callable, Iterable

from mamba import layout

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_NAME = "shard_{:05d}.npy"
PROGRESS_NAME = ".pack_progress.json"  # the resume journal; removed when packing completes


def write_atomic(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file next to `path`, fsync, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


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
