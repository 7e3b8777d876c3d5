"""The mixture arithmetic and the stream built on it: exact shares, seeded shuffles, epochs."""
import logging
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from mamba.data.dataset import PackedSource
from mamba.data.loader import MixtureStream
from mamba.data.mixture import MAX_PERIOD, WeightedSchedule, WindowShuffle, hash_uniform, integer_weights
from mamba.data.pack import pack

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def reference_locate(weights: list[int], n: int) -> tuple[list[int], list[int]]:
    """Slow exact reference: repeatedly give the next sample to the source whose next occurrence
    has the smallest (2j + 1) / w (Sainte-Lague), ties to the first source; count k per source."""
    from fractions import Fraction
    taken, sources, ks = [0] * len(weights), [], []
    for g in range(n):
        period, slot = divmod(g, sum(weights))
        if slot == 0:
            taken = [0] * len(weights)
        s = min(range(len(weights)), key=lambda s: (Fraction(2 * taken[s] + 1, weights[s]) if taken[s] < weights[s]
                                                     else Fraction(10**9), s))
        sources.append(s)
        ks.append(period * weights[s] + taken[s])
        taken[s] += 1
    return sources, ks


def test_integer_weights():
    assert integer_weights([0.75, 0.25]) == [3, 1]
    assert integer_weights([2, 6]) == [1, 3]
    assert integer_weights([0.7, 0.2, 0.1]) == [7, 2, 1]
    assert integer_weights([1.5, 1]) == [3, 2]
    with pytest.raises(ValueError, match="must be > 0"):
        integer_weights([1, 0])
    with pytest.raises(ValueError, match=f"period of 2000000 samples \\(more than {MAX_PERIOD}\\)"):
        integer_weights([0.000001, 1.999999])


