"""Writing files so that a reader never sees a half-written one: temp name, fsync, rename.

Used for everything the recipe writes that something else later trusts: shards' index.json and
the pack journal, trained tokenizers, the run's config.yaml, plots; temp_dir_beside for the HF
export, a directory renamed into place. Temporary files and directories are made with open() and
mkdir(), whose permissions follow the umask (tempfile's mkstemp / mkdtemp make them 0600 / 0700,
which on a shared cluster would keep teammates from reading an export or a packed dataset).
"""
from __future__ import annotations

import json
import os
import shutil
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


def temp_dir_beside(path: Path) -> Path:
    """A new, empty directory next to `path`, to fill and then os.replace onto `path`. Its name
    holds this process's id, so a leftover of the same name is a dead process's and is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp
