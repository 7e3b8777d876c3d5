"""The Mamba-3 mixer (SISO): the chunked scan against its float64 sequential recurrence (values and
gradients), the recurrence against two independent forms (Mamba-2's SSD where the trapezoid reduces
to it, and the paper's complex-valued state), mamba-ssm's parameter layout and init, document
isolation, step == forward, and an LM built from the training config that learns real text."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mamba.config.load import ConfigError, load_config
from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.model.factory import build_model
from mamba.model.mamba3 import Mamba3
from mamba.model.ops.mamba3_scan import mamba3_scan_chunked, mamba3_scan_ref
from mamba.model.ops.ssd import ssd_ref

NAMES = ("C", "B", "x", "adt", "dt", "trap", "angles", "C_bias", "B_bias", "D", "z")


def scan_inputs(batch=2, length=45, nheads=4, headdim=3, ngroups=2, dstate=8, nangles=2, seed=0, reset_rate=0.1):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    dt = F.softplus(rnd(batch, length, nheads))
    adt = -torch.rand(batch, length, nheads, generator=g, dtype=torch.float64) * 3 * dt  # A dt, A in (-3, 0]
    args = dict(C=rnd(batch, length, ngroups, dstate), B=rnd(batch, length, ngroups, dstate),
                x=rnd(batch, length, nheads, headdim), adt=adt, dt=dt, trap=rnd(batch, length, nheads),
                angles=2 * rnd(batch, length, nangles), C_bias=rnd(nheads, dstate), B_bias=rnd(nheads, dstate),
                D=rnd(nheads), z=rnd(batch, length, nheads, headdim))
    reset = torch.rand(batch, length, generator=g) < reset_rate
    return {k: v.requires_grad_() for k, v in args.items()}, reset


def run(fn, args, reset, **kw):
    y = fn(**args, reset=reset, **kw)
    # A fixed random projection as the loss, so that every output element gets its own gradient.
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return y, torch.autograd.grad((y.double() * w).sum(), list(args.values()))


@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("chunk", [8, 16, 64])  # 45 steps: a padded last chunk, and one chunk > L
def test_chunked_equals_sequential_float64(with_reset, chunk):
    args, reset = scan_inputs()
    reset = reset if with_reset else None
    y_ref, g_ref = run(mamba3_scan_ref, args, reset)
    y, g = run(mamba3_scan_chunked, args, reset, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_float32_close_to_float64_reference():
    """float32 inputs compute in float32: outputs within 1e-4, gradients within 1e-3 (relative
    and absolute) of the float64 recurrence on the same values."""
    args, reset = scan_inputs(length=70)
    y_ref, g_ref = run(mamba3_scan_ref, args, reset)
    args32 = {k: v.detach().float().requires_grad_() for k, v in args.items()}
    y, g = run(mamba3_scan_chunked, args32, reset, chunk_size=16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(NAMES, g, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3, msg=name)


def test_long_sequence_angles_keep_float32_precision():
    """4096 tokens with dt ~ 1.7: the rotary angle sum reaches ~2e4 rad, where a float32 running sum
    (one chunk over the whole sequence) is off by ~1e-3 rad. The chunked sum restarts each chunk
    from a carry reduced mod 2 pi (as mamba-ssm's angle kernel), so float32 chunks of 64 stay within
    1e-3 of the float64 scan (outputs up to ~70), over ten times closer than the running sum."""
    args, _ = scan_inputs(batch=1, length=4096, nheads=2, headdim=2, ngroups=1, dstate=4, nangles=2, seed=3,
                          reset_rate=0.0)
    args = {k: v.detach() for k, v in args.items()}
    args["dt"] = args["dt"] + 1.0
    args["angles"] = args["angles"].abs() + 3.0  # tanh ~ 1: ~pi * dt rad per token, all the same sign
    y64 = mamba3_scan_chunked(**args, chunk_size=64)
    args32 = {k: v.float() for k, v in args.items()}
    error = (mamba3_scan_chunked(**args32, chunk_size=64).double() - y64).abs().max()
    running_sum_error = (mamba3_scan_chunked(**args32, chunk_size=4096).double() - y64).abs().max()
    assert error < 1e-3 and 10 * error < running_sum_error, (error, running_sum_error)


def test_reset_equals_running_documents_separately():
    args, _ = scan_inputs(batch=1, length=40)
    args = {k: v.detach() for k, v in args.items()}
    reset = torch.zeros(1, 40, dtype=torch.bool)
    reset[0, [0, 13, 29]] = True
    y = mamba3_scan_chunked(**args, reset=reset, chunk_size=8)
    per_token = ("C", "B", "x", "adt", "dt", "trap", "angles", "z")
    for s, e in ((0, 13), (13, 29), (29, 40)):
        alone = mamba3_scan_ref(**{k: v[:, s:e] if k in per_token else v for k, v in args.items()})
        torch.testing.assert_close(y[:, s:e], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("trapezoid", ["current", "previous"])
def test_trapezoid_ends_reduce_to_mamba2_ssd(trapezoid):
    """Without rotation (angles 0) and with A constant per head, sigmoid(trap) = 1 is Mamba-2's
    exponential-Euler rule, h_t = exp(dt A) h_{t-1} + dt x_t B_t^T: ops/ssd.py's recurrence. And
    sigmoid(trap) = 0 keeps only the other end of the interval, exp(dt_t A) dt_t x_{t-1} B_{t-1}^T:
    the same SSD fed the previous token's input, decayed by one step."""
    args, _ = scan_inputs(ngroups=1)
    a = {k: v.detach() for k, v in args.items()}
    A = -torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2
    a.update(adt=a["dt"] * A, angles=torch.zeros_like(a["angles"]), z=None,
             C_bias=torch.zeros_like(a["C_bias"]), B_bias=torch.zeros_like(a["B_bias"]))
    a["trap"] = torch.full_like(a["trap"], 1e3 if trapezoid == "current" else -1e3)  # sigmoid exactly 1 or 0
    y = mamba3_scan_chunked(**a, chunk_size=16)
    x, B = a["x"], a["B"]
    if trapezoid == "previous":
        x = F.pad(x[:, :-1], (0, 0, 0, 0, 1, 0)) * torch.exp(a["adt"])[..., None]
        B = F.pad(B[:, :-1], (0, 0, 0, 0, 1, 0))
    expected = ssd_ref(x, a["dt"], A, B, a["C"]) + a["x"] * a["D"][:, None]
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_rotations_equal_the_complex_valued_state():
    """The paper's complex-valued SSM: channel pairs (2i, 2i+1) of B and C as complex numbers, the
    state of those channels complex and turned by exp(-i phi_t) at every step (phi_t = pi
    tanh(angles_t) dt_t), the output Re(conj(c) . h); the other channels real. Written here with
    torch's complex128, it equals the scan's rotary form."""
    args, _ = scan_inputs(batch=2, length=30, nheads=2, ngroups=2, dstate=6, nangles=2)
    a = {k: v.detach() for k, v in args.items()}
    y = mamba3_scan_chunked(**a, chunk_size=8)
    S = a["angles"].shape[-1]
    k_all, q_all = a["B"] + a["B_bias"], a["C"] + a["C_bias"]  # (b, L, H, N), groups == heads here

    def as_complex(v):
        return torch.complex(v[..., 0: 2 * S: 2], v[..., 1: 2 * S: 2])

    lam = torch.sigmoid(a["trap"])
    alpha, dt = torch.exp(a["adt"]), a["dt"]
    turn = torch.exp(-1j * math.pi * torch.tanh(a["angles"])[:, :, None, :] * dt[..., None])  # (b, L, H, S)
    h_c = torch.zeros(2, 2, 3, S, dtype=torch.complex128)  # (b, H, P, S): the complex channels
    h_r = torch.zeros(2, 2, 3, 6 - 2 * S, dtype=torch.float64)  # the unrotated channels
    ys = []
    for t in range(30):
        x, kc, kr = a["x"][:, t, :, :, None], as_complex(k_all[:, t])[:, :, None], k_all[:, t, :, None, 2 * S:]
        gamma, beta = (lam * dt)[:, t, :, None, None], ((1 - lam) * dt * alpha)[:, t, :, None, None]
        h_c = alpha[:, t, :, None, None] * turn[:, t, :, None] * h_c + gamma * x * kc
        h_r = alpha[:, t, :, None, None] * h_r + gamma * x * kr
        if t > 0:  # the previous token's input, turned by this step's angle like the state
            x_prev = a["x"][:, t - 1, :, :, None]
            h_c = h_c + beta * turn[:, t, :, None] * x_prev * as_complex(k_all[:, t - 1])[:, :, None]
            h_r = h_r + beta * x_prev * k_all[:, t - 1, :, None, 2 * S:]
        out = (torch.conj(as_complex(q_all[:, t]))[:, :, None] * h_c).real.sum(-1) \
            + (h_r * q_all[:, t, :, None, 2 * S:]).sum(-1)
        ys.append((out + a["D"][:, None] * a["x"][:, t]) * F.silu(a["z"][:, t]))
    torch.testing.assert_close(y, torch.stack(ys, 1), rtol=1e-10, atol=1e-10)


def small(**kw):
    torch.manual_seed(0)
    return Mamba3(**{**dict(d_model=32, d_state=16, headdim=16, ngroups=2, chunk_size=8, kernels_mode="torch"), **kw})


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_parameter_names_shapes_and_init_are_mamba_ssm(outproj_norm):
    # Expected layout written from mamba-ssm 2.3.2's mamba_ssm/modules/mamba3.py (is_mimo=False):
    # in_proj (2E + 2 G N + 3 H + S, d_model) in the order [z, x, B, C, dd_dt, dd_A, trap, angles],
    # S = num_rope_angles = int(d_state * rope_fraction) // 2 (rounded to even first);
    # B_bias, C_bias (H, mimo_rank = 1, N); B_norm, C_norm RMSNorm(d_state); norm only with
    # is_outproj_norm (RMSNormGated(d_inner, group_size=headdim)); no Linear biases.
    m = small(is_outproj_norm=outproj_norm)  # E 64, H 4, G 2, N 16, S 4
    expected = {"in_proj.weight": (2 * 64 + 2 * 2 * 16 + 3 * 4 + 4, 32), "dt_bias": (4,), "B_bias": (4, 1, 16),
                "C_bias": (4, 1, 16), "B_norm.weight": (16,), "C_norm.weight": (16,), "D": (4,),
                "out_proj.weight": (32, 64)}
    if outproj_norm:
        expected["norm.weight"] = (64,)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)} == {"dt_bias", "D"}
    assert small(rope_fraction=1.0).num_rope_angles == 8 and small(d_state=14).num_rope_angles == 3
    for p in (m.B_bias, m.C_bias, m.D, m.B_norm.weight, m.C_norm.weight):
        assert torch.equal(p, torch.ones_like(p))
    dt = F.softplus(m.dt_bias)
    assert bool(((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all())
    bf16 = Mamba3(32, d_state=16, headdim=16, kernels_mode="torch", dtype=torch.bfloat16)
    assert {n for n, p in bf16.named_parameters() if p.dtype == torch.float32} == {"dt_bias", "B_bias", "C_bias", "D"}
    with pytest.raises(ValueError, match="rope_fraction=0.25"):
        small(rope_fraction=0.25)


def reference_forward(m, u, reset):
    """The mixer written out from mamba-ssm's Mamba3.forward with the sequential reference scan."""
    E, H, P, G, N, S = m.d_inner, m.nheads, m.headdim, m.ngroups, m.d_state, m.num_rope_angles
    proj = m.in_proj(u)
    bounds = torch.tensor([0, E, E, G * N, G * N, H, H, H, S]).cumsum(0).tolist()
    z, x, B, C, dd_dt, dd_A, trap, angles = (proj[..., lo:hi] for lo, hi in zip(bounds, bounds[1:]))
    A = -torch.clamp(F.softplus(dd_A), min=m.A_floor)
    dt = F.softplus(dd_dt + m.dt_bias)

    def rms(v, weight, groups):
        v = v.unflatten(-1, (groups, -1))
        return (v / torch.sqrt(v.square().mean(-1, keepdim=True) + 1e-5)).flatten(-2) * weight

    b, L = u.shape[:2]
    B = rms(B.unflatten(-1, (G, N)), m.B_norm.weight, 1)
    C = rms(C.unflatten(-1, (G, N)), m.C_norm.weight, 1)
    z = z.unflatten(-1, (H, P))
    y = mamba3_scan_ref(C, B, x.unflatten(-1, (H, P)), A * dt, dt, trap, angles, m.C_bias[:, 0], m.B_bias[:, 0], m.D,
                        None if m.is_outproj_norm else z, reset).reshape(b, L, E)
    if m.is_outproj_norm:
        y = rms(y, m.norm.weight, H) * F.silu(z.reshape(b, L, E))
    return m.out_proj(y)


def off_init(m):
    """m in float64 with every parameter moved off its init, so that every one matters."""
    m = m.double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def check_mixer_against_reference(m, reference, length, resets):
    """m's output and the gradients of its input and every parameter equal `reference`'s (fp64
    1e-10 / 1e-9) on 2 rows of `length` tokens with document starts at `resets` (row, t) pairs."""
    m = off_init(m)
    u = torch.randn(2, length, 32, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(2, length, dtype=torch.bool)
    for row, t in resets:
        reset[row, t] = True
    out, ref = m(u, reset=reset), reference(m, u, reset)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    params = [u] + list(m.parameters())
    for a, b in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def check_step_equals_forward(m, length):
    """Token-by-token `step` from an empty cache equals the forward (fp64, 1e-10); returns the
    cache's shapes."""
    m = off_init(m)
    with torch.no_grad():
        u = torch.randn(2, length, 32, dtype=torch.float64)
        full = m(u)
        cache = m.allocate_inference_cache(2)
        stepped = torch.stack([m.step(u[:, t], *cache) for t in range(length)], dim=1)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-10)
    return [tuple(s.shape) for s in cache]


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_mixer_forward_and_gradients_match_reference_float64(outproj_norm):
    check_mixer_against_reference(small(is_outproj_norm=outproj_norm), reference_forward, 37, [(0, 11), (1, 30)])


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_mixer_step_equals_forward_float64(outproj_norm):
    shapes = check_step_equals_forward(small(is_outproj_norm=outproj_norm), 13)
    assert shapes == [(2, 4, 4), (2, 4, 16, 16), (2, 1, 4, 16), (2, 4, 16)]


def lm(seed=0, **kw):
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(**{**dict(d_model=32, n_layer=2, vocab_size=50, ssm_layer="mamba3", d_state=16,
                                                    headdim=16, ngroups=2, chunk_size=8, kernels="torch"), **kw}))


def test_lm_step_by_step_logits_equal_full_forward_float64():
    model = lm(1).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 50, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    cache = model.allocate_inference_cache(batch=3)
    stepped = torch.stack([model.step(ids[:, t], cache) for t in range(29)], dim=1)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-10)
    bf16 = lm(2).to(torch.bfloat16)
    assert all(s.dtype == torch.float32 for layer in bf16.allocate_inference_cache(2) for s in layer)


