"""Writing files so that a reader never sees a half-written one: temp name, fsync, rename.

Used for everything the recipe writes that something else later trusts: shards' index.json and
the pack journal, trained tokenizers, the run's config.yaml, plots.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable) -> None:
    """Call write(file) on a temporary file next to `path` (opened "wb"), fsync, then rename it
    to `path`: `path` is either absent, the old file, or complete."""
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


def write_json_atomic(path: Path, obj, indent: int | None = 1) -> None:
    """indent=None for files rewritten often (the pack journal): compact output takes json's C
    encoder, indented output its pure-Python one, about 10x slower."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
