"""Resume without replay: stream state, elastic re-sharding, workers, and a real Composer Trainer."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.utils import reproducibility

from mamba.config.schema import DataConfig
from mamba.data.dataset import PackedSource, decode_windows
from mamba.data.errors import DataError
from mamba.data.loader import MixtureStream, build_eval_dataloader, build_train_dataloader
from mamba.data.pack import pack
from mamba.model.composer_model import ComposerMambaLM
from mamba.model.lm import MambaConfig, MambaLMHeadModel

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 32


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two byte-tokenized sources of real text (CPython's json and email.mime packages), with FIM
    sentinel ids (spare ids 300..302) recorded as a tokenizer defining them would."""
    root = tmp_path_factory.mktemp("resume")
    pack([STDLIB / "json"], root / "json", shard_tokens=30_000)
    pack([STDLIB / "email" / "mime"], root / "mime", shard_tokens=5_000)
    for d in (root / "json", root / "mime"):
        index = json.loads((d / "index.json").read_text())
        index["special_tokens"] = {"eos": 256, "fim_prefix": 300, "fim_middle": 301, "fim_suffix": 302}
        (d / "index.json").write_text(json.dumps(index))
    return [root / "json", root / "mime"]


def stream(dirs, rank=0, world_size=1, batch_size=4, fim_rate=0.0):
    sources = [PackedSource(d, SEQ) for d in dirs]
    return MixtureStream(sources, [0.7, 0.3], batch_size, seed=11, shuffle=True, rank=rank,
                         world_size=world_size, fim_rate=fim_rate)


def take(stream, n):
    """The first n batches of `stream` (a MixtureStream: batches of stream.batch_size rows)."""
    batches = iter(stream)
    return [next(batches) for _ in range(n)]


def by_sample(batches: list[dict], start: int, rank: int, world_size: int) -> dict[int, tuple]:
    """Rows of one rank's consecutive batches keyed by the global sample they must hold."""
    rows, j = {}, 0
    for batch in batches:
        for row in range(len(batch["words"])):
            rows[start + rank + j * world_size] = tuple(torch.cat([batch[k][row] for k in sorted(batch)]).tolist())
            j += 1
    return rows


def test_state_dict_resume_yields_exactly_the_rest(dirs):
    whole = take(stream(dirs), 12)
    first = stream(dirs)
    take(first, 5)
    state = first.state_dict(num_samples=5 * 4, from_beginning=True)
    resumed = stream(dirs)
    resumed.load_state_dict(state)
    rest = take(resumed, 7)
    for a, b in zip(whole[5:], rest):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # from_beginning=False counts from where this stream was resumed.
    assert resumed.state_dict(8, from_beginning=False)["sample"] == 28
    with pytest.raises(ValueError, match="no valid 'sample' count"):
        resumed.load_state_dict({"sample": -1})


@pytest.mark.parametrize("fim_rate", [0.0, 1.0])
def test_elastic_resume_continues_the_global_order(dirs, fim_rate):
    """2 ranks x 4 for 3 steps, then 1 rank x 8 and 4 ranks x 2: the same global order."""
    reference = by_sample(take(stream(dirs, batch_size=1, fim_rate=fim_rate), 64), 0, 0, 1)
    got = {}
    for rank in range(2):
        got.update(by_sample(take(stream(dirs, rank, 2, 4, fim_rate), 3), 0, rank, 2))
    assert sorted(got) == list(range(24))
    state = stream(dirs, 0, 2, 4, fim_rate).state_dict(24, True)  # what Composer saves at step 3
    one = stream(dirs, 0, 1, 8, fim_rate)
    one.load_state_dict(state)
    got.update(by_sample(take(one, 2), 24, 0, 1))  # samples 24..39
    state = one.state_dict(16, from_beginning=False)
    for rank in range(4):
        four = stream(dirs, rank, 4, 2, fim_rate)
        four.load_state_dict(state)
        got.update(by_sample(take(four, 3), 40, rank, 4))  # samples 40..63
    assert sorted(got) == list(range(64))  # nothing skipped, nothing twice
    assert got == reference