DOCS = (13, 21, 30)  # three documents packed into a 64-token window, chunks of 8


def test_documents_are_isolated_in_the_lm():
    m = lm(3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (1, sum(DOCS)), generator=g)
    other = ids.clone()
    other[0, : DOCS[0]] = torch.randint(0, 50, (DOCS[0],), generator=g)  # a different first document
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    with torch.no_grad():
        out, out_other = m(ids, pos), m(other, pos)
        alone = m(ids[:, DOCS[0]: DOCS[0] + DOCS[1]], torch.arange(DOCS[1])[None])
    assert not torch.equal(out[:, : DOCS[0]], out_other[:, : DOCS[0]])
    assert torch.equal(out[:, DOCS[0]:], out_other[:, DOCS[0]:])  # the later documents: bit for bit
    torch.testing.assert_close(out[:, DOCS[0]: DOCS[0] + DOCS[1]], alone, rtol=1e-5, atol=1e-5)
    # Gradients do not cross either: the loss on the later documents ignores the first one's embeddings.
    hidden = m.backbone.embedding(ids).detach().requires_grad_()
    h, residual = hidden, None
    for layer in m.backbone.layers:
        h, residual = layer(h, residual, reset=m.document_starts(pos))
    (h + residual)[:, DOCS[0]:].square().sum().backward()
    assert torch.count_nonzero(hidden.grad[:, : DOCS[0]]) == 0 and torch.count_nonzero(hidden.grad[:, DOCS[0]:]) > 0
    with torch.no_grad():  # and without isolation the first document does leak into the others
        assert not torch.equal(lm(3, document_isolation=False)(other, pos)[:, DOCS[0]:], out[:, DOCS[0]:])