@pytest.mark.parametrize("weights", [[3, 1], [5, 2, 3], [1, 1, 1, 7], [13, 4]])
def test_schedule_matches_reference_and_shares_are_exact(weights):
    schedule = WeightedSchedule(weights)
    n = 5 * schedule.period + 3
    source, k = schedule.locate(np.arange(n))
    ref_source, ref_k = reference_locate(weights, n)
    assert source.tolist() == ref_source and k.tolist() == ref_k
    share = np.array(weights) / sum(weights)
    for start in range(0, n - schedule.period, schedule.period):  # every full period: exact counts
        counts = np.bincount(source[start:start + schedule.period], minlength=len(weights))
        assert counts.tolist() == weights
    # Every prefix stays within 1.5 samples of its exact share (no drift inside a period either).
    prefix = np.stack([np.cumsum(source == s) for s in range(len(weights))], axis=1)
    assert np.abs(prefix - np.outer(np.arange(1, n + 1), share)).max() < 1.5
    for s in range(len(weights)):  # first_sample inverts locate
        for kk in range(0, 3 * weights[s]):
            g = schedule.first_sample(s, kk)
            assert source[g] == s and k[g] == kk


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 100, 1000, 4097])
def test_window_shuffle_is_a_permutation(n):
    perm = WindowShuffle(n, seed=17, source=0, epoch=0).permute(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    # Pointwise evaluation agrees with the whole-array evaluation (what O(1) resume relies on).
    assert WindowShuffle(n, seed=17, source=0, epoch=0).permute(np.arange(n)[::-1].copy()).tolist() == perm[::-1].tolist()


def test_window_shuffle_depends_on_seed_source_epoch():
    n = 1000
    base = WindowShuffle(n, 1, 0, 0).permute(np.arange(n))
    assert np.array_equal(base, WindowShuffle(n, 1, 0, 0).permute(np.arange(n)))
    for other in (WindowShuffle(n, 2, 0, 0), WindowShuffle(n, 1, 1, 0), WindowShuffle(n, 1, 0, 1)):
        perm = other.permute(np.arange(n))
        assert (perm != base).mean() > 0.95
    # Not close to the identity or a shift: rank correlation with the input order is small.
    assert abs(np.corrcoef(np.arange(n), base)[0, 1]) < 0.1
    # Large domains stay cheap and inside range.
    big = WindowShuffle(10**9 + 7, 3, 0, 0).permute(np.arange(0, 10**9, 10**6))
    assert big.min() >= 0 and big.max() < 10**9 + 7 and len(set(big.tolist())) == 1000


def test_hash_uniform():
    u = hash_uniform(5, np.arange(100_000), 2)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(u, hash_uniform(5, np.arange(100_000), 2))
    assert not np.array_equal(u, hash_uniform(6, np.arange(100_000), 2))


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two byte-tokenized sources of real text: CPython's json package and its email package."""
    root = tmp_path_factory.mktemp("mix")
    pack([STDLIB / "json"], root / "json", shard_tokens=20_000)
    pack([STDLIB / "email" / "mime"], root / "mime", shard_tokens=7_000)
    return root / "json", root / "mime"


def key(batch: dict, row: int) -> tuple:
    """A window's identity: its words (token, position, loss bit of each token)."""
    return tuple(batch["words"][row].tolist())


def window_names(sources: list[PackedSource]) -> dict[tuple, tuple[int, int]]:
    """Every window's input_ids -> (source, window index), straight from the shards."""
    names = {}
    for s, source in enumerate(sources):
        batch = {"words": torch.from_numpy(source.read(np.arange(len(source))))}
        names.update({key(batch, row): (s, row) for row in range(len(source))})
    assert len(names) == sum(len(source) for source in sources)  # real text: all windows distinct
    return names


def test_stream_shares_epochs_and_shuffle(two_sources, caplog):
    sources = [PackedSource(d, 64) for d in two_sources]
    names, small = window_names(sources), len(sources[1])
    stream = MixtureStream(sources, [3, 1], batch_size=8, seed=5, shuffle=True, rank=0, world_size=1)
    n = 4 * 4 * small + 8  # several epochs of each source
    with caplog.at_level(logging.INFO, logger="mamba.data.loader"):
        batches = [stream.batch(np.arange(start, start + 8)) for start in range(0, n, 8)]
    read = [names[key(batch, row)] for batch in batches for row in range(8)]
    # Exactly 3 of every 4 windows (so of the tokens) come from the first source, in every period.
    for start in range(0, n - 4, 4):
        assert [s for s, _ in read[start:start + 4]].count(0) == 3
    # Each epoch of a source reads each of its windows once, every epoch in a new shuffled order;
    # each epoch start is logged once.
    messages = [r.getMessage() for r in caplog.records]
    for s, source in enumerate(sources):
        order = [w for src, w in read if src == s]
        full = len(order) // len(source)
        assert full >= 2
        epochs = [order[e * len(source):(e + 1) * len(source)] for e in range(full)]
        assert all(sorted(epoch) == list(range(len(source))) for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs + [list(range(len(source)))]}) == full + 1
        started = -(-len(order) // len(source))  # epochs begun
        for epoch in range(2, started + 2):
            logged = sum(f"{two_sources[s]} starts epoch {epoch} " in m for m in messages)
            assert logged == (epoch <= started), (epoch, messages)
    # Without shuffle a source's windows come in file order.
    plain = MixtureStream(sources, [3, 1], batch_size=8, seed=5, shuffle=False, rank=0, world_size=1)
    batch = plain.batch(np.arange(40))
    read = [names[key(batch, row)] for row in range(40)]
    assert [w for s, w in read if s == 1] == list(range(10))
    assert [w for s, w in read if s == 0] == list(range(30))


def test_same_seed_same_order_other_seed_other_order(two_sources):
    sources = [PackedSource(d, 32) for d in two_sources]
    g = np.arange(64)
    a = MixtureStream(sources, [3, 1], 8, seed=1, shuffle=True, rank=0, world_size=1).batch(g)
    b = MixtureStream(sources, [3, 1], 8, seed=1, shuffle=True, rank=0, world_size=1).batch(g)
    c = MixtureStream(sources, [3, 1], 8, seed=2, shuffle=True, rank=0, world_size=1).batch(g)
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert not np.array_equal(a["words"], c["words"])


@pytest.mark.parametrize("override, message", [
    ("data.sources=[]", r"data.sources is empty"),
    ("data.sources=[{path: a, weight: 0}]", r"data.sources\[0\].weight=0 must be a number > 0"),
    ("data.sources=[{path: a, wieght: 1}]", r"data.sources\[0\]: unknown keys \['wieght'\]"),
    ("data.sources=[a]", r"data.sources\[0\]='a' must be a mapping"),
    ("data.eval_sources=[{weight: 2}]", r"data.eval_sources\[0\].path must be a directory name"),
    ("data.sources=[{path: a, weight: 0.1234567}, {path: b, weight: 1}]",
     r"data.sources: mixture weights .* period of 11234567 samples"),
    ("data.fim_rate=1.5", r"data.fim_rate=1.5 must be a probability"),
    ("trainer.max_duration=2ep", r"trainer.max_duration='2ep': the training data has no epochs"),
])
def test_config_validation_of_data_keys(override, message):
    from mamba.config.load import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    cfg = load_config(None, ["data.sources=[{path: a, weight: 3}, {path: b}]", "data.eval_sources=[{path: c}]"])
    assert cfg.data.sources == [{"path": "a", "weight": 3}, {"path": "b"}]
