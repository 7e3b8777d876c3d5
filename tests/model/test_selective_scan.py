"""The chunked selective scan against its sequential reference: outputs and every gradient.

The reference (`selective_scan_ref`) is a plain loop over time, run in float64. The fast scan must
agree with it to float64 rounding, in float32 to float32 rounding, for any length (1, not a
multiple of the chunk, long), with and without D / z / delta_bias / softplus / document resets,
and must stay finite where an exp-of-cumulative-sum formulation overflows.
"""
import pytest
import torch

from mamba.model.ops.kernels import scan_with_resets
from mamba.model.ops.selective_scan import selective_scan, selective_scan_ref
from kernel_standins import selective_scan_fn

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, nstate, length, *, dtype=torch.float64, seed=0, reset_rate=0.0):
    """Random scan inputs in mamba-ssm's layout; A < 0 as in Mamba (A = -exp(A_log))."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = {
        "u": randn(batch, dim, length),
        "delta": 0.5 * randn(batch, dim, length),
        "A": -(0.1 + 2 * torch.rand(dim, nstate, generator=g, dtype=torch.float64)),
        "B": randn(batch, nstate, length),
        "C": randn(batch, nstate, length),
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": 0.3 * randn(dim),
    }
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    reset = torch.rand(batch, length, generator=g) < reset_rate if reset_rate else None
    return inputs, reset


def run_both(inputs, reset, *, use=NAMES, delta_softplus=True, chunk_size=None):
    """Outputs and gradients (w.r.t. every used input, for a fixed random cotangent) of the fast
    scan on `inputs` and of the reference on float64 copies of them."""
    results = []
    for fn, dtype in ((selective_scan, None), (selective_scan_ref, torch.float64)):
        xs = {k: inputs[k].detach().to(dtype or inputs[k].dtype).requires_grad_() for k in use}
        kwargs = {"chunk_size": chunk_size} if fn is selective_scan else {}
        y = fn(xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], D=xs.get("D"), z=xs.get("z"),
               delta_bias=xs.get("delta_bias"), delta_softplus=delta_softplus, reset=reset, **kwargs)
        cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(y, list(xs.values()), cot.to(y.dtype))
        results.append((y, dict(zip(xs, grads))))
    return results


def assert_matches(fast, ref, rtol, atol):
    """Each tensor within rtol, and atol relative to its largest reference entry."""
    (y, grads), (y_ref, grads_ref) = fast, ref
    pairs = [("y", y, y_ref)] + [(f"d{k}", grads[k], grads_ref[k]) for k in grads_ref]
    for name, got, want in pairs:
        assert torch.isfinite(got).all(), name
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale, msg=name)


@pytest.mark.parametrize("length,chunk_size", [(1, None), (2, None), (7, 3), (64, None), (100, None),
                                               (100, 7), (129, 16)])
@pytest.mark.parametrize("reset_rate", [0.0, 0.1])
def test_float64_matches_reference(length, chunk_size, reset_rate):
    inputs, reset = make_inputs(2, 5, 4, length, reset_rate=reset_rate)
    fast, ref = run_both(inputs, reset, chunk_size=chunk_size)
    assert_matches(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use", [("u", "delta", "A", "B", "C"), ("u", "delta", "A", "B", "C", "D"),
                                 ("u", "delta", "A", "B", "C", "z"),
                                 ("u", "delta", "A", "B", "C", "delta_bias")])
@pytest.mark.parametrize("delta_softplus", [False, True])
def test_optional_arguments(use, delta_softplus):
    inputs, reset = make_inputs(2, 3, 5, 37, seed=3)
    if not delta_softplus:  # a raw delta is a step size: keep it positive
        inputs["delta"] = inputs["delta"].abs()
    fast, ref = run_both(inputs, reset, use=use, delta_softplus=delta_softplus, chunk_size=6)
    assert_matches(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [1000, 4096])
@pytest.mark.parametrize("reset_rate", [0.0, 0.01])
def test_long_sequences_float64(length, reset_rate):
    inputs, reset = make_inputs(2, 3, 4, length, seed=length, reset_rate=reset_rate)
    fast, ref = run_both(inputs, reset)
    assert_matches(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length,reset_rate", [(1, 0.0), (77, 0.1), (1000, 0.0), (4096, 0.01)])
def test_float32_matches_float64_reference(length, reset_rate):
    inputs, reset = make_inputs(2, 4, 8, length, dtype=torch.float32, seed=5, reset_rate=reset_rate)
    fast, ref = run_both(inputs, reset)
    assert fast[0].dtype == torch.float32
    assert_matches(fast, ref, rtol=1e-4, atol=1e-5)


def test_huge_decays_stay_finite():
    """delta' up to 50 and A down to -100: decays reach exp(-5000). Any formulation through
    exp(-cumsum(delta * A)) overflows here; the chunked scan only multiplies decays <= 1."""
    g = torch.Generator().manual_seed(7)
    inputs, _ = make_inputs(2, 4, 8, 2048, seed=7)
    inputs["delta"] = 50 * torch.rand(2, 4, 2048, generator=g, dtype=torch.float64)
    inputs["A"] = -100 * torch.rand(4, 8, generator=g, dtype=torch.float64)
    cumulative = (inputs["delta"][..., None] * inputs["A"][:, None, :]).cumsum(dim=2)
    assert torch.isinf(torch.exp(-cumulative)).any()  # the naive route really would overflow
    use = ("u", "delta", "A", "B", "C", "D", "z")
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 1e-5)):
        typed = {k: v.to(dtype) for k, v in inputs.items()}
        fast, ref = run_both(typed, None, use=use, delta_softplus=False)
        assert_matches(fast, ref, rtol=rtol, atol=atol)


def test_reset_equals_separate_documents():
    """With resets, each document's outputs are those of the scan run on that document alone."""
    inputs, _ = make_inputs(1, 3, 4, 50, seed=11)
    bounds = [0, 13, 14, 40, 50]  # documents of 13, 1, 26 and 10 tokens
    reset = torch.zeros(1, 50, dtype=torch.bool)
    reset[0, bounds[1:-1]] = True

    def scan(s, e, **kwargs):
        x = {k: (v[..., s:e] if v.dim() == 3 else v) for k, v in inputs.items()}
        return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                              delta_bias=x["delta_bias"], delta_softplus=True, **kwargs)

    y = scan(0, 50, reset=reset, chunk_size=8)
    for s, e in zip(bounds[:-1], bounds[1:]):
        torch.testing.assert_close(y[..., s:e], scan(s, e), rtol=1e-12, atol=1e-12)


