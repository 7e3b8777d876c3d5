"""Input readers: every supported input becomes a stream of documents for the packing engine.

A document is a list of segments (text, trained): plain text is one trained segment; a chat
record becomes header segments (not trained) and message segments (trained only for the
assistant). Supported inputs, by the name with any .gz / .zst suffix removed:

    *.jsonl, *.ndjson   one JSON object per line: the field named by text_field, else the first of
                        text / content / body, else `messages: [{role, content}]` as a chat
    *.parquet           a string column: text_field, else the first of text / content / body
    a directory with dataset_info.json or state.json: a HF `datasets` dataset saved with
                        save_to_disk; rows are read like JSONL records
    hf:NAME[:SPLIT]     a HF hub dataset by name (needs network; SPLIT defaults to train)
    anything else       one UTF-8 text file = one document

Bad inputs raise BadInputError naming the file (and line or row) and the reason; the engine
either stops or, with the skip policy, lists them in the manifest.
"""
from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

TEXT_FIELDS = ("text", "content", "body")
COMPRESSED = (".gz", ".zst")
# The built-in chat template (used for every tokenizer): each message is a header line naming the
# role, then its content and a newline. Only assistant content (and its newline) is trained.
CHAT_HEADER = "<|{role}|>\n"

Segments = list  # [(text: str, trained: bool), ...]
# Names taken from input directories unless include patterns are given: text, source code and the
# record formats above (a .gz / .zst suffix is ignored when matching).
DEFAULT_INCLUDE = tuple(f"*.{ext}" for ext in (
    "txt md rst tex org adoc csv tsv json jsonl ndjson parquet yaml yml toml ini cfg xml html htm css "
    "py pyi pyx ipynb c h cc cpp cxx hh hpp cu cuh rs go java kt scala js jsx ts tsx mjs "
    "rb php pl pm lua r jl hs ml swift m mm cs fs zig dart el clj ex exs erl sql sh bash zsh "
    "ps1 bat cmake make mk proto graphql vue svelte"
).split()) + ("Makefile", "Dockerfile", "README", "LICENSE", "CMakeLists.txt")


class BadInputError(ValueError):
    """An input that cannot be packed. `path` (file, file:line or file:row) and `reason` are kept
    for the skip report."""

    def __init__(self, path, reason: str, empty: bool = False):
        super().__init__(f"{path}: {reason}; fix or remove it, or pass --on-bad-input skip")
        self.path, self.reason, self.empty = str(path), reason, empty


def _missing(package: str, what: str):
    return ImportError(f"reading {what} needs the `{package}` package: pip install {package} "
                       f"(or pip install -e '.[formats]')")


def base_name(path: Path) -> str:
    """The file name without a .gz / .zst suffix: what decides the format."""
    name = path.name
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def collect_inputs(inputs: Iterable[str | os.PathLike], include: Iterable[str] = DEFAULT_INCLUDE,
                   exclude: Iterable[str] = ()) -> tuple[list[str], int]:
    """The inputs named in `inputs`, plus the matching files under the directories named there.

    Directories are walked recursively, except HF `datasets` directories and "hf:NAME" specs,
    which are one input each. include: glob patterns for the names (without .gz/.zst) of files
    found in directories (default: text, source and record files; ["*"] takes every file).
    exclude: glob patterns for names of files and directories not to enter. Files named
    explicitly are always taken. Returns (sorted unique inputs as strings, number of files in the
    walked directories that matched no include pattern); sorting makes the document order, and so
    every shard's bytes, depend only on the inputs.
    """
    include, exclude = list(include), list(exclude)
    found, unmatched = set(), 0
    for arg in inputs:
        path = Path(arg)
        if str(arg).startswith("hf:") or is_hf_dataset_dir(path):
            found.add(str(arg))
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, g) for g in exclude))
                for name in names:
                    if any(fnmatch.fnmatch(name, g) for g in exclude):
                        continue
                    if any(fnmatch.fnmatch(base_name(Path(name)), g) for g in include):
                        found.add(str(Path(root) / name))
                    else:
                        unmatched += 1
        elif path.exists():
            found.add(str(path))
        else:
            raise FileNotFoundError(f"{path}: no such input file or directory")
    if not found:
        raise ValueError(f"no input files found in {[str(a) for a in inputs]} (include patterns: {include})")
    return sorted(found), unmatched


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed for .gz / .zst. Unreadable or corrupt -> BadInputError."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        if path.name.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise _missing("zstandard", f"{path}") from None
            with open(path, "rb") as f:
                return zstandard.ZstdDecompressor().stream_reader(f).read()
        return path.read_bytes()
    except ImportError:
        raise
    except Exception as e:  # OSError, gzip.BadGzipFile, zstandard.ZstdError
        raise BadInputError(path, f"cannot be read ({type(e).__name__}: {e})") from None


