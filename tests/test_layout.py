"""mamba.layout: encode/decode round trip, edge values, rejected inputs, the sign-bit check."""
import numpy as np
import pytest
import torch

from mamba import layout


def test_random_round_trip_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    n = 10_000
    ids = rng.integers(0, layout.MAX_TOKEN_ID + 1, n)
    pos = rng.integers(0, layout.MAX_POSITION + 1, n)
    loss = rng.integers(0, 2, n).astype(bool)
    words = layout.encode(ids, pos, loss)
    assert words.dtype == np.int32 and words.shape == (n,) and words.min() >= 0

    got_ids, got_pos, got_loss = layout.decode(words)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_pos, pos)
    np.testing.assert_array_equal(got_loss, loss)

    t_ids, t_pos, t_loss = layout.decode(torch.from_numpy(words))
    assert t_loss.dtype == torch.bool
    np.testing.assert_array_equal(t_ids.numpy(), got_ids)
    np.testing.assert_array_equal(t_pos.numpy(), got_pos)
    np.testing.assert_array_equal(t_loss.numpy(), got_loss)


def test_edge_values_and_saturation():
    ids = [0, 65535, 0, 65535, 7, 7]
    pos = [0, 16383, 16384, 10**9, 1, 0]
    loss = [0, 1, 1, 0, 1, 1]
    words = layout.encode(ids, pos, loss)
    got_ids, got_pos, got_loss = layout.decode(words)
    assert got_ids.tolist() == ids
    assert got_pos.tolist() == [0, 16383, 16383, 16383, 1, 0]  # saturates, never wraps to 0
    assert got_loss.tolist() == [bool(x) for x in loss]
    assert words[0] == 0  # token 0, position 0, no loss: the all-zero word
    assert words.max() <= np.iinfo(np.int32).max and words.min() >= 0  # bit 31 never set


def test_empty_input():
    words = layout.encode([], [], [])
    assert words.shape == (0,) and words.dtype == np.int32


@pytest.mark.parametrize(
    "ids, pos, loss, match",
    [
        ([65536], [0], [1], "65536"),
        ([-1], [0], [1], "-1"),
        ([1], [-3], [1], "negative"),
        ([1], [0], [2], "0/1"),
        ([1, 2], [0], [1], "shapes"),
        ([[1]], [[0]], [[1]], "1-D"),
    ],
)
def test_bad_values_raise(ids, pos, loss, match):
    with pytest.raises(ValueError, match=match):
        layout.encode(ids, pos, loss)


def test_check_words_rejects_sign_bit():
    layout.check_words(layout.encode([1, 2], [0, 1], [1, 1]), "ok")
    layout.check_words(np.zeros(0, np.int32), "empty")
    layout.check_words(torch.zeros(0, dtype=torch.int32), "empty")
    with pytest.raises(ValueError, match="shard_t"):
        layout.check_words(torch.tensor([[3, -5]], dtype=torch.int32), "shard_t")
    with pytest.raises(ValueError, match="shard_x"):
        layout.check_words(np.array([5, -1], dtype=np.int32), "shard_x")

