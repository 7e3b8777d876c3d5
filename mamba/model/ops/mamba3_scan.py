"""Mamba-3's scan in pure PyTorch, SISO and MIMO: an exact chunked version, the single-token update,
and the sequential reference built from it.

Model: Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State Space Principles"
(arXiv 2603.15569), sections "Exponential-Trapezoidal Discretization", "Complex-Valued SSMs" (the
complex state written as a data-dependent rotary embedding of B and C) and "Multi-Input,
Multi-Output" (MIMO). Semantics are those of mamba-ssm 2.3.2's `mamba3_siso_combined`
(ops/triton/mamba3/) and, with mimo_x given, `mamba3_mimo` (ops/tilelang/mamba3/), argument for
argument.

Shapes, SISO: C, B (batch, L, G, N) with G = ngroups B/C heads (head h reads group h // (H / G)),
already RMS-normalised; x (batch, L, H, P) with H heads of P = headdim channels; adt, dt, trap
(batch, L, H); angles (batch, L, S) or (batch, L, H, S), S <= N / 2 rotary angles; C_bias, B_bias
(H, N); D (H,); z (batch, L, H, P) optional gate. MIMO of rank R: C, B (batch, L, R, G, N), biases
(H, R, N), and mimo_x, mimo_z, mimo_o (H, R, P) (mamba-ssm's MIMO_V, MIMO_Z, MIMO_Out). Per head,
with the state h_t (P, N), r = 1..R (R = 1 and every mimo_* = 1 for SISO):

    lam_t   = sigmoid(trap_t)                   trapezoid weight in [0, 1] (1: Mamba-2's Euler rule)
    alpha_t = exp(adt_t)                         adt = A_t dt_t <= 0, A_t data-dependent (the mixer)
    beta_t  = (1 - lam_t) dt_t alpha_t           weight of the previous token's input
    gamma_t = lam_t dt_t                         weight of the current token's input
    theta_t = theta_{t-1} + pi tanh(angles_t) dt_t          (S angles, kept mod 2 pi)
    q_tr    = R(theta_t) (C_tr + C_bias_r),  k_tr = R(theta_t) (B_tr + B_bias_r)
    v_tr    = x_t * mimo_x_r                     the R inputs, each a per-channel scaling of x
    h_t     = alpha_t h_{t-1} + beta_t sum_r v_{t-1,r} k_{t-1,r}^T + gamma_t sum_r v_tr k_tr^T
    y_tr    = (h_t q_tr + D v_tr) * silu(z_t * mimo_z_r)
    y_t     = sum_r mimo_o_r * y_tr              (no mimo_o: the R outputs come back, (.., R, H, P))

R(theta) rotates channel pairs by theta_i, i < S, and leaves the other channels as they are: the
real form of a complex diagonal transition (the paper's "RoPE trick": rotating B and C by the
accumulated angle equals rotating the state at each step). SISO pairs channels (2i, 2i+1), MIMO
channels (i, i + N/2), as mamba-ssm's two kernels do (its Mamba3.step: "rotate_pairwise = not
is_mimo"). `reset` (batch, L) bool, True at document starts: there h_{t-1}, the previous token's
input term and theta_{t-1} are all dropped (mamba-ssm's varlen cu_seqlens starts each sequence so).

Chunked algorithm (ops/ssd.py's four steps, time cut into chunks of Q tokens). Unrolled, the
recurrence is y_ir = sum_{j <= i} W[i, j] sum_r' (q_ir . k_jr') v_jr' + D v_ir with
    W[i, j] = exp(a_{j+1} + ... + a_i) * scale_j   for j < i,   scale_j = gamma_j + (1 - lam_{j+1}) dt_{j+1}
    W[i, i] = gamma_i
(token j's input reaches later states through gamma_j and, one step later, beta_{j+1}, which carries
alpha_{j+1}; the "(1 - lam_{j+1}) dt_{j+1}" is 0 after the last token and before a document start).
That is SSD with per-head keys and queries, the input weight scale_j, and the diagonal weighted
by gamma alone; MIMO makes each token R rows (i, r) sharing token i's weights, so a chunk is an
SSD block of Q * R rows (mamba-ssm's MIMO kernel does the same, hence its chunk of 64 / R). The
state carried between chunks is the sum with scale_j for every j (so it already holds the beta term
the next token adds). The angles are a segmented cumulative sum done the same way: inside a chunk,
and a carry (mod 2 pi) from chunk to chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba.model.ops.ssd import _segsum, states_entering

TWO_PI = 2 * math.pi


def rotate_pairs(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """v (..., N), theta (..., S) with 2S <= N: channel pair (2i, 2i+1) rotated by theta_i for
    i < S (mamba-ssm's SISO "rotate_pairwise" layout), channels 2S.. unchanged."""
    S = theta.shape[-1]
    pairs = v[..., : 2 * S].unflatten(-1, (S, 2))
    v0, v1 = pairs[..., 0], pairs[..., 1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotated = torch.stack((v0 * cos - v1 * sin, v0 * sin + v1 * cos), dim=-1).flatten(-2)
    return torch.cat((rotated, v[..., 2 * S:]), dim=-1)


def rotate_halves(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """v (..., N), theta (..., S) with S <= N / 2: channels (i, i + N/2) rotated by theta_i for
    i < S (mamba-ssm's MIMO layout: rope_fraction 0.5 turns the first quarter with the third),
    the others unchanged."""
    S, half = theta.shape[-1], v.shape[-1] // 2
    v0, v1 = v[..., :S], v[..., half: half + S]
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.cat((v0 * cos - v1 * sin, v[..., S:half], v0 * sin + v1 * cos, v[..., half + S:]), dim=-1)


def angle_increments(angles: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """pi tanh(angles) dt: (batch, [L,] H, S), the per-token rotation (angles (.., S) shared by
    the heads, or (.., H, S) per head; dt (.., H))."""
    if angles.dim() == dt.dim():  # (batch, [L,] S): one set of angles for every head
        angles = angles.unsqueeze(-2)
    return math.pi * torch.tanh(angles) * dt[..., None]


def _per_head(t: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    """(.., G, N) -> (.., H, N): head h reads group h // (H / G) (mamba-ssm's GQA layout)."""
    return t.repeat_interleave(nheads // t.shape[dim], dim=dim)


def _queries_keys_inputs(C, B, x, theta, C_bias, B_bias, mimo_x):
    """q, k (.., R, H, N) rotated and v (.., R, H, P) for C, B (.., [R,] G, N), x (.., H, P), theta
    (.., H, S) and the biases (H, [R,] N): the SISO layout gets R = 1."""
    mimo = mimo_x is not None
    if not mimo:
        C, B, C_bias, B_bias = C.unsqueeze(-3), B.unsqueeze(-3), C_bias.unsqueeze(1), B_bias.unsqueeze(1)
    rotate = rotate_halves if mimo else rotate_pairs
    nheads, theta = x.shape[-2], theta.unsqueeze(-3)  # (.., 1, H, S): every rank turns alike
    q = rotate(_per_head(C, nheads, -2) + C_bias.transpose(0, 1), theta)
    k = rotate(_per_head(B, nheads, -2) + B_bias.transpose(0, 1), theta)
    v = x.unsqueeze(-3) if not mimo else x.unsqueeze(-3) * mimo_x.transpose(0, 1)
    return q, k, v


def _output(y, v, D, z, mimo_z, mimo_o, mimo):
    """y (.., R, H, P) = h q -> + D v, gated by silu(z * mimo_z), contracted with mimo_o:
    (.., H, P), or (.., R, H, P) for MIMO without mimo_o."""
    if D is not None:
        y = y + D[:, None] * v
    if z is not None:
        gate = z.unsqueeze(-3) if not mimo else z.unsqueeze(-3) * mimo_z.transpose(0, 1)
        y = y * F.silu(gate)
    if not mimo:
        return y.squeeze(-3)
    if mimo_o is None:
        return y
    return torch.einsum("...rhp,rhp->...hp", y, mimo_o.transpose(0, 1))


def mamba3_step_update(states, C, B, x, adt, dt, trap, angles, C_bias, B_bias, D=None, z=None,
                       mimo_x=None, mimo_z=None, mimo_o=None):
    """One token of the recurrence (module doc), without in-place writes (so autograd can run the
    reference through it). states = (angle_state (b, H, S), ssm_state (b, H, P, N), k_state
    (b, R, H, N) (the previous token's rotated B), v_state (b, H, P) (its x)), mamba-ssm's cache
    layout; C, B (b, [R,] G, N); x (b, H, P); adt, dt, trap (b, H); angles (b, S) or (b, H, S).
    Returns (y (b, H, P) (or (b, R, H, P): MIMO without mimo_o), the new states)."""
    angle_state, ssm_state, k_state, v_state = states
    mimo = mimo_x is not None
    lam = torch.sigmoid(trap)
    alpha = torch.exp(adt)
    beta, gamma = (1 - lam) * dt * alpha, lam * dt  # (b, H)
    theta = angle_state + angle_increments(angles, dt)
    theta = theta - TWO_PI * torch.floor(theta / TWO_PI)  # mod 2 pi, as mamba-ssm's angle state
    q, k, v = _queries_keys_inputs(C, B, x, theta, C_bias, B_bias, mimo_x)  # (b, R, H, N|P)
    v_previous = v_state.unsqueeze(1) if not mimo else v_state.unsqueeze(1) * mimo_x.transpose(0, 1)
    previous = torch.einsum("brhp,brhn->bhpn", v_previous, k_state)  # sum_r v_{t-1,r} k_{t-1,r}^T
    current = torch.einsum("brhp,brhn->bhpn", v, k)
    h = alpha[..., None, None] * ssm_state + beta[..., None, None] * previous + gamma[..., None, None] * current
    y = _output(torch.einsum("bhpn,brhn->brhp", h, q), v, D, z, mimo_z, mimo_o, mimo)
    return y, (theta, h, k, x)


def zero_states(batch, nheads, headdim, dstate, nangles, rank=1, **options):
    """An empty context: (angle_state, ssm_state, k_state, v_state) of mamba3_step_update."""
    return (torch.zeros(batch, nheads, nangles, **options), torch.zeros(batch, nheads, headdim, dstate, **options),
            torch.zeros(batch, rank, nheads, dstate, **options), torch.zeros(batch, nheads, headdim, **options))


def mamba3_scan_ref(C, B, x, adt, dt, trap, angles, C_bias, B_bias, D=None, z=None, reset=None,
                    mimo_x=None, mimo_z=None, mimo_o=None):
    """The recurrence one Python step per token (mamba3_step_update): the ground truth of the tests
    (use float64). Arguments and result as mamba3_scan_chunked."""
    batch, length, nheads, headdim = x.shape
    rank = 1 if mimo_x is None else mimo_x.shape[1]
    states = zero_states(batch, nheads, headdim, B.shape[-1], angles.shape[-1], rank, dtype=x.dtype,
                         device=x.device)
    ys = []
    for t in range(length):
        if reset is not None:  # a document starts: nothing of the previous one is carried
            keep = (~reset[:, t]).to(x.dtype)
            states = tuple(s * keep.view(-1, *([1] * (s.dim() - 1))) for s in states)
        y, states = mamba3_step_update(
            states, C[:, t], B[:, t], x[:, t], adt[:, t], dt[:, t], trap[:, t], angles[:, t], C_bias, B_bias, D,
            None if z is None else z[:, t], mimo_x, mimo_z, mimo_o)
        ys.append(y)
    return torch.stack(ys, dim=1)


def _chunked_angles(phi: torch.Tensor, reset: torch.Tensor | None, Q: int) -> torch.Tensor:
    """theta_t = the sum of phi over the document up to t. phi (b, nc * Q, H, S) -> same shape.

    Per chunk an inclusive cumulative sum (small numbers: Q tokens of at most pi dt each); where a
    document starts inside the chunk, the sum since that start; otherwise plus the carry from the
    previous chunks, reduced mod 2 pi as mamba-ssm's angle kernel does so that float32 keeps its
    precision over long sequences. With document starts the in-chunk sum is a segmented scan
    (log2 Q doubling steps, each adding the partial sum d tokens back unless a start lies between):
    it never adds and subtracts another document's angles, so a document's result does not depend
    on its predecessor even in the last bit (as a difference of cumulative sums would).
    """
    b, total, H, S = phi.shape
    nc = total // Q
    sums = phi.view(b, nc, Q, H, S)
    if reset is None:
        sums = torch.cumsum(sums, dim=2)
        seen = torch.zeros(b, nc, Q, 1, 1, dtype=torch.bool, device=phi.device)
    else:
        seen = reset.view(b, nc, Q, 1, 1)  # becomes: a document starts in the chunk at or before i
        d = 1
        while d < Q:
            back = F.pad(sums[:, :, :-d], (0, 0, 0, 0, d, 0))  # sums[i - d], 0 before the chunk
            sums = torch.where(seen, sums, sums + back)
            seen = seen | F.pad(seen[:, :, :-d], (0, 0, 0, 0, d, 0))
            d *= 2
    carries = [sums.new_zeros(b, H, S)]
    # unbind, not sums[:, c]: see ssd.states_entering (a zero-filled whole tensor per chunk in backward)
    for started, chunk_sum in zip(seen[:, :-1, -1].unbind(1), sums[:, :-1, -1].unbind(1)):
        end = torch.where(started, chunk_sum, carries[-1] + chunk_sum)
        carries.append(end - TWO_PI * torch.floor(end / TWO_PI))
    carry = torch.stack(carries, dim=1)[:, :, None]  # (b, nc, 1, H, S)
    theta = torch.where(seen, sums, carry + sums)
    return theta.view(b, total, H, S)


def mamba3_scan_chunked(C, B, x, adt, dt, trap, angles, C_bias, B_bias, D=None, z=None, reset=None,
                        chunk_size=64, mimo_x=None, mimo_z=None, mimo_o=None):
    """The fast exact scan (module doc); same arguments and result as mamba3_scan_ref: y (batch, L,
    H, P), or (batch, L, R, H, P) for MIMO without mimo_o (the mixer's output norm comes first).

    Computes in float32 (float64 if x is float64) with autocast off, as mamba-ssm's kernels keep
    their state and decays in float32; y comes back in x's dtype. chunk_size changes rounding only.
    Memory O(batch * L * H * R * (Q R + P + N)); autograd does the backward.
    """
    out_dtype = x.dtype
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, nheads, headdim = x.shape
    mimo = mimo_x is not None
    with torch.autocast(device_type=x.device.type, enabled=False):
        C, B, x, adt, dt, trap, angles, C_bias, B_bias = (
            t.to(cdtype) for t in (C, B, x, adt, dt, trap, angles, C_bias, B_bias))
        mimo_x, mimo_z, mimo_o = (None if t is None else t.to(cdtype) for t in (mimo_x, mimo_z, mimo_o))
        lam = torch.sigmoid(trap)
        gamma = lam * dt  # (b, L, H)
        previous_weight = (1 - lam) * dt  # beta_t / alpha_t: what token t gives token t-1's input
        a = adt
        if reset is not None:
            previous_weight = previous_weight.masked_fill(reset[:, :, None], 0.0)
            a = a.masked_fill(reset[:, :, None], float("-inf"))  # exp(-inf) = 0: the state is dropped
        scale = gamma + F.pad(previous_weight[:, 1:], (0, 0, 0, 1))  # nothing follows the last token
        Q = min(chunk_size, length)
        pad = -length % Q
        phi = F.pad(angle_increments(angles, dt), (0, 0, 0, 0, 0, pad))
        padded_reset = None if reset is None else F.pad(reset, (0, pad))
        theta = _chunked_angles(phi, padded_reset, Q)[:, :length]  # (b, L, H, S)
        q, k, v = _queries_keys_inputs(C, B, x, theta, C_bias, B_bias, mimo_x)  # (b, L, R, H, N|P)
        rank = q.shape[2]
        if pad:  # padded steps: no input (v = 0, weights 0), no decay (a = 0); outputs dropped
            q, k, vp = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (q, k, v))
            a, scale, gamma = (F.pad(t, (0, 0, 0, pad)) for t in (a, scale, gamma))
        else:
            vp = v
        nc = (length + pad) // Q

        def chunks(t):  # (b, nc * Q, H) -> (b, nc, H, Q)
            return t.view(batch, nc, Q, nheads).transpose(2, 3)

        def rows(t):  # (b, nc * Q, R, H, X) -> (b, nc, H, Q * R, X): a chunk's Q tokens x R ranks
            return t.view(batch, nc, Q, rank, nheads, t.shape[-1]).permute(0, 1, 4, 2, 3, 5).flatten(3, 4)

        def per_row(t):  # (b, nc, H, Q) -> (b, nc, H, Q * R): every rank of a token alike
            # expand, not repeat_interleave: its backward is a sum, not a CPU-slow index_add
            return t if rank == 1 else t.unsqueeze(-1).expand(*t.shape, rank).flatten(-2)

        qc, kc, vc = rows(q), rows(k), rows(vp)
        ac, scale_c, gamma_c = chunks(a), chunks(scale), chunks(gamma)
        seg = _segsum(ac)  # (b, c, H, Q, Q): a_{j+1} + ... + a_i, -inf above the diagonal
        # 1. Intra-chunk: y_i = sum_j (q_i . k_j) W[i, j] v_j with W as in the module doc.
        diagonal = torch.eye(Q, dtype=torch.bool, device=x.device)
        W = torch.where(diagonal, gamma_c[..., :, None], torch.exp(seg) * scale_c[..., None, :])
        if rank > 1:  # (.., Q, Q) -> (.., QR, QR): the rows of one token share its weights
            W = W[..., :, None, :, None].expand(*W.shape[:-2], Q, rank, Q, rank).reshape(*W.shape[:-2], Q * rank,
                                                                                       Q * rank)
        y = ((qc @ kc.transpose(-1, -2)) * W) @ vc  # (b, c, H, QR, P)
        # 2. Each chunk's final state from zero: sum_j exp(a_{j+1..Q-1}) scale_j v_j k_j^T.
        to_end = per_row(torch.exp(seg[..., -1, :]) * scale_c)  # (b, c, H, QR)
        states = (vc * to_end[..., None]).transpose(-1, -2) @ kc  # (b, c, H, P, N)
        # 3. The state entering each chunk, one step per chunk (never per token).
        acum = torch.cumsum(ac, dim=-1)  # (b, c, H, Q): a_0 + ... + a_i
        chunk_decay = torch.exp(acum[..., -1])[..., None, None]  # (b, c, H, 1, 1)
        s_in = states_entering(states, chunk_decay)  # (b, c, H, P, N)
        # 4. Its contribution: exp(a_0 + ... + a_i) q_i . S_in.
        y = y + per_row(torch.exp(acum))[..., None] * (qc @ s_in.transpose(-1, -2))
        y = y.unflatten(3, (Q, rank)).permute(0, 1, 3, 4, 2, 5).reshape(batch, nc * Q, rank, nheads, headdim)
        y = _output(y[:, :length], v, None if D is None else D.to(cdtype), None if z is None else z.to(cdtype),
                    mimo_z, mimo_o, mimo)
    return y.to(out_dtype)
