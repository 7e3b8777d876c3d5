"""Chunked cross-entropy (mamba/model/loss.py) against F.cross_entropy on the full logits.

Tolerance: float64 inputs, so both sides agree to rounding (rtol 1e-10); the chunked side sums
per-chunk partial losses and gradients in a different order than the full computation.
"""
import pytest
import torch
import torch.nn.functional as F

from mamba.layout import IGNORE_INDEX
from mamba.model.loss import chunked_cross_entropy

TOL = dict(rtol=1e-10, atol=1e-12)


def random_case(n_tokens=37, d=12, padded_vocab=24, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, d, generator=g, dtype=torch.float64)
    weight = torch.randn(padded_vocab, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 21, (n_tokens,), generator=g)
    labels[torch.rand(n_tokens, generator=g) < ignore_frac] = IGNORE_INDEX
    return hidden, weight, labels


def reference(hidden, weight, labels, vocab_size):
    """The plain loss: full logits over the real vocabulary (padded rows sliced off)."""
    return F.cross_entropy(hidden @ weight[:vocab_size].T, labels, ignore_index=IGNORE_INDEX)


def loss_and_grads(fn, hidden, weight, *args, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, *args, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 1000])  # 5, 8 do not divide 37; 1000 > N
def test_equals_full_cross_entropy_values_and_gradients(chunk_size):
    hidden, weight, labels = random_case()
    got = loss_and_grads(chunked_cross_entropy, hidden, weight, labels, vocab_size=21, chunk_size=chunk_size)
    want = loss_and_grads(reference, hidden, weight, labels, 21)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_padded_vocab_rows_take_no_part():
    # The head has 24 rows, the vocabulary 21: rows 21..23 must not enter the softmax (changing them
    # leaves the loss unchanged) and get exactly zero gradient.
    hidden, weight, labels = random_case()
    loss, _, grad_w = loss_and_grads(chunked_cross_entropy, hidden, weight, labels, vocab_size=21, chunk_size=8)
    weight2 = weight.clone()
    weight2[21:] = 100.0
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight2, labels, vocab_size=21, chunk_size=8), loss, **TOL)
    assert torch.equal(grad_w[21:], torch.zeros_like(grad_w[21:]))
    # ...whereas the full padded softmax differs: the slice is not a no-op.
    assert not torch.allclose(loss, F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX))


def test_all_ignored_chunks_and_batch_shape():
    hidden, weight, labels = random_case(n_tokens=40)
    labels[8:24] = IGNORE_INDEX  # chunks 1 and 2 (chunk_size 8) count no token at all
    h3, l3 = hidden.view(4, 10, -1), labels.view(4, 10)  # (B, L, d) input as the model gives it
    got = loss_and_grads(chunked_cross_entropy, h3, weight, l3, vocab_size=21, chunk_size=8)
    want = loss_and_grads(reference, hidden, weight, labels, 21)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1].view(40, -1), want[1], **TOL)
    torch.testing.assert_close(got[2], want[2], **TOL)
    assert torch.equal(got[1].view(40, -1)[8:24], torch.zeros(16, hidden.shape[1], dtype=hidden.dtype))


def test_no_counted_token_gives_zero_not_nan():
    hidden, weight, labels = random_case()
    labels[:] = IGNORE_INDEX
    loss, grad_h, grad_w = loss_and_grads(chunked_cross_entropy, hidden, weight, labels, vocab_size=21, chunk_size=8)
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()


def test_bfloat16_matches_fp32_reference_loosely():
    # Mixed precision: the matmul runs in bf16 (as the plain bf16 head would), softmax in fp32.
    hidden, weight, labels = random_case(n_tokens=64, d=32, padded_vocab=24)
    got = chunked_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, vocab_size=21, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(hidden, weight, labels, 21), rtol=2e-2, atol=2e-2)


def test_bad_labels_and_shapes_are_refused():
    hidden, weight, labels = random_case()
    labels[3] = 22  # a padded row, not a token
    with pytest.raises(ValueError, match="label 22 is outside the vocabulary 0..20"):
        chunked_cross_entropy(hidden, weight, labels, vocab_size=21)
    with pytest.raises(ValueError, match="must share the leading"):
        chunked_cross_entropy(hidden, weight, labels[:-1], vocab_size=21)
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_cross_entropy(hidden, weight, labels.clamp(max=20), vocab_size=21, chunk_size=0)
