"""Packing real text (CPython standard-library sources) and reading every document back exactly."""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from mamba import layout
from mamba.data import pack as pack_module
from mamba.data.dataset import PackedSource
from mamba.data.pack import pack
from mamba.data.progress import PackMeter
from mamba.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SHARD_TOKENS = 40_000  # small, so documents run across several shard boundaries


@pytest.fixture(scope="module")
def stdlib_files():
    """A deterministic sample of ~30 top-level stdlib modules (about 1 MB of text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[::6][:30]
    assert len(files) >= 20
    return files


@pytest.fixture(scope="module")
def bpe_packed(stdlib_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "packed"
    return out, pack(stdlib_files, out, tokenizer="bpe:1000", shard_tokens=SHARD_TOKENS)


def read_documents(out: Path, manifest: dict) -> list[np.ndarray]:
    """Concatenate all shards and split the token ids at every position-0 word."""
    words = np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])
    ids, positions, loss = layout.decode(words)
    assert loss.all()
    starts = np.flatnonzero(positions == 0)
    docs = np.split(ids, starts[1:])
    for doc, start in zip(docs, starts):  # positions count 0..n inside each document, saturating
        expected = np.minimum(np.arange(len(doc)), layout.MAX_POSITION)
        np.testing.assert_array_equal(positions[start:start + len(doc)], expected)
    return docs


def assert_documents_round_trip(out, manifest, files, tok):
    docs = read_documents(out, manifest)
    assert len(docs) == len(files) == manifest["total_documents"]
    for doc, path in zip(docs, files):
        assert doc[-1] == tok.eos_id and (doc[:-1] != tok.eos_id).all()
        assert tok.decode(doc[:-1].tolist()) == path.read_bytes().decode("utf-8"), path


def test_bpe_documents_decode_to_exact_input(bpe_packed, stdlib_files):
    out, manifest = bpe_packed
    tok = load_tokenizer(str(out))  # the directory holds the trained tokenizer.json
    assert tok.vocab_size == 1000
    assert len(manifest["shards"]) > 3
    assert_documents_round_trip(out, manifest, stdlib_files, tok)


def test_byte_documents_decode_to_exact_input(stdlib_files, tmp_path):
    manifest = pack(stdlib_files[:10], tmp_path / "b", tokenizer="byte", shard_tokens=SHARD_TOKENS)
    assert_documents_round_trip(tmp_path / "b", manifest, stdlib_files[:10], load_tokenizer("byte"))
    assert manifest["total_tokens"] == sum(p.stat().st_size + 1 for p in stdlib_files[:10])
    assert not (tmp_path / "b" / "tokenizer.json").exists()
    again = pack(stdlib_files[:10], tmp_path / "b2", tokenizer="byte", shard_tokens=SHARD_TOKENS)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_manifest_fields(bpe_packed, stdlib_files):
    out, manifest = bpe_packed
    assert manifest == json.loads((out / "index.json").read_text())
    assert manifest["layout_version"] == layout.LAYOUT_VERSION
    tok = manifest["tokenizer"]
    assert tok["kind"] == "bpe" and tok["vocab_size"] == 1000
    assert tok["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert manifest["eos_id"] == load_tokenizer(str(out)).eos_id
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == [f"shard_{i:05d}.npy" for i in range(len(shards))]
    assert all(s["tokens"] == SHARD_TOKENS for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= SHARD_TOKENS
    for s in shards:
        words = np.load(out / s["file"])
        assert words.dtype == np.int32 and words.shape == (s["tokens"],)
        assert s["sha256"] == hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
        ids, positions, _ = layout.decode(words)
        assert s["max_token_id"] == ids.max() and s["documents"] == (positions == 0).sum()
    assert manifest["total_tokens"] == sum(s["tokens"] for s in shards)
    assert [src["path"] for src in manifest["sources"]] == [str(p) for p in stdlib_files]
    assert all(src["documents"] == 1 for src in manifest["sources"])
    # bpe:N is trained with EOS, BOS, pad and the FIM sentinels as its first ids.
    assert manifest["special_tokens"] == {"eos": 0, "bos": 1, "pad": 2, "fim_prefix": 3, "fim_middle": 4, "fim_suffix": 5}
    assert sum(src["tokens"] for src in manifest["sources"]) == manifest["total_tokens"]
    assert manifest["skipped"] == []
    assert sorted(os.listdir(out)) == sorted(["index.json", "tokenizer.json"] + [s["file"] for s in shards])


def test_special_token_text_is_not_eos(tmp_path):
    text = "a <|endoftext|> b\r\n\tcafé 😀\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_bytes(text.encode("utf-8"))
    manifest = pack([tmp_path / "in"], tmp_path / "out", tokenizer="bpe:300")
    docs = read_documents(tmp_path / "out", manifest)
    tok = load_tokenizer(str(tmp_path / "out"))
    assert len(docs) == 1 and tok.decode(docs[0][:-1].tolist()) == text


def test_byte_tokenizer_interface():
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eos_id, tok.identity["sha256"]) == (262, 256, "byte-v1")
    assert tok.special_tokens == {"eos": 256, "bos": 257, "pad": 258, "fim_prefix": 259, "fim_middle": 260,
                                  "fim_suffix": 261}
    assert tok.encode_batch(["hé", "<|endoftext|>"]) == [[104, 195, 169], list(b"<|endoftext|>")]
    # Specials print their names; ids past the vocabulary (padding rows) print nothing.
    assert tok.decode([104, 105, 256, 195, 169, 999, 257, 259]) == "hi<|endoftext|>é<|bos|><|fim_prefix|>"


@pytest.fixture
def bad_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "good.txt").write_text("fine text\n")
    (src / "sub" / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (src / "sub" / "model.py").write_bytes(b"\x7fELF\x00\x01\x02")  # a source name, binary content
    (src / "sub" / "blob.bin").write_bytes(b"\x00\x01")  # not a text/source name: never read
    return src


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:300"])
def test_bad_input_fails_naming_file_and_leaves_nothing(bad_inputs, tmp_path, tokenizer):
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8"):
        pack([bad_inputs], out, tokenizer=tokenizer)
    assert not (tmp_path / "new").exists()  # not even the directories the run made
    out.mkdir(parents=True)  # one that was there before stays, empty
    with pytest.raises(ValueError, match=r"model\.py: binary"):
        pack([bad_inputs / "sub" / "model.py"], out, tokenizer=tokenizer)
    assert os.listdir(out) == []  # no shards, no tokenizer.json, no temp files


def test_bad_input_skip_is_reported(bad_inputs, tmp_path):
    manifest = pack([bad_inputs], tmp_path / "out", tokenizer="byte", on_bad_input="skip")
    assert manifest["total_documents"] == 1 and manifest["unmatched_files"] == 1
    assert [s["path"] for s in manifest["skipped"]] == [str(bad_inputs / "sub" / n) for n in ("latin1.txt", "model.py")]
    assert "UTF-8" in manifest["skipped"][0]["reason"] and "binary" in manifest["skipped"][1]["reason"]
    with pytest.raises(ValueError, match="all 2 inputs were skipped"):
        pack([bad_inputs / "sub"], tmp_path / "out2", tokenizer="byte", on_bad_input="skip")


def test_include_exclude_patterns(bad_inputs, tmp_path):
    every = pack([bad_inputs], tmp_path / "a", tokenizer="byte", include=["*"], on_bad_input="skip")
    assert len(every["skipped"]) == 3 and every["unmatched_files"] == 0
    only_good = pack([bad_inputs], tmp_path / "b", tokenizer="byte", exclude=["sub"])
    assert [s["path"] for s in only_good["sources"]] == [str(bad_inputs / "good.txt")]
    with pytest.raises(FileNotFoundError, match="nope"):
        pack([tmp_path / "nope"], tmp_path / "c", tokenizer="byte")


def test_output_directory_rules(bad_inputs, tmp_path):
    good = [bad_inputs / "good.txt"]
    out = tmp_path / "out"
    out.mkdir()
    # Leftovers of a killed run (no index.json) are replaced.
    for name in ("shard_00000.npy", "shard_00007.npy", ".shard_00008.npy.tmp99", "tokenizer.json"):
        (out / name).write_bytes(b"junk")
    pack(good, out, tokenizer="byte")
    assert sorted(os.listdir(out)) == ["index.json", "shard_00000.npy"]
    with pytest.raises(FileExistsError, match="already holds a packed dataset"):
        pack(good, out, tokenizer="byte")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not empty \(notes\.txt"):
        pack(good, tmp_path / "mine", tokenizer="byte")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_hf_tokenizer_is_copied(bpe_packed, bad_inputs, tmp_path):
    src_tok = bpe_packed[0] / "tokenizer.json"
    manifest = pack([bad_inputs / "good.txt"], tmp_path / "o", tokenizer=str(src_tok))
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == src_tok.read_bytes()
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["tokenizer"]["sha256"] == bpe_packed[1]["tokenizer"]["sha256"]


def _write_word_level(path: Path, size: int, specials: list[str]):
    from tokenizers import Tokenizer, models

    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.save(str(path))


def test_vocab_too_large_refused(tmp_path):
    with pytest.raises(ValueError, match=r"70000.*65536"):
        load_tokenizer("bpe:70000", inputs_for_training=["x"], save_dir=tmp_path)
    _write_word_level(tmp_path / "big.json", 70_000, ["<|endoftext|>"])
    with pytest.raises(ValueError, match=r"70000.*65536"):
        load_tokenizer(str(tmp_path / "big.json"))


def test_foreign_tokenizer_eos(tmp_path):
    _write_word_level(tmp_path / "t.json", 100, ["<unk>", "<end>"])
    with pytest.raises(ValueError, match=r"t\.json: no end-of-document token.*--eos"):
        load_tokenizer(str(tmp_path / "t.json"))
    tok = load_tokenizer(str(tmp_path / "t.json"), eos="<end>")
    assert tok.eos_id == 1 and tok.identity["kind"] == "hf" and tok.vocab_size == 100
    _write_word_level(tmp_path / "s.json", 100, ["<unk>", "</s>"])
    assert load_tokenizer(str(tmp_path / "s.json")).eos_id == 1


def test_dataset_refuses_directory_without_index(bpe_packed, tmp_path):
    out, manifest = bpe_packed
    partial = tmp_path / "partial"
    partial.mkdir()
    for s in manifest["shards"]:
        (partial / s["file"]).write_bytes((out / s["file"]).read_bytes())
    with pytest.raises(FileNotFoundError, match="not a complete packed dataset"):
        PackedSource(partial, 16)


def test_cli_runs_from_repo_root(stdlib_files, tmp_path):
    result = subprocess.run(
        [sys.executable, "tools/pack.py", "--tokenizer", "byte", "--out", str(tmp_path / "o"), "--quiet",
         *map(str, stdlib_files[:3])],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "packed 3 documents" in result.stdout and "tokens/s" in result.stdout
    bad = subprocess.run([sys.executable, "tools/pack.py", "--tokenizer", "byte", "--out", str(tmp_path / "o"),
                          str(stdlib_files[0])], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "already holds" in bad.stderr and "Traceback" not in bad.stderr


def test_meter_follows_every_chunk_to_the_totals(stdlib_files, tmp_path):
    """Unthrottled (interval 0), a plain stream gets a line per chunk of ~50 kB: the share, inputs
    and bytes done only grow, and the meter ends with every input and the run's exact token count."""
    stream = io.StringIO()
    meter = PackMeter(stream, interval=0)
    manifest = pack(stdlib_files, tmp_path / "o", tokenizer="byte", chunk_bytes=50_000, meter=meter,
                    progress=meter.message)
    lines = stream.getvalue().splitlines()
    done = [re.match(r"tokenizing \(1 worker\) +\d+%: ([\d.]+)(k?)B/", line).groups()
            for line in lines if line.startswith("tokenizing")]
    progress = [float(value) * (1000 if k else 1) for value, k in done]
    assert len(progress) > 8 and progress == sorted(progress)
    assert meter.tokens == manifest["total_tokens"] and meter.done[1] == sum(p.stat().st_size for p in stdlib_files)
    assert sum(line.startswith("wrote ") for line in lines) == len(manifest["shards"])
    assert not any(line.startswith("training") for line in lines)  # the byte tokenizer is not trained


