"""Mamba-3's SISO scan in pure PyTorch: an exact chunked version, the single-token update, and the
sequential reference built from it.

Model: Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State Space Principles"
(arXiv 2603.15569), sections "Exponential-Trapezoidal Discretization" and "Complex-Valued SSMs"
(the complex state written as a data-dependent rotary embedding of B and C). Semantics are those
of mamba-ssm 2.3.2's `mamba3_siso_combined` (ops/triton/mamba3/), argument for argument.

Shapes: C, B (batch, L, G, N) with G = ngroups B/C heads (head h reads group h // (H / G)), already
RMS-normalised; x (batch, L, H, P) with H heads of P = headdim channels; adt, dt, trap (batch, L, H);
angles (batch, L, S) or (batch, L, H, S), S <= N / 2 rotary angles; C_bias, B_bias (H, N); D (H,);
z (batch, L, H, P) optional gate. Per head, with the state h_t (P, N):

    lam_t   = sigmoid(trap_t)                   trapezoid weight in [0, 1] (1: Mamba-2's Euler rule)
    alpha_t = exp(adt_t)                         adt = A_t dt_t <= 0, A_t data-dependent (the mixer)
    beta_t  = (1 - lam_t) dt_t alpha_t           weight of the previous token's input
    gamma_t = lam_t dt_t                         weight of the current token's input
    theta_t = theta_{t-1} + pi tanh(angles_t) dt_t          (S angles, kept mod 2 pi)
    q_t     = R(theta_t) (C_t + C_bias),  k_t = R(theta_t) (B_t + B_bias)
    h_t     = alpha_t h_{t-1} + beta_t x_{t-1} k_{t-1}^T + gamma_t x_t k_t^T
    y_t     = (h_t q_t + D x_t) * silu(z_t)

R(theta) rotates each channel pair (2i, 2i+1) of the first 2S channels by theta_i and leaves the
other channels as they are: the real form of a complex diagonal transition (the paper's
"RoPE trick": rotating B and C by the accumulated angle equals rotating the state at each step).
`reset` (batch, L) bool, True at document starts: there h_{t-1}, the previous token's input term
and theta_{t-1} are all dropped (mamba-ssm's varlen cu_seqlens starts each sequence so).

Chunked algorithm (ops/ssd.py's four steps, time cut into chunks of Q tokens). Unrolled, the
recurrence is y_i = sum_{j <= i} W[i, j] (q_i . k_j) x_j + D x_i with
    W[i, j] = exp(a_{j+1} + ... + a_i) * scale_j   for j < i,   scale_j = gamma_j + (1 - lam_{j+1}) dt_{j+1}
    W[i, i] = gamma_i
(token j's input reaches later states through gamma_j and, one step later, beta_{j+1}, which carries
alpha_{j+1}; the "(1 - lam_{j+1}) dt_{j+1}" is 0 after the last token and before a document start).
That is SSD with per-head keys and queries, the input weight scale_j, and the diagonal weighted
by gamma alone. The state carried between chunks is the sum with scale_j for every j (so it
already holds the beta term the next token adds). The angles are a segmented cumulative sum
done the same way: inside a chunk, and a carry (mod 2 pi) from chunk to chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba.model.ops.ssd import _segsum

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


def angle_increments(angles: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """pi tanh(angles) dt: (batch, [L,] H, S), the per-token rotation (angles (.., S) shared by
    the heads, or (.., H, S) per head; dt (.., H))."""
    if angles.dim() == dt.dim():  # (batch, [L,] S): one set of angles for every head
        angles = angles.unsqueeze(-2)
    return math.pi * torch.tanh(angles) * dt[..., None]


def _per_head(t: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    """(.., G, N) -> (.., H, N): head h reads group h // (H / G) (mamba-ssm's GQA layout)."""
    return t.repeat_interleave(nheads // t.shape[dim], dim=dim)


def mamba3_step_update(states, C, B, x, adt, dt, trap, angles, C_bias, B_bias, D=None, z=None):
    """One token of the recurrence (module doc), without in-place writes (so autograd can run the
    reference through it). states = (angle_state (b, H, S), ssm_state (b, H, P, N), k_state
    (b, 1, H, N), v_state (b, H, P)), mamba-ssm's cache layout; C, B (b, G, N); x (b, H, P);
    adt, dt, trap (b, H); angles (b, S) or (b, H, S). Returns (y (b, H, P), the new states)."""
    angle_state, ssm_state, k_state, v_state = states
    H = x.shape[1]
    lam = torch.sigmoid(trap)
    alpha = torch.exp(adt)
    beta, gamma = (1 - lam) * dt * alpha, lam * dt  # (b, H)
    theta = angle_state + angle_increments(angles, dt)
    theta = theta - TWO_PI * torch.floor(theta / TWO_PI)  # mod 2 pi, as mamba-ssm's angle state
    q = rotate_pairs(_per_head(C, H, 1) + C_bias, theta)  # (b, H, N)
    k = rotate_pairs(_per_head(B, H, 1) + B_bias, theta)
    previous = v_state[:, :, :, None] * k_state[:, 0, :, None, :]  # (b, H, P, N): x_{t-1} k_{t-1}^T
    current = x[:, :, :, None] * k[:, :, None, :]
    h = alpha[..., None, None] * ssm_state + beta[..., None, None] * previous + gamma[..., None, None] * current
    y = torch.einsum("bhpn,bhn->bhp", h, q)
    if D is not None:
        y = y + D[:, None] * x
    if z is not None:
        y = y * F.silu(z)
    return y, (theta, h, k[:, None], x)


def zero_states(batch, nheads, headdim, dstate, nangles, **options):
    """An empty context: (angle_state, ssm_state, k_state, v_state) of mamba3_step_update."""
    return (torch.zeros(batch, nheads, nangles, **options), torch.zeros(batch, nheads, headdim, dstate, **options),
            torch.zeros(batch, 1, nheads, dstate, **options), torch.zeros(batch, nheads, headdim, **options))


def mamba3_scan_ref(C, B, x, adt, dt, trap, angles, C_bias, B_bias, D=None, z=None, reset=None):
    """The recurrence one Python step per token (mamba3_step_update): the ground truth of the tests
    (use float64). Arguments as mamba3_scan_chunked; returns y (batch, L, H, P)."""
    batch, length, nheads, headdim = x.shape
    nangles = angles.shape[-1]
    states = zero_states(batch, nheads, headdim, B.shape[-1], nangles, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(length):
        if reset is not None:  # a document starts: nothing of the previous one is carried
            keep = (~reset[:, t]).to(x.dtype)
            states = tuple(s * keep.view(-1, *([1] * (s.dim() - 1))) for s in states)
        y, states = mamba3_step_update(
            states, C[:, t], B[:, t], x[:, t], adt[:, t], dt[:, t], trap[:, t], angles[:, t], C_bias, B_bias, D,
            None if z is None else z[:, t])
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
    for c in range(nc - 1):
        end = torch.where(seen[:, c, -1], sums[:, c, -1], carries[-1] + sums[:, c, -1])
        carries.append(end - TWO_PI * torch.floor(end / TWO_PI))
    carry = torch.stack(carries, dim=1)[:, :, None]  # (b, nc, 1, H, S)
    theta = torch.where(seen, sums, carry + sums)
    return theta.view(b, total, H, S)


def mamba3_scan_chunked(C, B, x, adt, dt, trap, angles, C_bias, B_bias, D=None, z=None, reset=None,
                        chunk_size=64):
    """The fast exact scan (module doc); same arguments and result as mamba3_scan_ref.

    Computes in float32 (float64 if x is float64) with autocast off, as mamba-ssm's kernel keeps
    its state and decays in float32; y comes back in x's dtype. chunk_size changes rounding only.
    Memory O(batch * L * H * (Q + P + N)); autograd does the backward.
    """
    out_dtype = x.dtype
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, nheads, headdim = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        C, B, x, adt, dt, trap, angles, C_bias, B_bias = (
            t.to(cdtype) for t in (C, B, x, adt, dt, trap, angles, C_bias, B_bias))
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
        q = rotate_pairs(_per_head(C, nheads, 2) + C_bias, theta)  # (b, L, H, N)
        k = rotate_pairs(_per_head(B, nheads, 2) + B_bias, theta)
        if pad:  # padded steps: no input (x = 0, weights 0), no decay (a = 0); outputs dropped
            q, k, xp = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, x))
            a, scale, gamma = (F.pad(t, (0, 0, 0, pad)) for t in (a, scale, gamma))
        else:
            xp = x
        nc = (length + pad) // Q

        def chunks(t):  # (b, nc * Q, H, ...) -> (b, nc, H, Q, ...)
            return t.view(batch, nc, Q, nheads, *t.shape[3:]).transpose(2, 3)

        qc, kc, xc, ac, scale_c, gamma_c = (chunks(t) for t in (q, k, xp, a, scale, gamma))
        seg = _segsum(ac)  # (b, c, H, Q, Q): a_{j+1} + ... + a_i, -inf above the diagonal
        # 1. Intra-chunk: y_i = sum_j (q_i . k_j) W[i, j] x_j with W as in the module doc.
        diagonal = torch.eye(Q, dtype=torch.bool, device=x.device)
        W = torch.where(diagonal, gamma_c[..., :, None], torch.exp(seg) * scale_c[..., None, :])
        y = ((qc @ kc.transpose(-1, -2)) * W) @ xc  # (b, c, H, Q, P)
        # 2. Each chunk's final state from zero: sum_j exp(a_{j+1..Q-1}) scale_j x_j k_j^T.
        to_end = torch.exp(seg[..., -1, :]) * scale_c  # (b, c, H, Q)
        states = (xc * to_end[..., None]).transpose(-1, -2) @ kc  # (b, c, H, P, N)
        # 3. The state entering each chunk, one step per chunk (never per token).
        acum = torch.cumsum(ac, dim=-1)  # (b, c, H, Q): a_0 + ... + a_i
        chunk_decay = torch.exp(acum[..., -1])[..., None, None]  # (b, c, H, 1, 1)
        entering = [torch.zeros_like(states[:, 0])]
        for c in range(1, nc):
            entering.append(chunk_decay[:, c - 1] * entering[-1] + states[:, c - 1])
        s_in = torch.stack(entering, dim=1)  # (b, c, H, P, N)
        # 4. Its contribution: exp(a_0 + ... + a_i) q_i . S_in.
        y = y + torch.exp(acum)[..., None] * (qc @ s_in.transpose(-1, -2))
        y = y.transpose(2, 3).reshape(batch, nc * Q, nheads, headdim)[:, :length]
        if D is not None:
            y = y + x * D.to(cdtype)[:, None]
        if z is not None:
            y = y * F.silu(z.to(cdtype))
    return y.to(out_dtype)