def test_workers_reassemble_the_same_order(dirs):
    s = stream(dirs, rank=1, world_size=2, batch_size=3)
    s.load_state_dict(s.state_dict(6, True))
    expected = take(s, 7)
    # Real worker processes, each building whole batches, as the training loader runs them.
    batches = iter(torch.utils.data.DataLoader(s, batch_size=None, num_workers=2))
    got = [next(batches) for _ in range(7)]
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_loader_one_deterministic_pass(dirs):
    cfg = DataConfig(sources=[{"path": str(dirs[0])}], seq_len=SEQ, num_workers=0,
                     eval_sources=[{"path": str(d), "weight": w} for d, w in zip(dirs, (2, 1))])
    loader = build_eval_dataloader(cfg, batch_size=5, vocab_size=262).dataloader
    first, second = list(loader), list(loader)
    assert all(torch.equal(a["words"], b["words"]) for a, b in zip(first, second))
    n0, n1 = (len(PackedSource(d, SEQ)) for d in dirs)
    # Weights 2:1 interleave as json, mime, json | json, mime, json | ... The pass ends where a
    # source would need a window past its last: mime's n1-th sample is g = 3 * n1 + 1, json's
    # n0-th is 3 * (n0 // 2) (+ 2 if n0 is odd); then it drops the last partial batch of 5.
    available = min(3 * n1 + 1, 3 * (n0 // 2) + 2 * (n0 % 2))
    assert len(first) == available // 5
    # In file order, no shuffle: samples 0..4 are json 0, mime 0, json 1, json 2, mime 1.
    json0, mime0 = (decode_windows(PackedSource(d, SEQ).read(np.arange(3)))["input_ids"] for d in dirs)
    expected = torch.stack([json0[0], mime0[0], json0[1], json0[2], mime0[1]])
    assert torch.equal(decode_windows(first[0]["words"])["input_ids"], expected)
    assert build_eval_dataloader(DataConfig(sources=cfg.sources), 5, 262) is None


def test_build_checks_name_the_source(dirs, tmp_path):
    cfg = DataConfig(sources=[{"path": str(dirs[0])}, {"path": str(tmp_path / "nope")}], seq_len=SEQ, num_workers=0)
    with pytest.raises(DataError, match=r"data.sources\[1\].path: .*/nope: no such directory; give a packed"):
        build_train_dataloader(cfg, 2, 262, seed=0)
    (tmp_path / "nope").mkdir()  # there, but not a packed dataset
    with pytest.raises(DataError, match=r"data.sources\[1\].path: .*nope/index.json: missing"):
        build_train_dataloader(cfg, 2, 262, seed=0)
    cfg.sources = [{"path": str(dirs[1])}]
    with pytest.raises(DataError, match=r"data.sources\[0\].path: .*shard_00000.npy: holds token id 256.*vocab_size is 200"):
        build_train_dataloader(cfg, 2, 200, seed=0)
    # The data's ids (< 257) fit 260 rows, but its byte tokenizer has 262 entries.
    with pytest.raises(DataError, match=r"data.sources\[0\].path: .*mime/index.json: the data was packed with "
                                        r"tokenizer 'byte' of 262 entries, but the model's vocab_size is 260 "
                                        r"\(the largest id in this data is 256"):
        build_train_dataloader(cfg, 2, 260, seed=0)
    with pytest.raises(DataError, match=r"seq_len \+ 1 = 100001"):
        build_train_dataloader(DataConfig(sources=cfg.sources, seq_len=100_000), 2, 262, seed=0)
    # data.verify re-hashes the shards: a flipped bit that keeps every size is caught.
    small = tmp_path / "small"
    pack([STDLIB / "json" / "tool.py"], small)
    shard = small / "shard_00000.npy"
    data = bytearray(shard.read_bytes())
    data[-2] ^= 1
    shard.write_bytes(bytes(data))
    cfg.sources = [{"path": str(small)}]
    build_train_dataloader(cfg, 2, 262, seed=0)
    cfg.verify = True
    with pytest.raises(DataError, match=r"small/shard_00000.npy: sha256 .* differs"):
        build_train_dataloader(cfg, 2, 262, seed=0)
    cfg.verify = False
    cfg.sources, cfg.fim_rate = [{"path": str(d)} for d in dirs], 0.5  # sentinels 300..302
    with pytest.raises(DataError, match=r"data.sources\[0\].path: FIM sentinel ids \(300, 301, 302\).*vocab_size=262"):
        build_train_dataloader(cfg, 2, 262, seed=0)
    build_train_dataloader(cfg, 2, 303, seed=0)
    cfg.fim_rate = 0.0
    other = tmp_path / "bpe"
    pack([STDLIB / "json"], other, tokenizer="bpe:300")
    cfg.sources = [{"path": str(dirs[1])}, {"path": str(other)}]
    with pytest.raises(DataError, match=r"data.sources\[1\].path=.*bpe was packed with tokenizer"):
        build_train_dataloader(cfg, 2, 400, seed=0)


class RecordBatches(Callback):
    """Keeps every batch the trainer trains on, and its loss."""

    def __init__(self):
        self.inputs, self.losses = [], []

    def batch_start(self, state, logger):
        self.inputs.append(state.batch["words"].clone())  # the whole batch, before the device decode

    def batch_end(self, state, logger):
        self.losses.append(float(state.loss))


def fit(dirs, tmp_path: Path, duration: str, load_path: str | None = None) -> tuple[RecordBatches, Trainer, list]:
    reproducibility.seed_all(3)
    model = ComposerMambaLM(MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=262)))
    cfg = DataConfig(sources=[{"path": str(d), "weight": w} for d, w in zip(dirs, (3, 1))], seq_len=SEQ, num_workers=0)
    loader = build_train_dataloader(cfg, batch_size=4, vocab_size=262, seed=3)
    read = []  # global samples the stream was asked for: proves nothing before the resume point
    original = loader.dataloader.dataset.batch

    def recording_batch(g):
        read.extend(g.tolist())
        return original(g)
    loader.dataloader.dataset.batch = recording_batch
    record = RecordBatches()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=duration, device="cpu", precision="fp32",
                      device_train_microbatch_size=2,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), callbacks=[record], seed=3,
                      save_folder=str(tmp_path / "ckpt"), save_interval="3ba", save_overwrite=True,
                      load_path=load_path, progress_bar=False, log_to_console=False)
    trainer.fit()
    return record, trainer, read


def test_composer_resume_consumes_the_same_samples_without_spinning(dirs, tmp_path):
    whole, _, read_whole = fit(dirs, tmp_path / "whole", "6ba")
    assert read_whole[:24] == list(range(24))
    fit(dirs, tmp_path / "split", "3ba")
    checkpoint = tmp_path / "split" / "ckpt" / "ep0-ba3-rank0.pt"
    resumed, trainer, read = fit(dirs, tmp_path / "split2", "6ba", load_path=str(checkpoint))
    assert trainer.state.dataset_resumption.get("train") is True  # Composer skipped the spin
    assert read[0] == 12 and min(read) == 12  # the stream started at the checkpoint's sample count
    assert len(resumed.inputs) == 3
    for a, b in zip(whole.inputs[3:], resumed.inputs):
        assert torch.equal(a, b)
    assert resumed.losses == whole.losses[3:]
