"""Mamba-1 selective scan in pure PyTorch: an exact chunked scan, and its sequential reference.

Semantics are those of mamba-ssm's `selective_scan_fn` (Gu & Dao 2023, "Mamba", Alg. 2; mamba-ssm
`ops/selective_scan_interface.py`, `selective_scan_ref`), for input-dependent ("variable") B and C:

    delta'_t = softplus(delta_t + delta_bias)            (softplus only if delta_softplus)
    h_t      = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t        h: (batch, D, N)
    y_t      = <C_t, h_t>_N + D * u_t
    y        = y * silu(z)

plus one addition of ours: `reset` (batch, L) bool marks document starts; the state is zero before
such a token (h_{t-1} := 0), so no information crosses a document boundary in a packed window.

The fast path never takes a Python step per token and is exact (a reassociation of the same
products and sums). It never exponentiates a cumulative sum over the sequence, which overflows
for long ones: every exp has a non-positive argument (dt * A, or A times one chunk's sum of dt,
with dt >= 0 and A <= 0), so every factor lies in [0, 1]. It is a two-level blocked scan; time
is cut into nc chunks of T steps (T ~ sqrt(L)):

  pass 1  T steps, each over all chunks at once: the chunk-local state (scanned from zero);
  carry   nc steps on (batch, N, D): the true state entering each chunk, from the local ones
          and each chunk's total decay exp(A * sum of its dt);
  pass 2  T steps again: the recurrence restarted from the true carries, writing every h_t.

That is O(L * D * N) work in ~2T + nc Python iterations. The per-step tensors a_t and b_t are
rebuilt inside the loops from (batch, L, D)-sized inputs instead of being materialised as
(batch, L, D, N) tensors: the only full-size tensor is h itself, kept for the backward. On CPU,
allocating large buffers (page faults) and streaming them through memory costs more than the
arithmetic, and the per-step slices (batch, nc, N, D) stay in cache.

The backward is the same blocked scan run in reverse time (the adjoint of h_t = a_t h_{t-1} + b_t
is g_t = a_{t+1} g_{t+1} + dL/dh_t), with every input's gradient reduced per step from g_t, so it
allocates no full-size tensor either.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       reset=None):
    """Plain sequential loop over time; the ground truth the tests compare against (in float64).

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L); D, delta_bias: (D,);
    reset: (batch, L) bool. Returns y (batch, D, L) in the dtype of u.
    """
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    keeps = (~reset).to(u.dtype).unbind(-1) if reset is not None else [None] * u.shape[2]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (batch, D, N)
    ys = []
    # unbind (not indexing) per step: its backward is one stack, not a full-size zero tensor per step.
    steps = zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1), keeps)
    for u_t, dt_t, B_t, C_t, keep_t in steps:
        if keep_t is not None:
            h = h * keep_t[:, None, None]
        h = torch.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reset=None, chunk_size=None):
    """The fast exact scan; same arguments, shapes and result as `selective_scan_ref`.

    Computes in float32 (float64 if u is float64) whatever the input dtypes, as mamba-ssm's kernel
    does, with autocast off; y comes back in u's dtype. Inputs may be strided views: a (batch, D, L)
    view of a (batch, L, D)-contiguous tensor (how the mixer calls it) costs no copy.
    chunk_size: steps per chunk T; default the smallest power of two >= sqrt(L), which balances
    the ~2T + L/T Python steps and divides the usual power-of-two L (no padding copy).
    """
    out_dtype = u.dtype
    cdtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    length = u.shape[2]
    chunk = chunk_size or 1 << math.ceil(math.log2(length) / 2)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, delta = u.to(cdtype), delta.to(cdtype)
        if delta_bias is not None:
            delta = delta + delta_bias.to(cdtype)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        keep = None if reset is None else (~reset).to(cdtype)
        y = _ChunkedScan.apply(
            u.transpose(1, 2), delta.transpose(1, 2), A.to(cdtype),
            B.to(cdtype).transpose(1, 2), C.to(cdtype).transpose(1, 2), keep, chunk,
        ).transpose(1, 2)  # (batch, D, L)
        if D is not None:
            y = y + u * D.to(cdtype)[:, None]
        if z is not None:
            y = y * F.silu(z.to(cdtype))
    return y.to(out_dtype)


def _chunked(x, chunk):
    """(batch, L, *rest) -> (batch, nc, T, *rest), zero-padded at the end of time to nc * T.

    Padding is harmless: outputs past L are dropped, and their incoming gradient is zero.
    """
    pad = -x.shape[1] % chunk
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x.contiguous()
    return x.view(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:])


class _Steps:
    """The scan's per-step coefficients for all chunks at once, built on demand.

    Chunked inputs: u, dt (batch, nc, T, D); At = A transposed (N, D); B (batch, nc, T, N);
    keep (batch, nc, T) or None. The state is held as (batch, nc, N, D), D innermost: every
    reduction over N is then a sum of D-long rows or a (1 x N) @ (N x D) product, far faster on
    CPU than summing 16-long rows. The full (batch, L, N, D) a and b are never stored: a step's
    slice is recomputed from the (batch, L, D)-sized inputs whenever a pass needs it.
    """

    def __init__(self, u, dt, At, B, keep):
        self.dt, self.At, self.B, self.keep = dt, At, B, keep
        self.dtu = dt * u  # (batch, nc, T, D)

    def decay(self, t, out=None):
        """a_t = exp(dt_t * A), 0 where a document starts: (batch, nc, N, D), entries in [0, 1]."""
        a = torch.mul(self.dt[:, :, t, None, :], self.At, out=out).exp_()
        if self.keep is not None:
            a.mul_(self.keep[:, :, t, None, None])
        return a

    def add_drive_(self, h, t):
        """h += b_t = B_t dt_t u_t, in place."""
        return h.addcmul_(self.B[:, :, t, :, None], self.dtu[:, :, t, None, :])

    def chunk_decay(self, start):
        """Product of a_t over steps start .. T-1 of each chunk: (batch, nc, N, D).

        One exp of A * sum(dt) instead of T products: dt >= 0 and A <= 0, so the exponent is
        never positive (no overflow, unlike an exp of a cumulative sum over the whole sequence).
        """
        p = torch.mul(self.dt[:, :, start:].sum(2)[:, :, None, :], self.At).exp_()
        if self.keep is not None:
            p.mul_(self.keep[:, :, start:].prod(2)[:, :, None, None])  # 0 if a document starts
        return p


class _ChunkedScan(torch.autograd.Function):
    """y_t = <C_t, h_t>, h_t = a_t * h_{t-1} + b_t with a_t = exp(dt_t A) * keep_t, b_t = dt_t u_t B_t.

    Time-major inputs: u, dt (batch, L, D); A (D, N); B, C (batch, L, N); keep (batch, L) or None
    (0 at a document start). Returns y (batch, L, D). dt is already softplus'ed (autograd outside).
    The loops update preallocated buffers in place: no allocation per step.
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, keep, chunk):
        length = u.shape[1]
        u, dt, B, C = (_chunked(x, chunk) for x in (u, dt, B, C))  # (batch, nc, T, D or N)
        keep = None if keep is None else _chunked(keep, chunk)
        steps = _Steps(u, dt, A.t().contiguous(), B, keep)
        batch, nc, T, D = u.shape
        a = u.new_empty(batch, nc, A.shape[1], D)  # a_t of the current step

        # Pass 1: chunk-local states, each chunk scanned from zero.
        local = torch.zeros_like(a)
        for t in range(T):
            steps.add_drive_(local.mul_(steps.decay(t, out=a)), t)
        # Carry, sequential over chunks: h entering chunk c = P_{c-1} * h entering c-1 + local_{c-1}.
        prod = steps.chunk_decay(0)
        carry_in = torch.zeros_like(a)
        for c in range(1, nc):
            torch.addcmul(local[:, c - 1], prod[:, c - 1], carry_in[:, c - 1], out=carry_in[:, c])

        # Pass 2: restart the recurrence from the true carries; y_t = C_t @ h_t while h_t is hot.
        h = u.new_empty(batch, nc, T, A.shape[1], D)
        y = u.new_empty(batch, nc, T, D)
        prev = carry_in
        for t in range(T):
            steps.add_drive_(torch.mul(steps.decay(t, out=a), prev, out=h[:, :, t]), t)
            prev = h[:, :, t]
            y[:, :, t] = (C[:, :, t, None, :] @ prev).squeeze(-2)
        ctx.save_for_backward(u, dt, A, B, C, keep, h)
        ctx.length = length
        return y.flatten(1, 2)[:, :length]

    @staticmethod
    def backward(ctx, dy):
        u, dt, A, B, C, keep, h = ctx.saved_tensors
        with torch.autocast(device_type=dy.device.type, enabled=False):
            grads = _scan_backward(dy.to(u.dtype), u, dt, A, B, C, keep, h, ctx.length)
        return (*grads, None, None)