def test_ssm_parameters_stay_float32_under_bf16_autocast():
    m = small()
    u = torch.randn(1, 20, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(u)
    out.float().square().sum().backward()
    for p in (m.dt_bias, m.B_bias, m.C_bias, m.D):
        assert p.dtype == p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    torch.testing.assert_close(out.float(), m(u).detach(), rtol=0.1, atol=0.05)


def test_config_validation_names_the_key():
    for overrides, message in ((["model.headdim=48"], r"model.headdim=48 must divide .* \(ssm_layer mamba3\)"),
                               (["model.ngroups=5"], r"model.ngroups=5 must divide"),
                               (["model.rope_fraction=0.3"], r"model.rope_fraction=0.3: choose 0.5 or 1.0"),
                               (["model.d_state=2"], r"model.d_state=2 .* rotates no channel pair"),
                               (["model.A_floor=-1e-4"], r"model.A_floor=-0.0001 must be positive")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.ssm_layer=mamba3", "model.d_model=64", "model.headdim=32", *overrides])


def test_lm_from_config_learns_real_text():
    """model.ssm_layer=mamba3 through load_config and build_model (also via the meta device), then
    a few AdamW steps on byte tokens of CPython's json/decoder.py: the loss falls."""
    cfg = load_config(None, ["model.ssm_layer=mamba3", "model.d_model=32", "model.n_layer=2", "model.d_state=16",
                             "model.headdim=16", "model.chunk_size=16", "model.vocab_size=256", "model.kernels=torch",
                             "model.is_outproj_norm=true"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    mixer = model.backbone.layers[0].mixer
    assert isinstance(mixer, Mamba3) and (mixer.nheads, mixer.chunk_size, mixer.is_outproj_norm) == (4, 16, True)
    meta = build_model(cfg, device="meta")
    meta.to_empty(device="cpu")
    meta.init_weights()  # materialised from meta: same shapes, finite init, flags restored
    assert {n for n, p in meta.named_parameters() if getattr(p, "_no_weight_decay", False)} == {
        n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    ids = torch.tensor(list((Path(json.__file__).parent / "decoder.py").read_bytes()[:4 * 65])).view(4, 65)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.5, losses  # from ~ln(256) = 5.5 nats
