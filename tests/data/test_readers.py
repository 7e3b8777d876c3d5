"""Every input format through the real pack engine: JSONL (plain and chat), Parquet, HF datasets
saved to disk, .gz / .zst, and the bad-input messages."""
import gzip
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data.pack import pack
from mamba.data.readers import CHAT_HEADER, collect_inputs
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
