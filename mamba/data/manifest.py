"""The packed dataset's manifest (index.json) and the checks of its shards: the one place that
reads index.json (read_index, which also refuses another layout version) and that decides whether
a shard file is the one the manifest describes (the loader and `tools/pack.py inspect --verify`).

index.json, written last (its presence means every shard is in place):

    layout_version   mamba.layout.LAYOUT_VERSION the shards were written with
    tokenizer        {kind, name, sha256, vocab_size[, path]}: sha256 of the tokenizer.json bytes
    eos_id           the EOS id (kept for older readers; also in special_tokens)
    special_tokens   {eos, bos, pad, unk, fim_prefix, fim_middle, fim_suffix}: ids of those present
                     (unk: SentencePiece models)
    bos, eos         whether each document starts with BOS / ends with EOS
    split            "train" / "val" when packed with a validation fraction, else absent
    total_tokens, total_documents
    shards           [{file, tokens, documents (starting in it), max_token_id, sha256}]
    sources          [{path, bytes, documents, tokens}] per input with documents in this dataset
    skipped          [{path, reason}] per input or record left out by --on-bad-input skip
    unmatched_files  files in input directories that matched no include pattern

A shard is a 1-D int32 .npy array of layout words (mamba.layout); its entry's size and sha256
tell a truncated or modified file apart.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from mamba import layout
from mamba.files import write_json_atomic

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_NAME = "shard_{:05d}.npy"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


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
    """The manifest of a complete packed dataset in this code's layout version; a clear error if
    the directory is not one."""
    data_dir = Path(data_dir)
    path = data_dir / INDEX_NAME
    if not data_dir.is_dir():
        what = "is a file, not a directory" if data_dir.exists() else "no such directory"
        raise FileNotFoundError(f"{data_dir}: {what}; give a packed dataset directory (the --out of "
                                f"tools/pack.py, holding {INDEX_NAME} and the shards)")
    if not path.is_file():
        hint = " (it holds train/ and val/: name one of them)" if (data_dir / "train" / INDEX_NAME).exists() else ""
        raise FileNotFoundError(f"{path}: missing, so {data_dir} is not a complete packed dataset{hint}; "
                                f"run tools/pack.py (index.json is written last, when every shard is in place)")
    index = json.loads(path.read_text(encoding="utf-8"))
    version = index.get("layout_version")
    if version != layout.LAYOUT_VERSION:
        raise ValueError(f"{path}: layout_version {version}, but this code reads version {layout.LAYOUT_VERSION}; "
                         f"repack the data with this version's tools/pack.py")
    return index


def check_listing(data_dir: Path, index: dict) -> None:
    """Raise unless index.json lists every shard file in `data_dir` and its totals add up: an
    entry removed or a count changed by hand would otherwise train on part of the data silently."""
    listed = {s["file"] for s in index["shards"]}
    unlisted = sorted(p.name for p in data_dir.glob(SHARD_NAME.replace("{:05d}", "*")) if p.name not in listed)
    total = sum(s["tokens"] for s in index["shards"])
    if unlisted or total != index.get("total_tokens", total):
        what = (f"lists no entry for {', '.join(unlisted)}" if unlisted else
                f"says total_tokens {index['total_tokens']} but its shards' tokens add up to {total}")
        raise ValueError(f"{data_dir / INDEX_NAME}: {what}, so it was edited or belongs to another packing; "
                         f"re-run tools/pack.py on {data_dir}")


def check_shard_file(path: Path, tokens: int) -> None:
    """Raise unless `path` is a 1-D int32 .npy of exactly `tokens` words; reads only the header,
    so it is cheap enough to run on every shard whenever a dataset is opened."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in index.json is missing; re-run tools/pack.py")
    with open(path, "rb") as f:
        try:
            shape, _, dtype = _HEADER_READERS[np.lib.format.read_magic(f)](f)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: not a readable .npy shard ({e!r})") from None
        data_offset = f.tell()
    if dtype != np.int32 or shape != (tokens,):
        raise ValueError(f"{path}: holds a {dtype} array of shape {shape}, index.json says ({tokens},) int32")
    size, expected = os.path.getsize(path), data_offset + 4 * tokens
    if size != expected:
        raise ValueError(
            f"{path}: file is {size} bytes, but {tokens} tokens need {expected}; the shard is "
            f"truncated or was modified after packing, re-run tools/pack.py"
        )


def check_shard_sha256(path: Path, sha256: str) -> None:
    """Raise unless the file's bytes hash to `sha256` (index.json's); reads the whole file."""
    actual = sha256_file(path)
    if actual != sha256:
        raise ValueError(
            f"{path}: sha256 differs from index.json: the file's {actual} differs from the {sha256} "
            f"recorded when it was packed, so the shard is corrupt or was modified since; re-run tools/pack.py"
        )
