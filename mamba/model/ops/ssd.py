"""Mamba-2's state space dual (SSD) scan in pure PyTorch: a chunked exact version and its
sequential reference.

Semantics are those of mamba-ssm's `mamba_chunk_scan_combined` (Dao & Gu 2024, "Transformers are
SSMs", Sec. 6 and Listing 1 "ssd_minimal"; mamba-ssm `ops/triton/ssd_combined.py`), with a scalar
decay per head. Shapes: x (batch, L, H, P) with H heads of P = headdim channels; dt (batch, L, H);
A (H,) <= 0; B, C (batch, L, G, N) with G groups, head h using group h // (H / G) (mamba-ssm's
`repeat(B, "b l g n -> b l (g h) n")`); D (H,). Per head, with the state S_t (P, N):

    dt'_t = softplus(dt_t + dt_bias)                       (softplus only if dt_softplus)
    S_t   = exp(dt'_t A) S_{t-1} + dt'_t x_t B_t^T
    y_t   = S_t C_t + D x_t

plus `reset` (batch, L) bool, True at document starts: S_{t-1} := 0 there (mamba-ssm's `seq_idx`
does the same, state reset where the document index changes).

Chunked algorithm (ssd_minimal's four steps), time cut into chunks of Q steps, a_t = dt'_t A <= 0
the log decay (-inf at a reset, so exp gives an exact zero):
  1. inside each chunk: y_i += sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt'_j x_j, a masked
     (Q x Q) "attention" matrix per head;
  2. each chunk's own final state, from zero: sum_j exp(a_{j+1} + ... + a_{Q-1}) dt'_j x_j B_j^T;
  3. the true state entering each chunk: a recurrence over chunks (one Python step per chunk,
     never per token), S_in[c] = exp(sum of chunk c-1's a) S_in[c-1] + (step 2 of chunk c-1);
  4. y_i += exp(a_0 + ... + a_i) S_in[c] C_i.
Every exp has a sum of a's as argument, never a difference of cumulative sums: each factor is in
[0, 1] (no overflow on long sequences, no -inf - -inf = nan at resets, no cancellation). The
segment sums are built by a masked cumulative sum (`_segsum`, as ssd_minimal's stable version).
Memory is O(batch * L * H * (Q + P)) for step 1 plus the chunk states; autograd does the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ssd_ref(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, reset=None):
    """Plain recurrence, one Python step per token: the ground truth for the tests (use float64).

    Arguments as `ssd_chunked` (module docstring for shapes). Returns y (batch, L, H, P).
    """
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    heads_per_group = x.shape[2] // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)  # (batch, L, H, N)
    C = C.repeat_interleave(heads_per_group, dim=2)
    state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3])  # (batch, H, P, N)
    ys = []
    for t in range(x.shape[1]):
        if reset is not None:
            state = state * (~reset[:, t]).to(x.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (batch, H, 1, 1)
        drive = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # (batch, H, P, N)
        state = decay * state + drive
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D[:, None]
    return y


def ssd_chunked(x, dt, A, B, C, chunk_size=64, D=None, dt_bias=None, dt_softplus=False, reset=None):
    """The fast exact scan; same arguments and result as `ssd_ref`.

    Computes in float32 (float64 if x is float64) with autocast off, as mamba-ssm's kernel keeps
    its state in float32; y comes back in x's dtype. chunk_size (Q) changes only the rounding.
    """
    out_dtype = x.dtype
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    per_group = nheads // ngroups
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, dt, A, B, C = (t.to(cdtype) for t in (x, dt, A, B, C))
        if dt_bias is not None:
            dt = dt + dt_bias.to(cdtype)
        if dt_softplus:
            dt = F.softplus(dt)
        a = dt * A  # (batch, L, H) log decays, <= 0
        if reset is not None:
            a = a.masked_fill(reset[:, :, None], float("-inf"))  # exp(-inf) = 0: state dropped
        Q = min(chunk_size, length)
        pad = -length % Q
        if pad:  # padded steps: dt = 0 (no drive), a = 0 (no decay); their outputs are dropped
            x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
            dt, a = (F.pad(t, (0, 0, 0, pad)) for t in (dt, a))
        nc = (length + pad) // Q
        xc = x.view(batch, nc, Q, nheads, headdim).permute(0, 1, 3, 2, 4)  # (b, c, H, Q, P)
        dtc = dt.view(batch, nc, Q, nheads).transpose(2, 3)  # (b, c, H, Q)
        ac = a.view(batch, nc, Q, nheads).transpose(2, 3)  # (b, c, H, Q)
        Bc = B.view(batch, nc, Q, ngroups, dstate).transpose(2, 3)[:, :, :, None]  # (b, c, G, 1, Q, N)
        Cc = C.view(batch, nc, Q, ngroups, dstate).transpose(2, 3)[:, :, :, None]

        def by_group(t):  # (b, c, H, ...) -> (b, c, G, H/G, ...): heads of a group share B and C
            return t.view(batch, nc, ngroups, per_group, *t.shape[3:])

        seg = _segsum(ac)  # (b, c, H, Q, Q): seg[i, j] = a_{j+1} + ... + a_i, -inf above diagonal
        # 1. Intra-chunk: M[i, j] = (C_i . B_j) exp(seg[i, j]) dt_j, y = M @ x.
        scores = Cc @ Bc.transpose(-1, -2)  # (b, c, G, 1, Q, Q)
        M = by_group(torch.exp(seg) * dtc[:, :, :, None, :]) * scores
        y = M @ by_group(xc)  # (b, c, G, H/G, Q, P)
        # 2. Each chunk's final state from zero: sum_j exp(a_{j+1..Q-1}) dt_j x_j B_j^T.
        to_end = torch.exp(seg[..., -1, :]) * dtc  # (b, c, H, Q): the last row of the segsum
        states = (by_group(xc * to_end[..., None]).transpose(-1, -2) @ Bc)  # (b, c, G, H/G, P, N)
        # 3. States entering each chunk, one step per chunk.
        acum = torch.cumsum(ac, dim=-1)  # (b, c, H, Q): a_0 + ... + a_i, <= 0
        chunk_decay = by_group(torch.exp(acum[..., -1]))[..., None, None]  # (b, c, G, H/G, 1, 1)
        s_in = states_entering(states, chunk_decay)  # (b, c, G, H/G, P, N)
        # 4. Contribution of the entering state: exp(a_0 + ... + a_i) C_i . S_in.
        y = y + by_group(torch.exp(acum)[..., None]) * (Cc @ s_in.transpose(-1, -2))
        y = y.reshape(batch, nc, nheads, Q, headdim).transpose(2, 3).reshape(batch, nc * Q, nheads, headdim)
        y = y[:, :length]
        if D is not None:
            y = y + x[:, :length] * D.to(cdtype)[:, None]
    return y.to(out_dtype)


def _segsum(a):
    """a (..., Q) -> (..., Q, Q) with out[i, j] = a_{j+1} + ... + a_i for j <= i (0 on the
    diagonal) and -inf for j > i.

    A cumulative sum of a masked copy (ssd_minimal's "stable segsum"), not cumsum[i] - cumsum[j]:
    differences of long sums lose precision, and give nan once a reset has put -inf in both.
    """
    Q = a.shape[-1]
    strictly_lower = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril(-1)
    rep = a[..., :, None].expand(*a.shape, Q).masked_fill(~strictly_lower, 0)  # rep[k, j] = a_k, k > j
    seg = torch.cumsum(rep, dim=-2)
    lower = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    return seg.masked_fill(~lower, float("-inf"))


def states_entering(states: torch.Tensor, chunk_decay: torch.Tensor) -> torch.Tensor:
    """The state entering each chunk, one step per chunk: S_in[0] = 0, S_in[c] = decay[c-1] *
    S_in[c-1] + states[c-1]. states (b, nc, ...), chunk_decay (b, nc, ...) broadcastable to it.

    The chunks are taken with unbind, not indexing: the backward of `states[:, c]` writes a
    zero-filled tensor of the whole (b, nc, ...) per chunk (O(nc^2) memory traffic, most of a
    training step at 32 chunks on CPU); unbind's backward stacks the nc gradients once."""
    chunk_states, decays = states.unbind(1), chunk_decay.unbind(1)
    entering = [torch.zeros_like(chunk_states[0])]
    for c in range(1, len(chunk_states)):
        entering.append(decays[c - 1] * entering[-1] + chunk_states[c - 1])
    return torch.stack(entering, dim=1)
