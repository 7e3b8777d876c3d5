"""Every input format through the real pack engine: JSONL (plain and chat), Parquet, HF datasets
saved to disk, .gz / .zst, and the bad-input messages."""
import gzip
import json
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data.pack import pack
from mamba.data.readers import CHAT_HEADER, BadInputError, collect_inputs, iter_source
from mamba.data.tokenizer import load_tokenizer

BYTE = load_tokenizer("byte")


def stdlib_texts(n=6):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))[1:60:10][:n]]


def documents(out: Path, manifest: dict):
    """[(ids, loss)] per document, EOS dropped."""
    words = np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])
    ids, positions, loss = layout.decode(words)
    starts = np.flatnonzero(positions == 0)
    return [(i[:-1], l[:-1]) for i, l in zip(np.split(ids, starts[1:]), np.split(loss, starts[1:]))]


def texts_of(out, manifest):
    return [BYTE.decode(ids.tolist()) for ids, _ in documents(out, manifest)]


def test_jsonl_fields_and_compression(tmp_path):
    texts = stdlib_texts()
    lines = [json.dumps({"content": t, "meta": 1}) for t in texts[:3]] + [json.dumps({"body": t}) for t in texts[3:]]
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(data))
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    m = pack([tmp_path], tmp_path / "o", tokenizer="byte")
    assert texts_of(tmp_path / "o", m) == texts * 3
    assert [s["documents"] for s in m["sources"]] == [6, 6, 6]
    (tmp_path / "named.jsonl").write_text(json.dumps({"text": "no", "code": "yes"}) + "\n")
    m = pack([tmp_path / "named.jsonl"], tmp_path / "o2", tokenizer="byte", text_field="code")
    assert texts_of(tmp_path / "o2", m) == ["yes"]