def test_gradcheck_tiny():
    """Finite differences through the custom backward, several chunks, with resets."""
    inputs, reset = make_inputs(2, 3, 2, 7, seed=13, reset_rate=0.2)
    xs = [inputs[k].clone().requires_grad_() for k in NAMES]

    def fn(*args):
        u, delta, A, B, C, D, z, delta_bias = args
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=True, reset=reset, chunk_size=3)

    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_bfloat16_inputs_compute_in_float32():
    """Like mamba-ssm's kernel: bf16 in, float32 inside, bf16 out."""
    inputs, _ = make_inputs(2, 4, 8, 33, dtype=torch.float32, seed=17)
    y32 = selective_scan(*(inputs[k] for k in NAMES[:5]), D=inputs["D"], z=inputs["z"])
    bf = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    y16 = selective_scan(*(bf[k] for k in NAMES[:5]), D=bf["D"], z=bf["z"])
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


def test_transposed_views_are_accepted():
    """The mixer passes (batch, D, L) views of time-major memory; results must not change."""
    inputs, reset = make_inputs(2, 6, 4, 40, dtype=torch.float32, seed=19, reset_rate=0.1)
    time_major = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v)
                  for k, v in inputs.items()}
    outs = [selective_scan(*(x[k] for k in NAMES[:5]), D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
                           delta_softplus=True, reset=reset) for x in (inputs, time_major)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-5, 2e-5)])
def test_resets_by_vanishing_decay_equal_the_reset_recurrence(dtype, rtol, atol):
    """scan_with_resets (how the Mamba-1 CUDA path isolates documents) on a scan without resets
    gives the reset recurrence's outputs and every gradient, also for a channel whose slowest decay
    is tiny (|A| = 1e-5: the vanishing delta is then 2e7)."""
    inputs, reset = make_inputs(2, 6, 4, 48, dtype=dtype, reset_rate=0.15)
    inputs["A"][2, 1] = -1e-5
    assert reset.sum() >= 4
    results = []
    for through_decay in (True, False):
        xs = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        if through_decay:
            y = scan_with_resets(selective_scan_fn, xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], xs["D"],
                                 xs["z"], xs["delta_bias"], reset)
        else:
            y = selective_scan_ref(xs["u"], xs["delta"], xs["A"], xs["B"], xs["C"], xs["D"], xs["z"],
                                   xs["delta_bias"], delta_softplus=True, reset=reset)
        cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        results.append((y, dict(zip(xs, torch.autograd.grad(y, list(xs.values()), cot)))))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == dtype
    results = [(y, grads), (y_ref.double(), {k: g.double() for k, g in grads_ref.items()})]
    assert_matches(*results, rtol=rtol, atol=atol)
    # Without the resets the same inputs differ: the test sees the boundaries.
    leaky = selective_scan_ref(*(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                               delta_softplus=True)
    assert (leaky - y_ref.detach()).abs().max() > 1e-2
