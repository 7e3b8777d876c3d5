"""Packed data damaged after packing: each launch is refused before the first batch, naming the file.

tests/data already covers a truncated or missing shard, a changed word (verify), another layout
version and token ids beyond the vocabulary. Here: a shard swapped for one packed with another
tokenizer under the same name, and index.json edited by hand. Which checks need data.verify=true:
only those where sizes still agree (a swapped shard of the same token count, a changed sha256);
the header and listing checks run at every launch and cost nothing.

The same 12 stdlib modules are packed with the BPE (300 ids) and the byte tokenizer, 60000 tokens
a shard: shard_00001.npy then holds 60000 tokens in both, the BPE's last shard fewer (the byte
tokenizer's same-named shard is a full one: more text, more tokens).
Each case launches the real run in this process (tests/faults/test_checkpoints.py's command).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_checkpoints import REPO, train_here

STDLIB = sorted(Path(sys.modules["os"].__file__).parent.glob("*.py"))[:12]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("data_faults")
    for tokenizer, name in (("bpe:300", "bpe"), ("byte", "byte")):
        pack = subprocess.run([sys.executable, "tools/pack.py", "--tokenizer", tokenizer, "--shard-tokens", "60000",
                               "--out", str(work / name), *map(str, STDLIB)], cwd=REPO, capture_output=True, text=True)
        assert pack.returncode == 0, pack.stderr[-3000:]
    return work


@pytest.fixture
def data(packed, tmp_path) -> Path:
    """A fresh copy of the BPE dataset for the case to damage."""
    return Path(shutil.copytree(packed / "bpe", tmp_path / "bpe"))


def refused(data: Path, tmp_path: Path, *extra: str) -> str:
    """Launch on `data`; the error's message, reported as a data error (mamba/train.py exits with
    it, no traceback). Nothing may have been trained or saved."""
    folder = tmp_path / "run" / "ckpt"
    with pytest.raises(SystemExit) as err:
        train_here(data.parent, folder, f"data.sources=[{{path: '{data}'}}]", *extra)
    assert not (folder.parent / "metrics.jsonl").exists() and not list(folder.glob("ep*"))
    message = str(err.value.code)
    assert message.startswith("data error: "), message
    return message


def edit_index(data: Path, edit) -> None:
    index = json.loads((data / "index.json").read_text())
    edit(index)
    (data / "index.json").write_text(json.dumps(index))


def test_a_shard_from_another_tokenizer_of_another_length_is_refused(packed, data, tmp_path):
    last = json.loads((data / "index.json").read_text())["shards"][-1]
    shutil.copy(packed / "byte" / last["file"], data / last["file"])
    message = refused(data, tmp_path)
    assert f"data.sources[0].path: {data / last['file']}: holds a int32 array of shape (60000,), " \
           f"index.json says ({last['tokens']},)" in message


def test_a_shard_from_another_tokenizer_of_the_same_length_needs_verify(packed, data, tmp_path):
    """Same name, same token count: only the bytes differ, so only data.verify's hash can tell."""
    shutil.copy(packed / "byte" / "shard_00001.npy", data / "shard_00001.npy")
    message = refused(data, tmp_path, "data.verify=true")
    assert f"{data / 'shard_00001.npy'}: sha256 differs from index.json" in message


def test_an_edited_token_count_is_refused_naming_the_shard(data, tmp_path):
    def edit(index):
        index["shards"][2]["tokens"] -= 1
        index["total_tokens"] -= 1  # edited consistently: the shard's own header still disagrees
    edit_index(data, edit)
    assert f"{data / 'shard_00002.npy'}: holds a int32 array of shape (60000,), index.json says (59999,)" \
           in refused(data, tmp_path)


def test_a_total_that_does_not_add_up_is_refused(data, tmp_path):
    total = json.loads((data / "index.json").read_text())["total_tokens"]
    edit_index(data, lambda index: index.update(total_tokens=total + 5))
    assert f"{data / 'index.json'}: says total_tokens {total + 5} but its shards' tokens add up to {total}" \
           in refused(data, tmp_path)


def test_a_removed_shard_entry_is_refused_naming_the_unlisted_file(data, tmp_path):
    def edit(index):
        removed = index["shards"].pop(1)
        index["total_tokens"] -= removed["tokens"]
    edit_index(data, edit)
    assert f"{data / 'index.json'}: lists no entry for shard_00001.npy" in refused(data, tmp_path)


def test_an_edited_sha256_needs_verify(data, tmp_path):
    edit_index(data, lambda index: index["shards"][0].update(sha256="0" * 64))
    message = refused(data, tmp_path, "data.verify=true")
    assert f"{data / 'shard_00000.npy'}: sha256 differs from index.json" in message and "0" * 64 in message
