"""The shifted-sum causal conv1d and its one-token step against nn.Conv1d run document by document."""
import pytest
import torch

from mamba.model.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_step


def make(batch, dim, length, taps, *, time_major, seed=0):
    g = torch.Generator().manual_seed(seed)
    if time_major:  # the mixer's case: a (batch, D, L) view of (batch, L, D) memory
        x = torch.randn(batch, length, dim, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, generator=g, dtype=torch.float64)
    weight = torch.randn(dim, 1, taps, generator=g, dtype=torch.float64)
    bias = torch.randn(dim, generator=g, dtype=torch.float64)
    return x, weight, bias


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 37])
@pytest.mark.parametrize("taps", [1, 2, 4])
@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("time_major", [False, True])
def test_matches_reference_with_gradients(length, taps, with_reset, time_major):
    x, weight, bias = make(3, 5, length, taps, time_major=time_major, seed=length * taps)
    reset = None
    if with_reset:
        reset = torch.rand(3, length, generator=torch.Generator().manual_seed(length)) < 0.3
        reset[0, length // 2] = True
    results = []
    for fn in (causal_conv1d, causal_conv1d_ref):
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        out = fn(*inputs, reset=reset)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append((out, *torch.autograd.grad(out, inputs, cot)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_without_bias():
    x, weight, _ = make(2, 4, 9, 4, time_major=True)
    torch.testing.assert_close(causal_conv1d(x, weight), causal_conv1d_ref(x, weight))


def test_document_isolation_is_exact():
    """A document's outputs do not depend, even in the last bit, on the document before it."""
    x, weight, bias = make(1, 6, 20, 4, time_major=True)
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 8] = True
    other = x.clone()
    other[..., :8] = 1e3 * torch.randn(1, 6, 8, dtype=torch.float64)
    a, b = causal_conv1d(x, weight, bias, reset), causal_conv1d(other, weight, bias, reset)
    assert torch.equal(a[..., 8:], b[..., 8:])
    assert not torch.equal(a[..., :8], b[..., :8])
    # and without the reset the second document does see the first one's last K-1 tokens
    a, b = causal_conv1d(x, weight, bias), causal_conv1d(other, weight, bias)
    assert not torch.equal(a[..., 8:11], b[..., 8:11]) and torch.equal(a[..., 11:], b[..., 11:])


def test_output_keeps_time_major_memory():
    """No hidden transposing copies: a time-major input gives a time-major result."""
    x, weight, bias = make(2, 8, 16, 4, time_major=True)
    out = causal_conv1d(x, weight, bias, torch.zeros(2, 16, dtype=torch.bool))
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("taps", [1, 4])
def test_step_token_by_token_equals_the_convolution(taps):
    """causal_conv1d_step from a zero state, one token at a time, gives the causal conv's outputs."""
    x, weight, bias = make(2, 5, 9, taps, time_major=False, seed=taps)
    for b in (bias, None):
        state = torch.zeros(2, 5, taps, dtype=torch.float64)
        stepped = torch.stack([causal_conv1d_step(state, x[:, :, t], weight, b) for t in range(9)], dim=-1)
        torch.testing.assert_close(stepped, causal_conv1d_ref(x, weight, b), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, x[:, :, 9 - taps:])  # the last K inputs, oldest first
