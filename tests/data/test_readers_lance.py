"""Lance datasets as pack inputs: real datasets written at test time with lance.write_dataset from
CPython standard-library sources, several fragments each, read back through the readers and the
pack engine and compared with what was written, with the Parquet reader and with JSONL."""
import json
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data.pack import pack
from mamba.data.readers import BadInputError, collect_inputs, iter_source
from mamba.data.tokenizer import load_tokenizer

lance = pytest.importorskip("lance")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

BYTE = load_tokenizer("byte")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def texts():
    """Several hundred real documents: the non-empty stdlib modules, packages included."""
    found = [p.read_text(encoding="utf-8") for p in sorted(STDLIB.rglob("*.py"))[:700]
             if "test" not in p.parts and p.stat().st_size]
    assert len(found) >= 300
    return found[:400]


def write(path: Path, table, rows_per_file=64, rows_per_group=16):
    """A dataset of several fragments (data files) with several row groups each."""
    ds = lance.write_dataset(table, str(path), max_rows_per_file=rows_per_file, max_rows_per_group=rows_per_group)
    assert len(ds.get_fragments()) == -(-table.num_rows // rows_per_file) > 1
    return ds


def shard_words(out: Path, manifest: dict) -> np.ndarray:
    return np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])


def test_rows_come_out_identical_and_in_order(tmp_path, texts):
    write(tmp_path / "corpus.lance", pa.table({"id": list(range(len(texts))), "text": texts}))
    docs = list(iter_source(str(tmp_path / "corpus.lance")))
    assert [d for d in docs if not isinstance(d, list)] == []
    assert [text for [(text, _)] in docs] == texts
    assert all(trained for [(_, trained)] in docs)


def test_nulls_and_empty_rows_are_reported_as_parquet_reports_them(tmp_path, texts):
    """The same column, with a null and an empty string in it, through the Parquet reader (the
    reference) and the Lance reader: the same documents and the same bad rows, by row number."""
    column = texts[:150]
    column[3], column[70] = None, ""
    table = pa.table({"content": pa.array(column, pa.string())})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=40)
    write(tmp_path / "t.lance", table)

    def outcome(path):
        return [(str(d).removeprefix(f"{path}:"), None) if isinstance(d, BadInputError) else (None, d)
                for d in iter_source(str(path))]

    lance_rows, parquet_rows = outcome(tmp_path / "t.lance"), outcome(tmp_path / "t.parquet")
    assert lance_rows == parquet_rows
    assert [reason for reason, _ in lance_rows if reason] == [
        f"row {n}: column 'content' is empty or not a string; fix or remove it, or pass --on-bad-input skip"
        for n in (3, 70)]


def test_text_field_choice(tmp_path, texts):
    table = pa.table({"title": texts[:100], "body": texts[100:200], "n": list(range(100))})
    write(tmp_path / "t.lance", table)
    # Without text_field the first of text / content / body that exists is the text.
    assert [d[0][0] for d in iter_source(str(tmp_path / "t.lance"))] == texts[100:200]
    assert [d[0][0] for d in iter_source(str(tmp_path / "t.lance"), text_field="title")] == texts[:100]


@pytest.mark.parametrize("case,reason", [
    ("nocol", r"no text column \('text', 'content', 'body'\) \(columns: \['id', 'title'\]\); "
              "choose one with --text-field"),
    ("ints", "column 'text' holds int64, not strings; choose one with --text-field"),
    ("empty_dir", r"not a readable Lance dataset \(ValueError: Dataset at path .*was not found"),
    ("junk_versions", "not a readable Lance dataset"),
    ("data_file", "not a Lance dataset directory; pass the directory that holds _versions"),
])
def test_bad_lance_inputs_are_named_and_skippable(tmp_path, texts, case, reason):
    path = tmp_path / "bad.lance"
    if case == "nocol":
        write(path, pa.table({"id": list(range(100)), "title": texts[:100]}))
    elif case == "ints":
        write(path, pa.table({"text": list(range(100))}))
    elif case == "empty_dir":
        path.mkdir()
    elif case == "junk_versions":
        (path / "_versions").mkdir(parents=True)
        (path / "_versions" / "1.manifest").write_bytes(bytes(range(256)) * 4)
    else:  # one data file of a real dataset, named on its own
        write(tmp_path / "real.lance", pa.table({"text": texts[:100]}))
        path = next((tmp_path / "real.lance" / "data").iterdir())
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(path))}: {reason}"):
        list(iter_source(str(path)))
    (tmp_path / "ok.txt").write_text("ok")
    m = pack([path, tmp_path / "ok.txt"], tmp_path / "o", tokenizer="byte", on_bad_input="skip")
    assert m["skipped"][0]["path"] == str(path) and re.match(reason, m["skipped"][0]["reason"])
    assert m["total_documents"] == 1