def _scan_backward(dy, u, dt, A, B, C, keep, h, length):
    """Gradients of (u, dt, A, B, C) given dy (batch, L, D), for chunked inputs (batch, nc, T, ...).

    With g_t = dL/dh_t = a_{t+1} g_{t+1} + C_t dy_t (reverse scan) and q_t = g_t * a_t * h_{t-1}
    (= dL/d(dt_t A) elementwise; zero where keep is zero, since a_t is):
      du_t = dt_t sum_n B_t g_t      ddt_t = u_t sum_n B_t g_t + sum_n A q_t
      dB_t = sum_d g_t dt_t u_t      dC_t = sum_d h_t dy_t          dA = sum_{batch,t} q_t dt_t
    """
    batch, nc, T, D = u.shape
    At = A.t().contiguous()  # (N, D)
    dy = _chunked(dy, T)  # (batch, nc, T, D)
    steps = _Steps(u, dt, At, B, keep)
    a = h.new_empty(batch, nc, A.shape[1], D)

    def add_rhs_(g, t):  # g += dL/dh_t through y_t alone, C_t dy_t
        return g.addcmul_(C[:, :, t, :, None], dy[:, :, t, None, :])

    # Pass 1 (reverse): chunk-local g at each chunk's first step, scanned from zero at its last.
    local = torch.zeros_like(a)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            local.mul_(steps.decay(t + 1, out=a))
        add_rhs_(local, t)
    # Carry (reverse): the gradient flowing into chunk c from chunk c + 1, a_{c+1,0} g_{c+1,0},
    # where g_{c+1,0} = local_{c+1} + (a_1 ... a_{T-1} of chunk c + 1) * from_right_{c+1}.
    prod = steps.chunk_decay(1)
    first_decay = steps.decay(0)
    from_right = torch.zeros_like(a)
    for c in range(nc - 2, -1, -1):
        g_first = torch.addcmul(local[:, c + 1], prod[:, c + 1], from_right[:, c + 1])
        torch.mul(first_decay[:, c + 1], g_first, out=from_right[:, c])

    # h_{t-1} at each chunk's first step: the previous chunk's last state (zero before chunk 0).
    h_before = torch.cat([torch.zeros_like(h[:, :1, 0]), h[:, :-1, T - 1]], dim=1)
    du, ddt = torch.empty_like(u), torch.empty_like(dt)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dA = torch.zeros_like(a)  # (batch, nc, N, D), summed over (batch, nc) at the end
    q = torch.empty_like(a)

    # Pass 2 (reverse): the true g_t, and every gradient of step t reduced from it on the spot.
    g = from_right  # becomes g_{T-1} = from_right + C dy at the chunks' last step
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            g.mul_(a)  # a still holds a_{t+1} from the previous iteration
        add_rhs_(g, t)
        steps.decay(t, out=a)
        torch.mul(g, h[:, :, t - 1] if t > 0 else h_before, out=q).mul_(a)
        dA.addcmul_(q, dt[:, :, t, None, :])
        g_b = (B[:, :, t, None, :] @ g).squeeze(-2)  # sum_n B_t g_t: (batch, nc, D)
        du[:, :, t] = g_b * dt[:, :, t]
        ddt[:, :, t] = torch.addcmul(q.mul_(At).sum(-2), g_b, u[:, :, t])
        dB[:, :, t] = (steps.dtu[:, :, t, None, :] @ g.transpose(-1, -2)).squeeze(-2)
        dC[:, :, t] = (dy[:, :, t, None, :] @ h[:, :, t].transpose(-1, -2)).squeeze(-2)

    def unchunk(x):
        return x.flatten(1, 2)[:, :length]

    return unchunk(du), unchunk(ddt), dA.sum((0, 1)).t(), unchunk(dB), unchunk(dC)
