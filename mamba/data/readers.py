"""Input readers: every supported input becomes a stream of documents for the packing engine.

A document is a list of segments (text, trained): plain text is one trained segment; a chat
record becomes header segments (not trained) and message segments (trained only for the
assistant). Supported inputs, by the name with any .gz / .zst suffix removed:

    *.jsonl, *.ndjson   one JSON object per line: the field named by text_field, else the first of
                        text / content / body, else `messages: [{role, content}]` as a chat
    *.parquet           a string column: text_field, else the first of text / content / body
    *.arrow, *.feather  an Arrow IPC file (file or stream format, as pyarrow and `datasets` write
                        them): one document per row of a string column, chosen as for Parquet
    *.pdf               one document: the text of its pages in order (needs `pypdf`)
    a directory with dataset_info.json or state.json: a HF `datasets` dataset saved with
                        save_to_disk; rows are read like JSONL records
    a Lance dataset     a directory named *.lance or holding _versions (needs `pylance`): one
                        document per row of a string column, chosen as for Parquet
    hf:NAME[:SPLIT]     a HF hub dataset by name (needs network; SPLIT defaults to train)
    anything else       one UTF-8 text file = one document: text, source code, and config or
                        markup files kept as written (a .json file is one document, not records);
                        with strip_html, *.html / *.htm / *.xhtml become their text without tags

Bad inputs raise BadInputError naming the file (and line or row) and the reason; the engine
either stops or, with the skip policy, lists them in the manifest.
"""
from __future__ import annotations

