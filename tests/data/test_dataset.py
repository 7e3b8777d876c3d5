"""PackedSource over small hand-built shards: window contents, length math, laziness, errors."""
import json
import pickle

import numpy as np
import pytest
import torch

from mamba import layout
from mamba.data.dataset import PackedSource, decode_windows
from mamba.data.manifest import write_index
from mamba.data.shards import ShardWriter
from mamba.layout import IGNORE_INDEX

BYTE_IDENTITY = {"kind": "byte", "name": "byte", "sha256": "byte-v1", "vocab_size": 258}


def build(tmp_path, ids, positions, loss, shard_tokens):
    """Write the given words as shards of `shard_tokens` plus index.json; return the directory."""
    writer = ShardWriter(tmp_path, shard_tokens)
    writer.add(layout.encode(ids, positions, loss))
    write_index(tmp_path, writer.close(), BYTE_IDENTITY, eos_id=256)
    return tmp_path


@pytest.fixture
def small(tmp_path):
    """23 words in shards of 10, 10 and 3: ids 1..23 (so a word's id tells its global index),
    documents starting at words 0, 6 and 15, loss bit 0 on every third word."""
    n = 23
    ids = np.arange(1, n + 1)
    positions = np.concatenate([np.arange(6), np.arange(9), np.arange(8)])
    loss = np.arange(n) % 3 != 2
    return build(tmp_path, ids, positions, loss, shard_tokens=10), ids, positions, loss


def item(source, i):
    """Window i of `source` as a dict of (seq_len,) tensors."""
    return {k: v[0] for k, v in decode_windows(source.read([i])).items()}


def test_windows_decode_and_shift(small):
    data_dir, ids, positions, loss = small
    ds = PackedSource(data_dir, seq_len=4)
    # Windows per shard: (10-1)//4 = 2, (10-1)//4 = 2, (3-1)//4 = 0.
    assert len(ds) == 4
    assert ds.dropped_tokens == 1 + 1 + 3 and ds.num_tokens == 23 and ds.eos_id == 256
    assert ds.special_tokens["eos"] == 256
    starts = [0, 4, 10, 14]  # global index of each window's first word
    batch = decode_windows(ds.read(np.arange(4)))
    for row, start in enumerate(starts):
        window = {k: v[row] for k, v in batch.items()}
        assert set(window) == {"input_ids", "labels", "position_ids"}
        assert all(t.dtype == torch.int64 and t.shape == (4,) for t in window.values())
        target = slice(start + 1, start + 5)
        assert window["input_ids"].tolist() == ids[start:start + 4].tolist()
        assert window["position_ids"].tolist() == positions[start:start + 4].tolist()
        assert window["labels"].tolist() == np.where(loss[target], ids[target], IGNORE_INDEX).tolist()
    with pytest.raises(IndexError, match="out of range 0..3"):
        ds.read([4])


def test_every_token_is_a_label_once(tmp_path):
    n, seq_len, shard_tokens = 1000, 7, 100
    data_dir = build(tmp_path, np.arange(n), np.arange(n), np.ones(n, bool), shard_tokens)
    ds = PackedSource(data_dir, seq_len)
    per_shard = (shard_tokens - 1) // seq_len
    assert len(ds) == per_shard * (n // shard_tokens)
    labels = decode_windows(ds.read(np.arange(len(ds))))["labels"].flatten().tolist()
    assert len(labels) == len(set(labels))
    assert len(labels) + ds.dropped_tokens + n // shard_tokens == n  # + each shard's first word


def test_no_shard_long_enough(small):
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 11"):
        PackedSource(small[0], seq_len=10)
    assert len(PackedSource(small[0], seq_len=9)) == 2


def test_lazy_memmap_pickles_small(tmp_path):
    n = 200_000  # an 800 KB shard
    data_dir = build(tmp_path, np.arange(n) % 50_000, np.arange(n), np.ones(n, bool), n)
    ds = PackedSource(data_dir, seq_len=64)
    assert ds._maps[0] is None  # nothing opened before the first read
    first = item(ds, 0)
    assert isinstance(ds._maps[0].base, np.memmap)  # opened on first use, as a memmap
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert clone._maps[0] is None
    assert all(torch.equal(a, b) for a, b in zip(first.values(), item(clone, 0).values()))


def test_shard_size_mismatch(small):
    data_dir = small[0]
    shard = data_dir / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match="shard_00001.npy: file is"):
        PackedSource(data_dir, seq_len=4)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard_00001.npy"):
        PackedSource(data_dir, seq_len=4)