def test_meter_counts_inputs_where_sizes_are_unknown(stdlib_files, tmp_path):
    """A HF dataset directory has no one size to count bytes against: progress is in inputs."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [p.read_text() for p in stdlib_files[:5]]}).save_to_disk(str(tmp_path / "ds"))
    stream = io.StringIO()
    pack([tmp_path / "ds", *stdlib_files[5:8]], tmp_path / "o", tokenizer="byte", meter=PackMeter(stream, interval=0))
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("tokenizing")]
    assert lines[0] == "tokenizing (1 worker)   0%: 0/4 inputs, 0 tokens"
    assert lines[-1].startswith("tokenizing (1 worker) 100%: 4/4 inputs, ")


def _shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("shard_")}


def test_workers_give_identical_bytes(stdlib_files, tmp_path):
    """Two tokenizing processes (small chunks, so both get work) write exactly what one does."""
    tok = tmp_path / "tok.json"
    load_tokenizer("bpe:600", inputs_for_training=[p.read_text() for p in stdlib_files[:5]], save_dir=tmp_path)
    (tmp_path / "tokenizer.json").rename(tok)
    one = pack(stdlib_files, tmp_path / "w1", tokenizer=str(tok), shard_tokens=SHARD_TOKENS, chunk_bytes=50_000)
    two = pack(stdlib_files, tmp_path / "w2", tokenizer=str(tok), shard_tokens=SHARD_TOKENS, chunk_bytes=50_000,
               workers=2)
    assert len(one["shards"]) > 3 and _shard_bytes(tmp_path / "w1") == _shard_bytes(tmp_path / "w2")
    assert one["shards"] == two["shards"] and one["sources"] == two["sources"]
    assert pack_module._worker_encoder is None  # only the worker processes hold a worker encoder


def test_long_documents_keep_every_boundary(tmp_path):
    """Documents of 40,000 and 16,384 tokens: positions count to 16,383 then saturate; exactly one
    position-0 word per document, and each document still decodes to its exact text."""
    texts = {"a_long.txt": "x" * 39_999, "b_edge.txt": "y" * 16_383, "c_short.txt": "z" * 10}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    files = sorted(tmp_path.glob("*.txt"))
    manifest = pack(files, tmp_path / "o", tokenizer="byte", shard_tokens=25_000)
    words = np.concatenate([np.load(tmp_path / "o" / s["file"]) for s in manifest["shards"]])
    ids, positions, _ = layout.decode(words)
    starts = np.flatnonzero(positions == 0)
    np.testing.assert_array_equal(starts, [0, 40_000, 40_000 + 16_384])
    assert manifest["total_documents"] == 3
    np.testing.assert_array_equal(positions[:40_000], np.minimum(np.arange(40_000), layout.MAX_POSITION))
    assert positions[40_000 + 16_383] == layout.MAX_POSITION  # the 16,384th token: last exact position
    docs = read_documents(tmp_path / "o", manifest)
    tok = load_tokenizer("byte")
    assert [tok.decode(d[:-1].tolist()) for d in docs] == list(texts.values())


def test_bos_eos_placement(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("c")
    files = sorted(tmp_path.glob("*.txt"))
    m = pack(files, tmp_path / "o", tokenizer="byte", add_bos=True, add_eos=False)
    ids, positions, loss = layout.decode(np.load(tmp_path / "o" / "shard_00000.npy"))
    assert ids.tolist() == [257, 97, 98, 257, 99] and positions.tolist() == [0, 1, 2, 0, 1]
    assert loss.tolist() == [False, True, True, False, True]  # BOS is never a target
    assert (m["bos"], m["eos"]) == (True, False)


def test_validation_split_by_document(stdlib_files, tmp_path):
    m = pack(stdlib_files, tmp_path / "o", tokenizer="byte", val_fraction=0.3, seed=1)
    val = m["val_manifest"]
    assert (m["split"], val["split"]) == ("train", "val")
    train_src = {s["path"] for s in m["sources"]}
    val_src = {s["path"] for s in val["sources"]}
    assert train_src | val_src == {str(p) for p in stdlib_files} and not train_src & val_src
    assert 0 < len(val_src) < len(stdlib_files)
    assert sorted(os.listdir(tmp_path / "o")) == ["train", "val"]
    assert m["total_tokens"] + val["total_tokens"] == sum(p.stat().st_size + 1 for p in stdlib_files)
    again = pack(stdlib_files, tmp_path / "o2", tokenizer="byte", val_fraction=0.3, seed=1, workers=2)
    assert again["val_manifest"]["shards"] == val["shards"]
    PackedSource(tmp_path / "o" / "val", 16)  # each side is a complete dataset for the loader
    with pytest.raises(FileNotFoundError, match=r"not a complete packed dataset \(it holds train/ and val/"):
        PackedSource(tmp_path / "o", 16)  # the loader reads index.json through manifest.read_index too


RESUME_SCRIPT = """
import sys
from mamba.data.pack import pack
pack(sys.argv[1:-1], sys.argv[-1], tokenizer="byte", shard_tokens=20_000, chunk_bytes=30_000,
     val_fraction=0.2, progress=lambda m: print(m, flush=True))