import fnmatch
import gzip
import html.parser
import io
import json
import os
import re
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
    "txt md rst tex org adoc csv tsv json jsonl ndjson parquet arrow feather yaml yml toml ini cfg conf "
    "xml html htm xhtml css "
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

    Directories are walked recursively, except HF `datasets` directories, Lance datasets and
    "hf:NAME" specs, which are one input each (whatever the include patterns). include: glob
    patterns for the names (without .gz/.zst) of files found in directories (default: text,
    source and record files; ["*"] takes every file).
    exclude: glob patterns for names of files and directories not to enter. Files named
    explicitly are always taken. Returns (sorted unique inputs as strings, number of files in the
    walked directories that matched no include pattern); sorting makes the document order, and so
    every shard's bytes, depend only on the inputs.
    """
    include, exclude = list(include), list(exclude)
    found, unmatched = set(), 0
    for arg in inputs:
        path = Path(arg)
        if str(arg).startswith("hf:") or is_hf_dataset_dir(path) or is_lance_dir(path):
            found.add(str(arg))
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, g) for g in exclude))
                # A saved HF dataset or a Lance dataset met on the walk is one input too: its files
                # (.arrow, .json; Lance's binary data/*.lance) are its rows and metadata, not documents.
                datasets = [d for d in dirs if is_hf_dataset_dir(Path(root, d)) or is_lance_dir(Path(root, d))]
                found.update(str(Path(root) / d) for d in datasets)
                dirs[:] = [d for d in dirs if d not in datasets]
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


def is_lance_dir(path: Path) -> bool:
    """A Lance dataset: a directory named *.lance, or one holding the _versions directory Lance writes."""
    return path.is_dir() and (path.name.endswith(".lance") or (path / "_versions").is_dir())


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


def _text_column(path: Path, schema, text_field) -> str:
    """The string column holding the text (Parquet, Arrow, Lance): text_field, else the first of TEXT_FIELDS."""
    import pyarrow as pa

    names = schema.names
    column = text_field or next((f for f in TEXT_FIELDS if f in names), None)
    if column not in names:
        raise BadInputError(path, f"no text column {column or TEXT_FIELDS} (columns: {names}); choose one with --text-field")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BadInputError(path, f"column {column!r} holds {kind}, not strings; choose one with --text-field")
    return column


def _column_rows(path: Path, column: str, batches) -> Iterator:
    """One document per row of `column` in the record batches (each holding that column first)."""
    row = 0
    for batch in batches:
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str) or not text:
                yield BadInputError(f"{path}:row {row}", f"column {column!r} is empty or not a string")
            else:
                yield [(text, True)]
            row += 1


def _parquet(path: Path, text_field) -> Iterator:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing("pyarrow", f"{path}") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise BadInputError(path, f"not a readable Parquet file ({e})") from None
    column = _text_column(path, pf.schema_arrow, text_field)
    yield from _column_rows(path, column, pf.iter_batches(columns=[column]))


def _arrow(path: Path, text_field) -> Iterator:
    """An Arrow IPC file, random-access (pyarrow, Feather v2) or stream format (`datasets`), read one
    record batch at a time from a memory map: large files are never read whole."""
    try:
        import pyarrow as pa
    except ImportError:
        raise _missing("pyarrow", f"{path}") from None
    try:
        source = pa.memory_map(str(path))
    except Exception as e:  # OSError: missing, unreadable
        raise BadInputError(path, f"cannot be read ({type(e).__name__}: {e})") from None
    with source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            try:
                source.seek(0)
                reader = batches = pa.ipc.open_stream(source)
            except Exception as e:
                raise BadInputError(path, f"not a readable Arrow IPC file ({e})") from None
        column = _text_column(path, reader.schema, text_field)
        try:
            yield from _column_rows(path, column, (b.select([column]) for b in batches))
        except (pa.ArrowException, OSError) as e:  # a batch cut short or damaged after a readable header
            raise BadInputError(path, f"not a readable Arrow IPC file ({e})") from None


def _lance(path: Path, text_field) -> Iterator:
    """A Lance dataset directory, its rows scanned in order a batch at a time: never read whole."""
    if not path.is_dir():  # e.g. one of its data/*.lance files named on its own
        raise BadInputError(path, "not a Lance dataset directory; pass the directory that holds _versions")
    try:
        import lance
        import pyarrow as pa
    except ImportError:
        raise _missing("pylance", f"{path}") from None

    def unreadable(e):  # Lance ends its messages with Rust source locations, of no use here
        detail = re.sub(r",? *\S+\.rs:\d+:\d+", "", str(e))
        return BadInputError(path, f"not a readable Lance dataset ({type(e).__name__}: {detail})")

    try:
        ds = lance.dataset(str(path))
    except (ValueError, OSError, RuntimeError) as e:  # no _versions, bad manifest
        raise unreadable(e) from None
    column = _text_column(path, ds.schema, text_field)
    # Fragment order is the order the rows were written; 1024 rows a batch bounds the memory held.
    batches = ds.to_batches(columns=[column], batch_size=1024, scan_in_order=True)
    try:
        yield from _column_rows(path, column, batches)
    except (pa.ArrowException, ValueError, OSError, RuntimeError) as e:  # a data file missing or damaged
        raise unreadable(e) from None


class _HTMLText(html.parser.HTMLParser):
    """The text of an HTML page as a browser lays it out: character data outside <script> and
    <style>, white space collapsed outside <pre>, a line break where a block element starts or ends
    so that paragraphs and cells do not run together."""

    BLOCKS = {"p", "div", "br", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
              "table", "ul", "ol", "dl", "dt", "dd", "blockquote", "section", "article", "header",
              "footer", "nav", "hr", "title"}
    HIDDEN = ("script", "style")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.depth = [], {"hidden": 0, "pre": 0}

    def _count(self, tag, step):
        kind = "hidden" if tag in self.HIDDEN else "pre" if tag == "pre" else None
        if kind:
            self.depth[kind] = max(0, self.depth[kind] + step)
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_starttag(self, tag, attrs):
        self._count(tag, 1)

    def handle_endtag(self, tag):
        self._count(tag, -1)

    def handle_data(self, data):
        if self.depth["hidden"]:
            return
        if not self.depth["pre"]:
            data = re.sub(r"[ \t\r\n\f]+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")
        self.parts.append(data)


def strip_html_tags(text: str) -> str:
    """The text of an HTML document without tags, entities decoded (a no-break space, layout in
    HTML, becomes a space), runs of blank lines made one."""
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).replace("\xa0", " ").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def _pdf(path: Path) -> Segments:
    """The text of every page, in page order, as one document (so the file is read whole, as a
    text file is; a .pdf.gz too)."""
    try:
        import pypdf
    except ImportError:
        raise _missing("pypdf", f"{path}") from None
    try:
        pdf = pypdf.PdfReader(io.BytesIO(read_bytes(path)))
        # Many PDFs are encrypted only to set permissions, with an empty user password: readable.
        if pdf.is_encrypted and not pdf.decrypt(""):
            raise BadInputError(path, "encrypted PDF with a password (decrypt it first: qpdf --decrypt)")
        pages = [page.extract_text() for page in pdf.pages]
    except BadInputError:
        raise
    except Exception as e:  # pypdf.errors.PdfReadError and the parser's errors on a damaged file
        raise BadInputError(path, f"not a readable PDF ({type(e).__name__}: {e})") from None
    text = "\n".join(page.strip("\n") for page in pages if page.strip())
    if not text:
        raise BadInputError(path, f"no text in its {len(pages)} pages (scanned images? run OCR first)")
    return [(text + "\n", True)]


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


def iter_source(source: str, text_field: str | None = None, strip_html: bool = False) -> Iterator:
    """Yield each document of one input as segments, or a BadInputError for a bad record.

    Raises BadInputError when the whole input is bad (unreadable, binary, not UTF-8, empty).
    strip_html: an .html / .htm / .xhtml file is its text without tags (else its markup, as written).
    """
    path = Path(source)
    if source.startswith("hf:") or is_hf_dataset_dir(path):
        yield from _hf_rows(source, text_field)
        return
    name = base_name(path)
    if is_lance_dir(path) or name.endswith(".lance"):
        yield from _lance(path, text_field)
    elif name.endswith((".jsonl", ".ndjson")):
        yield from _jsonl(path, text_field)
    elif name.endswith(".parquet"):
        yield from _parquet(path, text_field)
    elif name.endswith((".arrow", ".feather")):
        yield from _arrow(path, text_field)
    elif name.endswith(".pdf"):
        yield _pdf(path)
    else:
        text = decode_text(read_bytes(path), path)
        if strip_html and name.endswith((".html", ".htm", ".xhtml")):
            text = strip_html_tags(text)
            if not text.strip():
                raise BadInputError(path, "no text outside the HTML tags", empty=True)
        yield [(text, True)]