def test_rows_stream_out_before_a_damaged_last_fragment(tmp_path, texts):
    """Rows are read a batch at a time: with the last fragment's data file damaged, every row of the
    fragments before it comes out before the damage is met, which is then a named bad input."""
    ds = write(tmp_path / "d.lance", pa.table({"text": texts[:200]}))
    last = ds.get_fragments()[-1].data_files()[0].path
    (tmp_path / "d.lance" / "data" / last).write_bytes(b"damaged" * 10)
    rows = iter_source(str(tmp_path / "d.lance"))
    assert [next(rows)[0][0] for _ in range(192)] == texts[:192]
    with pytest.raises(BadInputError, match=rf"d\.lance: not a readable Lance dataset \(\w+: "):
        list(rows)


def test_pylance_missing_names_the_package(tmp_path, monkeypatch, texts):
    write(tmp_path / "d.lance", pa.table({"text": texts[:100]}))
    monkeypatch.setitem(sys.modules, "lance", None)  # what `import lance` meets when it is not installed
    with pytest.raises(ImportError, match=r"d\.lance needs the `pylance` package: pip install pylance"):
        list(iter_source(str(tmp_path / "d.lance")))


def test_directory_holding_lance_datasets_collects_each_as_one_input(tmp_path, texts):
    """A named *.lance dataset and an unsuffixed one (found by its _versions) among text files are
    one input each; none of their own files (data/*.lance, manifests) is taken, even with "*"."""
    d = tmp_path / "mixed"
    write(d / "a.lance", pa.table({"text": texts[:100]}))
    write(d / "sub" / "plain", pa.table({"content": texts[100:200]}))
    (d / "notes.txt").write_text(texts[200])
    (d / "sub" / "mod.py").write_text(texts[201])
    for include in (None, ["*"]):
        found, unmatched = collect_inputs([d], **({"include": include} if include else {}))
        assert [Path(f).relative_to(d).as_posix() for f in found] == ["a.lance", "notes.txt", "sub/mod.py", "sub/plain"]
        assert unmatched == 0
    found, _ = collect_inputs([d], exclude=["*.lance"])
    assert [Path(f).relative_to(d).as_posix() for f in found] == ["notes.txt", "sub/mod.py", "sub/plain"]
    assert collect_inputs([d / "sub" / "plain"])[0] == [str(d / "sub" / "plain")]
    m = pack([d], tmp_path / "o", tokenizer="byte")
    assert [(Path(s["path"]).name, s["documents"]) for s in m["sources"]] == [
        ("a.lance", 100), ("notes.txt", 1), ("mod.py", 1), ("plain", 100)]


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_pack_of_lance_equals_pack_of_the_same_jsonl(tmp_path, texts, tokenizer):
    """The same texts as a Lance dataset and as a JSONL file pack to the same token stream (for a
    trained BPE too, as it is trained on the same text) and decode back to the texts."""
    write(tmp_path / "in" / "c.lance", pa.table({"text": texts}))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kw = dict(tokenizer=tokenizer, shard_tokens=50_000)
    from_lance = pack([tmp_path / "in"], tmp_path / "o1", **kw)
    from_jsonl = pack([tmp_path / "c.jsonl"], tmp_path / "o2", **kw)
    assert len(from_lance["shards"]) > 1 and from_lance["total_documents"] == len(texts)
    np.testing.assert_array_equal(shard_words(tmp_path / "o1", from_lance), shard_words(tmp_path / "o2", from_jsonl))
    assert [s["sha256"] for s in from_lance["shards"]] == [s["sha256"] for s in from_jsonl["shards"]]
    tok = load_tokenizer(str(tmp_path / "o1") if tokenizer != "byte" else "byte")
    ids, positions, _ = layout.decode(shard_words(tmp_path / "o1", from_lance))
    starts = np.flatnonzero(positions == 0)
    assert [tok.decode(doc[:-1].tolist()) for doc in np.split(ids, starts[1:])] == texts
