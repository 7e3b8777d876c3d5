"""Chunked SSD scan (ops/ssd.py) against its float64 sequential recurrence, on random inputs."""
import pytest
import torch

from mamba.model.ops.ssd import ssd_chunked, ssd_ref


def random_inputs(batch=2, length=45, nheads=4, headdim=3, ngroups=2, dstate=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    x, dt = rnd(batch, length, nheads, headdim), rnd(batch, length, nheads)
    A = (-torch.rand(nheads, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    B, C = rnd(batch, length, ngroups, dstate), rnd(batch, length, ngroups, dstate)
    D, dt_bias = rnd(nheads), rnd(nheads)
    reset = torch.rand(batch, length, generator=g) < 0.1
    return (x, dt, A, B, C, D, dt_bias), reset


def run(fn, args, reset, **kw):
    x, dt, A, B, C, D, dt_bias = args
    y = fn(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, reset=reset, **kw)
    # A fixed random projection as the loss, so that every output element gets its own gradient.
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * w).sum(), args)
    return y, grads


@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("chunk", [8, 16, 64])  # 45 steps: padded last chunk, and one chunk > L
def test_chunked_equals_sequential_float64(with_reset, chunk):
    args, reset = random_inputs()
    reset = reset if with_reset else None
    y_ref, g_ref = run(ssd_ref, args, reset)
    y, g = run(ssd_chunked, args, reset, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_float32_close_to_float64_reference():
    args, reset = random_inputs(length=70)
    y_ref, g_ref = run(ssd_ref, args, reset)
    args32 = tuple(a.detach().float().requires_grad_() for a in args)
    y, g = run(ssd_chunked, args32, reset, chunk_size=16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


def test_reset_equals_running_documents_separately():
    (x, dt, A, B, C, D, bias), _ = random_inputs(batch=1, length=40)
    reset = torch.zeros(1, 40, dtype=torch.bool)
    reset[0, [0, 13, 29]] = True
    y = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D, dt_bias=bias, dt_softplus=True, reset=reset)
    for s, e in ((0, 13), (13, 29), (29, 40)):
        alone = ssd_ref(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D=D, dt_bias=bias, dt_softplus=True)
        torch.testing.assert_close(y[:, s:e], alone, rtol=1e-10, atol=1e-10)


def test_long_sequence_with_strong_decay_stays_finite():
    """8192 steps with dt * A down to -1e4 per step: a cumulative-sum formulation would overflow
    (exp of +1e7) or produce nan; every output and gradient here must be finite and equal across
    chunk sizes."""
    g = torch.Generator().manual_seed(1)
    b, L, H, P, N = 1, 8192, 2, 2, 4
    x = torch.randn(b, L, H, P, generator=g, requires_grad=True)
    dt = (torch.rand(b, L, H, generator=g) * 100).requires_grad_()
    A = torch.tensor([-100.0, -0.01], requires_grad=True)
    B, C = torch.randn(b, L, 1, N, generator=g), torch.randn(b, L, 1, N, generator=g)
    reset = torch.rand(b, L, generator=g) < 0.01
    outs = []
    for chunk in (64, 256):
        y = ssd_chunked(x, dt, A, B, C, chunk_size=chunk, reset=reset)
        grads = torch.autograd.grad(y.square().sum(), (x, dt, A))
        assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_compute_in_float32():
    args, reset = random_inputs()
    y32 = ssd_chunked(*(a.detach().float() for a in args[:5]), chunk_size=16, dt_softplus=True, reset=reset)
    y16 = ssd_chunked(*(a.detach().bfloat16() for a in args[:5]), chunk_size=16, dt_softplus=True, reset=reset)
    assert y16.dtype == torch.bfloat16
    # Only the inputs' and the output's rounding to bf16 (8 mantissa bits) differ.
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.1)