"""


def test_killed_run_resumes_to_identical_output(stdlib_files, tmp_path):
    """SIGKILL a real packing process after a few shards; the re-run resumes (rewriting no finished
    shard) and ends with exactly the bytes of an uninterrupted run."""
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, *map(str, stdlib_files), str(out)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    written = 0
    for line in proc.stdout:
        written += line.startswith("wrote")
        if written == 12:
            proc.kill()
            break
    proc.wait()
    assert written == 12, "the run finished before it could be killed"
    assert not (out / "train" / "index.json").exists()  # nothing a loader would accept
    with pytest.raises(FileNotFoundError, match="not a complete packed dataset"):
        PackedSource(out / "train", 16)
    messages = []
    resumed = pack(stdlib_files, out, tokenizer="byte", shard_tokens=20_000, chunk_bytes=30_000, val_fraction=0.2,
                   progress=messages.append)
    assert messages[0].startswith(f"resuming {out}") and not messages[0].startswith(f"resuming {out}: 0 shards")
    total = len(resumed["shards"]) + len(resumed["val_manifest"]["shards"])
    assert len(messages) - 1 < total  # finished shards were not written again
    reference = pack(stdlib_files, tmp_path / "ref", tokenizer="byte", shard_tokens=20_000, chunk_bytes=30_000,
                     val_fraction=0.2)
    for split in ("train", "val"):
        assert _shard_bytes(out / split) == _shard_bytes(tmp_path / "ref" / split)
    assert resumed["shards"] == reference["shards"] and resumed["sources"] == reference["sources"]
    assert resumed["val_manifest"]["sources"] == reference["val_manifest"]["sources"]
    assert sorted(os.listdir(out)) == ["train", "val"]  # the journal is gone


def test_cli_packs_arrow_and_config_files_and_names_a_damaged_one(stdlib_files, tmp_path):
    """A directory as users keep one: Arrow files of text rows, a config file, and an Arrow file
    cut short; the run stops naming the damaged file, and with skip packs the rest and says so."""
    pa = pytest.importorskip("pyarrow")
    texts = [p.read_text() for p in stdlib_files[:4]]
    table = pa.table({"id": list(range(4)), "body": texts})
    (tmp_path / "d").mkdir()
    with pa.ipc.new_file(tmp_path / "d" / "rows.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=1)
    data = (tmp_path / "d" / "rows.arrow").read_bytes()
    (tmp_path / "d" / "torn.arrow").write_bytes(data[: len(data) // 2])
    (tmp_path / "d" / "config.yaml").write_bytes((REPO / "config.yaml").read_bytes())
    cmd = [sys.executable, "tools/pack.py", "--tokenizer", "byte", "--quiet", str(tmp_path / "d")]
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert f"{tmp_path / 'd' / 'torn.arrow'}: not a readable Arrow IPC file" in bad.stderr
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "o"), "--on-bad-input", "skip"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "packed 5 documents" in ok.stdout and f"1 not a readable Arrow IPC file: {tmp_path / 'd' / 'torn.arrow'}" in ok.stdout
    manifest = json.loads((tmp_path / "o" / "index.json").read_text())
    assert [(Path(s["path"]).name, s["documents"]) for s in manifest["sources"]] == [("config.yaml", 1), ("rows.arrow", 4)]
