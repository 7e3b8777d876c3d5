"""Mamba-3's MIMO form (is_mimo, mimo_rank R): the chunked scan against the float64 sequential
recurrence (values and gradients, every R), the recurrence against independent forms (rank 1 is
SISO with the channels re-paired; the complex-valued state with channels (i, i + N/2) as one complex
number), the mixer against mamba-ssm's Mamba3.forward written out, its parameters, step ==
forward, document isolation in an LM, and the config keys."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba.config.load import ConfigError, load_config
from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.model.factory import build_model
from mamba.model.mamba3 import Mamba3
from mamba.model.ops.mamba3_scan import mamba3_scan_chunked, mamba3_scan_ref
from test_mamba3 import check_mixer_against_reference, check_step_equals_forward

NAMES = ("C", "B", "x", "adt", "dt", "trap", "angles", "C_bias", "B_bias", "D", "z", "mimo_x", "mimo_z", "mimo_o")


def mimo_inputs(batch=2, length=37, nheads=4, headdim=3, ngroups=2, dstate=8, nangles=2, rank=3, seed=0,
                reset_rate=0.1, contract=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    dt = F.softplus(rnd(batch, length, nheads))
    adt = -torch.rand(batch, length, nheads, generator=g, dtype=torch.float64) * 3 * dt
    args = dict(C=rnd(batch, length, rank, ngroups, dstate), B=rnd(batch, length, rank, ngroups, dstate),
                x=rnd(batch, length, nheads, headdim), adt=adt, dt=dt, trap=rnd(batch, length, nheads),
                angles=2 * rnd(batch, length, nangles), C_bias=rnd(nheads, rank, dstate),
                B_bias=rnd(nheads, rank, dstate), D=rnd(nheads), z=rnd(batch, length, nheads, headdim),
                mimo_x=rnd(nheads, rank, headdim), mimo_z=rnd(nheads, rank, headdim), mimo_o=rnd(nheads, rank, headdim))
    if not contract:  # the output norm's layout: no gate, no sum over the ranks
        args.update(z=None, mimo_z=None, mimo_o=None)
    reset = torch.rand(batch, length, generator=g) < reset_rate
    return {k: v.requires_grad_() for k, v in args.items() if v is not None}, reset


def run(fn, args, reset, **kw):
    y = fn(**args, reset=reset, **kw)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return y, torch.autograd.grad((y.double() * w).sum(), list(args.values()))


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("chunk", [4, 16, 64])  # 37 steps: a padded last chunk, and one chunk > L
@pytest.mark.parametrize("with_reset", [False, True])
def test_chunked_equals_sequential_float64(rank, chunk, with_reset):
    args, reset = mimo_inputs(rank=rank)
    reset = reset if with_reset else None
    y_ref, g_ref = run(mamba3_scan_ref, args, reset)
    y, g = run(mamba3_scan_chunked, args, reset, chunk_size=chunk)
    assert y.shape == (2, 37, 4, 3)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_uncontracted_outputs_and_float32():
    """Without mimo_o (the output norm's case) the R outputs come back, (b, L, R, H, P), and equal
    the reference; float32 inputs stay within 1e-4 (outputs) and 1e-3 (gradients) of float64."""
    args, reset = mimo_inputs(rank=4, contract=False, length=50)
    y_ref, g_ref = run(mamba3_scan_ref, args, reset)
    assert y_ref.shape == (2, 50, 4, 4, 3)
    args32 = {k: v.detach().float().requires_grad_() for k, v in args.items()}
    y, g = run(mamba3_scan_chunked, args32, reset, chunk_size=8)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


def halves_to_pairs(v, S):
    """Reorder the last dim so that MIMO's rotated channels (i, i + N/2) sit at (2i, 2i+1), SISO's
    pairs, and the unrotated ones after them in their order."""
    N = v.shape[-1]
    order = [c for i in range(S) for c in (i, i + N // 2)]
    order += [c for c in range(N) if c not in order]
    return v[..., order]


def test_rank_one_is_siso_with_the_channels_re_paired():
    """R = 1 with mimo_x = mimo_z = mimo_o = 1 is the SISO scan up to the rotary pairing, which is
    a fixed permutation of the N channels of B, C and their biases (q . k does not change)."""
    args, reset = mimo_inputs(rank=1, dstate=8, nangles=2)
    a = {k: v.detach() for k, v in args.items()}
    for name in ("mimo_x", "mimo_z", "mimo_o"):
        a[name] = torch.ones_like(a[name])
    y = mamba3_scan_chunked(**a, reset=reset, chunk_size=8)
    siso = {k: v for k, v in a.items() if not k.startswith("mimo")}
    for name in ("C", "B"):
        siso[name] = halves_to_pairs(a[name][:, :, 0], 2)
    for name in ("C_bias", "B_bias"):
        siso[name] = halves_to_pairs(a[name][:, 0], 2)
    torch.testing.assert_close(y, mamba3_scan_ref(**siso, reset=reset), rtol=1e-10, atol=1e-10)


def test_rotations_equal_the_complex_valued_state():
    """The paper's complex-valued MIMO state, written with complex128: channel i and i + N/2 form one
    complex number for i < S, the state of those channels turned by exp(-i phi_t) each step, every
    rank's input summed into it and every rank reading it; the other channels real."""
    R, H, P, N, S, L = 2, 2, 3, 8, 2, 20
    args, _ = mimo_inputs(batch=1, length=L, nheads=H, headdim=P, ngroups=H, dstate=N, nangles=S, rank=R)
    a = {k: v.detach() for k, v in args.items()}
    y = mamba3_scan_chunked(**a, chunk_size=8)
    keys = a["B"][0] + a["B_bias"].transpose(0, 1)  # (L, R, H, N), groups == heads here
    queries = a["C"][0] + a["C_bias"].transpose(0, 1)
    rotated = [i for i in range(S)] + [N // 2 + i for i in range(S)]
    plain = [c for c in range(N) if c not in rotated]

    def as_complex(v):
        return torch.complex(v[..., :S], v[..., N // 2: N // 2 + S])

    lam, dt = torch.sigmoid(a["trap"][0]), a["dt"][0]
    alpha = torch.exp(a["adt"][0])
    turn = torch.exp(-1j * math.pi * torch.tanh(a["angles"][0])[:, None, :] * dt[..., None])  # (L, H, S)
    inputs = a["x"][0][:, None] * a["mimo_x"].transpose(0, 1)  # (L, R, H, P)
    h_c = torch.zeros(H, P, S, dtype=torch.complex128)
    h_r = torch.zeros(H, P, len(plain), dtype=torch.float64)
    ys = []
    for t in range(L):
        gamma, beta = (lam * dt)[t, :, None, None], ((1 - lam) * dt * alpha)[t, :, None, None]
        h_c = alpha[t, :, None, None] * turn[t, :, None] * h_c
        h_r = alpha[t, :, None, None] * h_r
        for s, w in ((t, gamma),) + (((t - 1, beta),) if t > 0 else ()):
            for r in range(R):
                spin = turn[t, :, None] if s < t else 1
                h_c = h_c + w * spin * inputs[s, r, :, :, None] * as_complex(keys[s, r])[:, None]
                h_r = h_r + w * inputs[s, r, :, :, None] * keys[s, r][:, None, plain]
        out = 0
        for r in range(R):
            read = (torch.conj(as_complex(queries[t, r]))[:, None] * h_c).real.sum(-1) \
                + (h_r * queries[t, r][:, None, plain]).sum(-1)
            gate = F.silu(a["z"][0, t] * a["mimo_z"][:, r])
            out = out + a["mimo_o"][:, r] * (read + a["D"][:, None] * inputs[t, r]) * gate
        ys.append(out)
    torch.testing.assert_close(y[0], torch.stack(ys), rtol=1e-10, atol=1e-10)


def small(**kw):
    torch.manual_seed(0)
    return Mamba3(**{**dict(d_model=32, d_state=16, headdim=16, ngroups=2, chunk_size=4, is_mimo=True, mimo_rank=2,
                            kernels_mode="torch"), **kw})


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_parameter_names_shapes_and_init_are_mamba_ssm(outproj_norm):
    # Written from mamba-ssm 2.3.2's mamba_ssm/modules/mamba3.py with is_mimo=True: in_proj
    # (2E + 2 R G N + 3H + S, d_model); B_bias, C_bias (H, R, N) of ones; mimo_x, mimo_z, mimo_o
    # (H, R, P) initialised 1/R, 1, 1/R; the rest as SISO.
    m = small(is_outproj_norm=outproj_norm, mimo_rank=4)  # E 64, H 4, P 16, G 2, N 16, S 4, R 4
    expected = {"in_proj.weight": (2 * 64 + 2 * 4 * 2 * 16 + 3 * 4 + 4, 32), "dt_bias": (4,), "B_bias": (4, 4, 16),
                "C_bias": (4, 4, 16), "mimo_x": (4, 4, 16), "mimo_z": (4, 4, 16), "mimo_o": (4, 4, 16),
                "B_norm.weight": (16,), "C_norm.weight": (16,), "D": (4,), "out_proj.weight": (32, 64)}
    if outproj_norm:
        expected["norm.weight"] = (64,)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    for p, value in ((m.B_bias, 1.0), (m.C_bias, 1.0), (m.mimo_x, 0.25), (m.mimo_z, 1.0), (m.mimo_o, 0.25)):
        assert torch.equal(p, torch.full_like(p, value))
    assert {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)} == {"dt_bias", "D"}
    bf16 = small(dtype=torch.bfloat16)
    assert {n for n, p in bf16.named_parameters() if p.dtype == torch.float32} == {
        "dt_bias", "B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o"}
    with pytest.raises(ValueError, match="d_state=11 must be even"):
        small(d_state=10 + 1)
    with pytest.raises(ValueError, match="mimo_rank=0"):
        small(mimo_rank=0)


def reference_forward(m, u, reset):
    """mamba-ssm's Mamba3.forward (is_mimo) written out over the sequential reference scan."""
    E, H, P, G, N, S, R = m.d_inner, m.nheads, m.headdim, m.ngroups, m.d_state, m.num_rope_angles, m.mimo_rank
    proj = m.in_proj(u)
    bounds = torch.tensor([0, E, E, R * G * N, R * G * N, H, H, H, S]).cumsum(0).tolist()
    z, x, B, C, dd_dt, dd_A, trap, angles = (proj[..., lo:hi] for lo, hi in zip(bounds, bounds[1:]))
    A = -torch.clamp(F.softplus(dd_A), min=m.A_floor)
    dt = F.softplus(dd_dt + m.dt_bias)

    def rms(v, weight):
        return v / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-5) * weight

    b, L = u.shape[:2]
    B = rms(B.unflatten(-1, (R, G, N)), m.B_norm.weight)  # "b l (r g n)"
    C = rms(C.unflatten(-1, (R, G, N)), m.C_norm.weight)
    z, x = z.unflatten(-1, (H, P)), x.unflatten(-1, (H, P))
    if not m.is_outproj_norm:
        y = mamba3_scan_ref(C, B, x, A * dt, dt, trap, angles, m.C_bias, m.B_bias, m.D, z, reset,
                            m.mimo_x, m.mimo_z, m.mimo_o)
        return m.out_proj(y.reshape(b, L, E))
    y = mamba3_scan_ref(C, B, x, A * dt, dt, trap, angles, m.C_bias, m.B_bias, m.D, None, reset, m.mimo_x)
    z_r = torch.einsum("blhp,hrp->blrhp", z, m.mimo_z)  # mamba-ssm's order: norm, gate, then mimo_o
    y = rms(y, m.norm.weight.view(H, P)) * F.silu(z_r)
    return m.out_proj(torch.einsum("blrhp,hrp->blhp", y, m.mimo_o).reshape(b, L, E))


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_mixer_forward_and_gradients_match_reference_float64(outproj_norm):
    check_mixer_against_reference(small(is_outproj_norm=outproj_norm), reference_forward, 29, [(0, 11), (1, 20)])


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_mixer_step_equals_forward_float64(outproj_norm):
    shapes = check_step_equals_forward(small(is_outproj_norm=outproj_norm, mimo_rank=3), 11)
    assert shapes == [(2, 4, 4), (2, 4, 16, 16), (2, 3, 4, 16), (2, 4, 16)]


def test_documents_are_isolated_and_lm_steps_equal_forward():
    torch.manual_seed(3)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_layer="mamba3", d_state=16, headdim=16, ngroups=2,
                         chunk_size=8, kernels="torch", is_mimo=True, mimo_rank=2)
    m = MambaLMHeadModel(config).double()
    docs = (13, 21, 30)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (1, sum(docs)), generator=g)
    pos = torch.cat([torch.arange(n) for n in docs])[None]
    with torch.no_grad():
        out = m(ids, pos)
        for start, n in zip((0, 13, 34), docs):
            alone = m(ids[:, start: start + n], torch.arange(n)[None])
            torch.testing.assert_close(out[:, start: start + n], alone, rtol=1e-10, atol=1e-10)
        cache = m.allocate_inference_cache(batch=1)
        stepped = torch.stack([m.step(ids[:, t], cache) for t in range(13)], dim=1)
    torch.testing.assert_close(stepped, out[:, :13], rtol=0, atol=1e-10)


def test_config_keys_build_the_mimo_mixer_and_are_validated():
    cfg = load_config(None, ["model.ssm_layer=mamba3", "model.d_model=32", "model.n_layer=1", "model.d_state=16",
                             "model.headdim=16", "model.chunk_size=16", "model.vocab_size=256", "model.kernels=torch",
                             "model.is_mimo=true", "model.mimo_rank=2"]).model
    mixer = build_model(cfg).backbone.layers[0].mixer
    assert isinstance(mixer, Mamba3) and (mixer.is_mimo, mixer.mimo_rank, tuple(mixer.mimo_x.shape)) == (True, 2, (4, 2, 16))
    for overrides, message in ((["model.mimo_rank=0"], r"model.mimo_rank=0 must be >= 1"),
                               (["model.d_state=13"], r"model.d_state=13 must be even with model.is_mimo"),
                               (["model.mimo_rnak=2"], r"mimo_rnak"),
                               (["model.ssm_layer=mamba2"], r"model.is_mimo=true is Mamba-3's MIMO form")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.ssm_layer=mamba3", "model.d_model=64", "model.headdim=32", "model.is_mimo=true",
                               *overrides])
