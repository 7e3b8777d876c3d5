"""Causal attention with document isolation, rotary position embedding, and their references.

Scaled dot-product attention (Vaswani et al. 2017), per head, with s the softmax scale:

    out_i = sum_j softmax_j(s * q_i . k_j  over allowed j) v_j

In a packed window a query may attend to key j only if j <= i (causal) and j is in the query's
document (no document starts in (j, i]). Grouped-query attention (Ainslie et al. 2023): query head
h reads key/value head h // (h_q / h_kv).

`document_attention` runs torch's `scaled_dot_product_attention` (SDPA): with its built-in causal
mask without document starts, else with an explicit (batch, 1, L, L) block-diagonal causal mask
(built on the device, never inspected on the host: no synchronisation, and the planner can measure
it on fake tensors). Both take SDPA's fused kernels: on CPU its flash kernel, which takes the
mask and keeps O(L) per query beside the mask itself; on GPU the memory-efficient kernel. A masked key gets weight exactly 0, so each
document's output is independent of the other documents up to the rounding of the softmax sum
(tests/model/test_attention.py). `attention_ref` is the textbook formula in float64 with the mask
built by loops, for tests.

Rotary embedding (RoPE, Su et al. 2021, "RoFormer", eq. (34)): the first R (rotary dim) channels
of each q and k head are rotated, pair i at position p by the angle p * base^(-2i / R). Pairs are
(c, c + R/2) (GPT-NeoX, flash-attn's interleaved=False, as mamba-ssm's MHA and transformers' Bamba)
or (2i, 2i + 1) (interleaved, GPT-J). Since q_m . k_n then depends on m - n only, positions may
count from any origin: they count from each document's first token inside the window (a window
that starts mid-document counts from the window start: the same scores, as the window holds no
earlier key).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def positions_from_reset(reset: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(batch, L) int64 in-document positions: 0 at each True of reset (batch, L) and at t = 0,
    counting up in between; arange(L) per row without resets."""
    t = torch.arange(length, device=device).expand(batch, length)
    if reset is None:
        return t
    start = torch.where(reset, t, torch.zeros_like(t)).cummax(dim=-1).values  # last start <= t
    return t - start


def rotary_inv_freq(rotary_dim: int, base: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(R/2,) angular frequencies base^(-2i/R), i = 0 .. R/2 - 1 (RoFormer eq. (15))."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=dtype) / rotary_dim))


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate the first R = rotary_dim channels of x (batch, L, heads, D) by positions (batch, L);
    the other channels pass through. Frequencies and angles are computed here, in float32 (float64
    for a float64 x), not kept as a buffer: a bf16 model must not round them to bf16, and there
    are only R/2 of them. Result in x's dtype."""
    rdim = rotary_dim
    cdtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = rotary_inv_freq(rdim, base, x.device, cdtype)
    angle = positions.to(cdtype)[..., None] * inv_freq  # (batch, L, R/2)
    cos, sin = angle.cos()[:, :, None, :], angle.sin()[:, :, None, :]  # (batch, L, 1, R/2)
    rot = x[..., :rdim].to(cdtype)
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = rot[..., : rdim // 2], rot[..., rdim // 2:]
        rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rdim:]), dim=-1)


def document_mask(reset: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) bool, True where query i may see key j: j <= i in the same document."""
    doc = torch.cumsum(reset.to(torch.int32), dim=-1)  # (batch, L) document index per token
    length = doc.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=reset.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reset: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """q (batch, L, h, D), k and v (batch, L, h_kv, D) with h_kv dividing h; reset (batch, L) bool
    document starts or None. Returns (batch, L, h, D): causal attention inside each document."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA takes (batch, heads, L, D)
    gqa = q.shape[1] != k.shape[1]
    if reset is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(reset), scale=scale,
                                             enable_gqa=gqa)
    return out.transpose(1, 2)


def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One new query per sequence against every cached key: q (batch, h, D), k and v (batch, T,
    h_kv, D) holding the context and the new token. Returns (batch, h, D)."""
    q = q[:, :, None, :]  # (batch, h, 1, D)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (batch, h_kv, T, D)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, 0, :]


def attention_ref(q, k, v, reset=None, scale=None):
    """The plain formula in float64, loops for the mask: same arguments and result as
    `document_attention` (returned in float64). For tests only."""
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        start = 0
        for i in range(length):
            if reset is not None and i > 0 and bool(reset[b, i]):
                start = i
            allowed[b, i, start: i + 1] = True
    out = torch.empty(batch, length, heads, dim, dtype=torch.float64)
    for h in range(heads):
        scores = scale * torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, h // group])
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[:, :, h] = torch.einsum("bij,bjd->bid", weights, v[:, :, h // group])
    return out


def rotary_ref(x, positions, rotary_dim, base, interleaved=False):
    """RoPE as complex multiplication (RoFormer eq. (34)) in float64: same result as apply_rotary."""
    x = x.double()
    freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    rot = x[..., :rotary_dim]
    if interleaved:
        pairs = torch.complex(rot[..., 0::2], rot[..., 1::2])
    else:
        pairs = torch.complex(rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:])
    turned = pairs * torch.polar(torch.ones_like(freq), positions.double()[..., None, None] * freq)
    parts = (torch.stack((turned.real, turned.imag), -1).flatten(-2) if interleaved
             else torch.cat((turned.real, turned.imag), -1))
    return torch.cat((parts, x[..., rotary_dim:]), dim=-1)