def decode_text(data: bytes, where) -> str:
    """Exact UTF-8 text (no newline translation); binary, invalid or empty -> BadInputError."""
    if not data:  # e.g. an empty __init__.py: no document, always skipped and reported
        raise BadInputError(where, "empty input", empty=True)
    if b"\0" in data:
        raise BadInputError(where, "binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(where, f"not valid UTF-8 (byte offset {e.start}: {e.reason})") from None


def chat_segments(messages, where) -> Segments:
    """Render [{role, content}] with the built-in template; only assistant content is trained."""
    if not isinstance(messages, list) or not messages:
        raise BadInputError(where, "`messages` must be a non-empty list of {role, content}")
    segments = []
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadInputError(where, f"chat message {str(m)[:80]!r} lacks a string role and content")
        segments.append((CHAT_HEADER.format(role=m["role"]), False))
        segments.append((m["content"] + "\n", m["role"] == "assistant"))
    return segments


def record_segments(record, text_field: str | None, where) -> Segments:
    """A JSON / dataset row -> segments (see the module docstring for the field rules)."""
    if not isinstance(record, dict):
        raise BadInputError(where, f"expected a JSON object, got {type(record).__name__}")
    if text_field is None and "messages" in record:
        return chat_segments(record["messages"], where)
    fields = (text_field,) if text_field else TEXT_FIELDS
    for field in fields:
        if field in record:
            text = record[field]
            if not isinstance(text, str):
                raise BadInputError(where, f"field {field!r} is {type(text).__name__}, not a string")
            if not text:
                raise BadInputError(where, f"field {field!r} is empty")
            return [(text, True)]
    raise BadInputError(where, f"no text field (looked for {', '.join(fields)} and messages; "
                               f"it has {sorted(record)[:8]}); choose one with --text-field")


def _jsonl(path: Path, text_field) -> Iterator:
    text = decode_text(read_bytes(path), path)
    for lineno, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadInputError(where, f"invalid JSON ({e.msg})")
            continue
        try:
            yield record_segments(record, text_field, where)
        except BadInputError as e:
            yield e


def _parquet(path: Path, text_field) -> Iterator:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", f"{path}") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise BadInputError(path, f"not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    column = text_field or next((f for f in TEXT_FIELDS if f in names), None)
    if column not in names:
        raise BadInputError(path, f"no text column {column or TEXT_FIELDS} (columns: {names}); choose one with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[column]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str) or not text:
                yield BadInputError(f"{path}:row {row}", f"column {column!r} is empty or not a string")
            else:
                yield [(text, True)]
            row += 1


def _hf_rows(spec: str, text_field) -> Iterator:
    try:
        import datasets
    except ImportError:
        raise _missing("datasets", spec) from None
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
    else:
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            raise BadInputError(spec, f"holds several splits {sorted(ds)}; pass one, e.g. {spec}/{sorted(ds)[0]}")
    for row, record in enumerate(ds):
        try:
            yield record_segments(record, text_field, f"{spec}:row {row}")
        except BadInputError as e:
            yield e


def iter_source(source: str, text_field: str | None = None) -> Iterator:
    """Yield each document of one input as segments, or a BadInputError for a bad record.

    Raises BadInputError when the whole input is bad (unreadable, binary, not UTF-8, empty).
    """
    path = Path(source)
    if source.startswith("hf:") or is_hf_dataset_dir(path):
        yield from _hf_rows(source, text_field)
        return
    name = base_name(path)
    if name.endswith((".jsonl", ".ndjson")):
        yield from _jsonl(path, text_field)
    elif name.endswith(".parquet"):
        yield from _parquet(path, text_field)
    else:
        yield [(decode_text(read_bytes(path), path), True)]