def test_check_vocab(tmp_path):
    ids = np.array([5, 6, 7, 8, 300, 9, 1, 2, 3])
    data_dir = build(tmp_path, ids, np.arange(9), np.ones(9, bool), shard_tokens=4)
    ds = PackedSource(data_dir, seq_len=2)
    ds.check_vocab(301)
    with pytest.raises(ValueError, match=r"shard_00001\.npy: holds token id 300.*vocab_size is 300"):
        ds.check_vocab(300)


def test_check_vocab_covers_the_whole_tokenizer(small):
    """Ids 1..23 fit a 24-row embedding, but the byte tokenizer they were packed with has 258
    entries: the model must embed all of them."""
    ds = PackedSource(small[0], seq_len=4)
    ds.check_vocab(258)
    with pytest.raises(ValueError, match=r"index\.json: the data was packed with tokenizer 'byte' of 258 entries, "
                                         r"but the model's vocab_size is 257 \(the largest id in this data is 23.*"
                                         r"set model\.vocab_size >= 258"):
        ds.check_vocab(257)
    with pytest.raises(ValueError, match="vocab_size is 24 "):
        ds.check_vocab(24)


def test_verify_and_corrupt_word(small):
    data_dir = small[0]
    PackedSource(data_dir, seq_len=4).verify()
    words = np.load(data_dir / "shard_00000.npy", mmap_mode="r+")
    words[2] = -1  # same size, so only the hash and the sign check can tell
    words.flush()
    del words
    ds = PackedSource(data_dir, seq_len=4)
    with pytest.raises(ValueError, match="shard_00000.npy: sha256"):
        ds.verify()
    with pytest.raises(ValueError, match="shard_00000.npy.*negative"):
        ds.read([0])
    ds.read([2])  # windows of the intact shard still read


def test_layout_version_checked(small):
    data_dir = small[0]
    index = json.loads((data_dir / "index.json").read_text())
    index["layout_version"] = 99
    (data_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="layout_version 99"):
        PackedSource(data_dir, seq_len=4)


def test_special_tokens_and_fim_sentinels(small):
    data_dir = small[0]
    lacks = r"lacks \['fim_prefix', 'fim_middle', 'fim_suffix'\]"
    with pytest.raises(ValueError, match=r"index.json: data.fim_rate > 0 needs.*" + lacks):
        PackedSource(data_dir, seq_len=4).fim_sentinels()
    index = json.loads((data_dir / "index.json").read_text())
    index["special_tokens"] = {"eos": 256, "fim_prefix": 300, "fim_middle": 301, "fim_suffix": 302}
    (data_dir / "index.json").write_text(json.dumps(index))
    ds = PackedSource(data_dir, seq_len=4)
    assert ds.fim_sentinels() == (300, 301, 302) and ds.eos_id == 256


def test_verify_selected_shards(small):
    data_dir = small[0]
    shard = data_dir / "shard_00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # flip a bit of the last word: sizes stay right, only the hash can tell
    shard.write_bytes(bytes(data))
    ds = PackedSource(data_dir, seq_len=4)
    ds.verify([0, 1])
    with pytest.raises(ValueError, match="shard_00002.npy: sha256"):
        ds.verify([2])