def test_chat_records_train_only_assistant_tokens(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "café?"},
                {"role": "assistant", "content": "A drink ☕"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    m = pack([tmp_path / "chat.jsonl"], tmp_path / "o", tokenizer="bpe:300")
    tok = load_tokenizer(str(tmp_path / "o"))
    [(ids, loss)] = documents(tmp_path / "o", m)
    full = "".join(CHAT_HEADER.format(role=x["role"]) + x["content"] + "\n" for x in messages)
    assert tok.decode(ids.tolist()) == full
    trained = tok.decode(ids[loss].tolist())
    assert trained == "4\nA drink ☕\n"
    words = np.load(tmp_path / "o" / m["shards"][0]["file"])
    assert layout.decode(words)[2][-1]  # the EOS after a final assistant message is trained


def test_parquet_and_saved_dataset(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    texts = stdlib_texts(4)
    pq.write_table(pa.table({"id": list(range(4)), "text": texts}), tmp_path / "t.parquet")
    datasets.Dataset.from_dict({"content": texts[::-1]}).save_to_disk(str(tmp_path / "ds"))
    m = pack([tmp_path / "t.parquet", tmp_path / "ds"], tmp_path / "o", tokenizer="byte")
    # Inputs are packed in sorted order: ds/ before t.parquet.
    assert texts_of(tmp_path / "o", m) == texts[::-1] + texts
    assert [(s["path"], s["documents"]) for s in m["sources"]] == [(str(tmp_path / "ds"), 4), (str(tmp_path / "t.parquet"), 4)]
    with pytest.raises(ValueError, match=r"t\.parquet: no text column.*\['id', 'text'\].*--text-field"):
        pack([tmp_path / "t.parquet"], tmp_path / "o2", tokenizer="byte", text_field="missing")


def test_hf_name_spec_reaches_load_dataset_with_its_split(tmp_path, monkeypatch):
    """`hf:ORG/NAME:SPLIT` is datasets.load_dataset(ORG/NAME, split=SPLIT). Offline, load_dataset
    resolves a name that is a local directory of data files before asking the hub; a directory
    named like a hub repository, with train and test files, stands in for it."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # its cache, not the user's
    monkeypatch.chdir(tmp_path)
    texts = stdlib_texts(5)
    repo = tmp_path / "org" / "corpus"
    repo.mkdir(parents=True)
    for split, rows in (("train", texts[:3]), ("test", texts[3:])):
        (repo / f"{split}.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in rows))
    m = pack(["hf:org/corpus:test"], tmp_path / "o", tokenizer="byte")
    assert texts_of(tmp_path / "o", m) == texts[3:]
    assert [(s["path"], s["documents"]) for s in m["sources"]] == [("hf:org/corpus:test", 2)]
    m = pack(["hf:org/corpus"], tmp_path / "o2", tokenizer="byte")  # split defaults to train
    assert texts_of(tmp_path / "o2", m) == texts[:3]


def test_directory_inputs_keep_dataset_dirs_whole(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "d" / "ds"))
    (tmp_path / "d" / "x.md.gz").write_bytes(gzip.compress(b"# hi\n"))
    found, unmatched = collect_inputs([tmp_path / "d", tmp_path / "d" / "ds"])
    assert str(tmp_path / "d" / "x.md.gz") in found and str(tmp_path / "d" / "ds") in found


def test_bad_records_are_named_with_line(tmp_path):
    good = json.dumps({"text": "fine"})
    (tmp_path / "r.jsonl").write_text("\n".join([good, "{broken", json.dumps({"title": "x"}), json.dumps({"text": ""}),
                                                 json.dumps({"messages": [{"role": "user"}]}), good]) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: invalid JSON.*--on-bad-input skip"):
        pack([tmp_path / "r.jsonl"], tmp_path / "o", tokenizer="byte")
    m = pack([tmp_path / "r.jsonl"], tmp_path / "o", tokenizer="byte", on_bad_input="skip")
    assert texts_of(tmp_path / "o", m) == ["fine", "fine"]
    assert [s["path"] for s in m["skipped"]] == [f"{tmp_path / 'r.jsonl'}:{n}" for n in (2, 3, 4, 5)]
    assert "no text field" in m["skipped"][1]["reason"] and "empty" in m["skipped"][2]["reason"]


def test_empty_inputs_are_reported_not_fatal(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n")
    (tmp_path / "ok.txt").write_text("ok")
    m = pack([tmp_path], tmp_path / "o", tokenizer="byte")
    assert [(s["path"], s["reason"]) for s in m["skipped"]] == [
        (str(tmp_path / "blank.jsonl"), "empty input (no documents in it)"), (str(tmp_path / "empty.txt"), "empty input")]
    with pytest.raises(ValueError, match="nothing to pack: all 1 inputs were skipped"):
        pack([tmp_path / "empty.txt"], tmp_path / "o2", tokenizer="byte")


@pytest.mark.parametrize("name,content,reason", [
    ("bad.txt.gz", b"not gzip at all", "cannot be read"),
    ("bin.jsonl", b'{"text": "a"}\n\x00\x01', "binary"),
])
def test_bad_whole_inputs(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: {reason}.*--on-bad-input skip"):
        pack([tmp_path / name], tmp_path / "o", tokenizer="byte")
    (tmp_path / "ok.txt").write_text("ok")
    m = pack([tmp_path / name, tmp_path / "ok.txt"], tmp_path / "o", tokenizer="byte", on_bad_input="skip")
    assert m["skipped"][0]["path"] == str(tmp_path / name) and reason in m["skipped"][0]["reason"]


REPO = Path(__file__).resolve().parents[2]


def test_config_and_markup_files_are_one_text_document_each(tmp_path):
    """The default extensions take config and markup files as written: the repository's own
    config.yaml and setup.cfg, and a TOML, XML, HTML and JSON file; a .json file is one document
    (not records) even when it has a "text" key."""
    import pydoc
    import tomllib

    d = tmp_path / "conf"
    d.mkdir()
    for name in ("config.yaml", "setup.cfg"):
        (d / name).write_bytes((REPO / name).read_bytes())
    (d / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0.1"\n\n[tool.ruff]\nline-length = 120\n')
    assert tomllib.loads((d / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"] == 120
    (d / "pom.xml").write_text('<?xml version="1.0"?>\n<project><artifactId>demo</artifactId></project>\n')
    (d / "json.html").write_text(pydoc.html.page("json", pydoc.html.document(json)))
    (d / "settings.json").write_text(json.dumps({"text": "not a record", "tabs": 4}, indent=2))
    found, unmatched = collect_inputs([d])
    assert [Path(f).name for f in found] == sorted(p.name for p in d.iterdir()) and unmatched == 0
    m = pack([d], tmp_path / "o", tokenizer="byte")
    assert texts_of(tmp_path / "o", m) == [Path(f).read_text() for f in found]


def test_strip_html_keeps_the_text_of_a_real_page(tmp_path):
    """pydoc's page for the json module: its docstring survives, tags, scripts and styles do not,
    and entities are decoded."""
    import pydoc

    page = pydoc.html.page("json", pydoc.html.document(json))
    page = page.replace("</head>", "<style>body { color: red }</style><script>var x = 1 < 2;</script></head>")
    (tmp_path / "json.html").write_text(page)
    [[(raw, _)]] = list(iter_source(str(tmp_path / "json.html")))
    assert raw == page  # without the option the markup is the document
    [[(text, trained)]] = list(iter_source(str(tmp_path / "json.html"), strip_html=True))
    # The docstring comes back line for line: entities (&lt; &gt; &#x27; &nbsp;) decoded, <br> a
    # line break, pydoc's &nbsp; indentation kept; runs of blank lines made one.
    doc = "\n".join(line.rstrip() for line in json.__doc__.strip().splitlines())
    assert trained and re.sub(r"\n{3,}", "\n\n", doc) in text
    assert not re.search(r"</?(a|td|br|table|font|script|style)\b", text)
    assert "color: red" not in text and "var x" not in text
    (tmp_path / "empty.htm").write_text("<html><head><script>go()</script></head><body><br></body></html>")
    with pytest.raises(BadInputError, match=r"empty\.htm: no text outside the HTML tags") as e:
        list(iter_source(str(tmp_path / "empty.htm"), strip_html=True))
    assert e.value.empty  # skipped and reported, as an empty file is


def test_arrow_files_streams_and_dataset_dirs(tmp_path):
    """Arrow IPC in the three forms users have: a pyarrow file of several record batches, a
    Feather v2 file, and a directory written by pyarrow.dataset (walked like any directory). A
    directory holding a HF saved dataset among them is one input, not its .arrow and .json files."""
    pa = pytest.importorskip("pyarrow")
    feather = pytest.importorskip("pyarrow.feather")
    pads = pytest.importorskip("pyarrow.dataset")
    datasets = pytest.importorskip("datasets")
    texts = stdlib_texts(6)
    table = pa.table({"id": list(range(6)), "content": texts})
    with pa.ipc.new_file(tmp_path / "a.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=2)  # three record batches
    feather.write_feather(table.rename_columns(["id", "body"]), tmp_path / "b.feather")
    pads.write_dataset(table, tmp_path / "dir", format="arrow")
    datasets.Dataset.from_dict({"text": texts[:2]}).save_to_disk(str(tmp_path / "dir" / "saved"))
    found, _ = collect_inputs([tmp_path / "dir"])
    assert [Path(f).relative_to(tmp_path / "dir").as_posix() for f in found] == ["part-0.arrow", "saved"]
    m = pack([tmp_path / "a.arrow", tmp_path / "b.feather", tmp_path / "dir"], tmp_path / "o", tokenizer="byte")
    assert texts_of(tmp_path / "o", m) == texts * 3 + texts[:2]
    assert [s["documents"] for s in m["sources"]] == [6, 6, 6, 2]
    m = pack([tmp_path / "a.arrow"], tmp_path / "o2", tokenizer="byte", text_field="content")
    assert texts_of(tmp_path / "o2", m) == texts


def test_arrow_stream_is_read_batch_by_batch(tmp_path):
    """The stream format `datasets` writes, cut short in its third batch: the rows of the first two
    batches come out before the damage is met, which is then a named bad input."""
    pa = pytest.importorskip("pyarrow")
    texts = stdlib_texts(6)
    table = pa.table({"text": texts})
    with pa.ipc.new_stream(tmp_path / "s.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=2)
    data = (tmp_path / "s.arrow").read_bytes()
    assert [d[0][0] for d in iter_source(str(tmp_path / "s.arrow"))] == texts
    (tmp_path / "cut.arrow").write_bytes(data[: len(data) - len(texts[5]) - 100])
    rows = iter_source(str(tmp_path / "cut.arrow"))
    assert [next(rows)[0][0] for _ in range(4)] == texts[:4]
    with pytest.raises(BadInputError, match=r"cut\.arrow: not a readable Arrow IPC file"):
        next(rows)


@pytest.mark.parametrize("name,reason", [
    ("ints.arrow", "column 'text' holds int64, not strings; choose one with --text-field"),
    ("nocol.arrow", r"no text column \('text', 'content', 'body'\) \(columns: \['id'\]\)"),
    ("junk.arrow", "not a readable Arrow IPC file"),
    ("ints.parquet", "column 'text' holds int64, not strings"),
])
def test_bad_columnar_inputs_are_named_and_skippable(tmp_path, name, reason):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": [1, 2]} if name.startswith("ints") else {"id": [1, 2]})
    if name == "junk.arrow":
        (tmp_path / name).write_bytes(b"ARROW1\0\0" + bytes(range(256)) * 4)
    elif name.endswith(".parquet"):
        pq.write_table(table, tmp_path / name)
    else:
        with pa.ipc.new_file(tmp_path / name, table.schema) as w:
            w.write_table(table)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: {reason}"):
        pack([tmp_path / name], tmp_path / "o", tokenizer="byte")
    (tmp_path / "ok.txt").write_text("ok")
    m = pack([tmp_path / name, tmp_path / "ok.txt"], tmp_path / "o", tokenizer="byte", on_bad_input="skip")
    assert texts_of(tmp_path / "o", m) == ["ok"]
    assert m["skipped"][0]["path"] == str(tmp_path / name) and re.match(reason, m["skipped"][0]["reason"])


def make_pdf(pages: list[list[str]]) -> bytes:
    """A PDF whose pages draw the given lines in Helvetica; a page of no lines draws only a filled
    rectangle, as a scanned page holds only an image."""
    def escape(line):
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        shown = "".join(f"({escape(line)}) Tj T* " for line in lines)
        stream = (f"BT /F1 10 Tf 12 TL 40 800 Td {shown}ET" if lines else "0 0 1 rg 72 72 200 200 re f").encode()
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 3 0 R >> >> >>" % len(objects))
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_is_one_document_in_page_order(tmp_path):
    """Lines of the json module's docstring over three pages (one only a picture); an encrypted
    copy opens with its empty user password, one with a password does not."""
    pypdf = pytest.importorskip("pypdf")
    # Helvetica's standard encoding draws ` and ' as curly quotes: lines without them read back exactly.
    lines = [line for line in json.__doc__.splitlines() if line.strip() and not {"`", "'"} & set(line)][:9]
    pages = [lines[:4], [], lines[4:]]
    (tmp_path / "doc.pdf").write_bytes(make_pdf(pages))
    for name, password in (("open.pdf", ""), ("locked.pdf", "secret")):
        writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(tmp_path / "doc.pdf"))
        writer.encrypt(password, owner_password="owner", algorithm="RC4-128")  # RC4: no `cryptography` needed
        writer.write(tmp_path / name)
    (tmp_path / "doc.pdf.gz").write_bytes(gzip.compress((tmp_path / "doc.pdf").read_bytes()))
    inputs = [tmp_path / n for n in ("doc.pdf", "doc.pdf.gz", "open.pdf")]
    m = pack(inputs, tmp_path / "o", tokenizer="byte")
    assert texts_of(tmp_path / "o", m) == ["\n".join(lines) + "\n"] * 3
    with pytest.raises(ValueError, match=r"locked\.pdf: encrypted PDF with a password \(decrypt it first"):
        pack([tmp_path / "locked.pdf"], tmp_path / "o2", tokenizer="byte")


@pytest.mark.parametrize("name,content,reason", [
    ("scan.pdf", make_pdf([[], []]), r"no text in its 2 pages \(scanned images\? run OCR first\)"),
    ("cut.pdf", make_pdf([["a line"]])[:60], "not a readable PDF"),
])
def test_bad_pdfs_are_named_and_skippable(tmp_path, name, content, reason):
    pytest.importorskip("pypdf")
    (tmp_path / name).write_bytes(content)
    (tmp_path / "ok.txt").write_text("ok")
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: {reason}.*--on-bad-input skip"):
        pack([tmp_path / name, tmp_path / "ok.txt"], tmp_path / "o", tokenizer="byte")
    m = pack([tmp_path / name, tmp_path / "ok.txt"], tmp_path / "o", tokenizer="byte", on_bad_input="skip")
    assert texts_of(tmp_path / "o", m) == ["ok"]
    assert m["skipped"][0]["path"] == str(tmp_path / name) and re.match(reason, m["skipped"][0]["reason"])
