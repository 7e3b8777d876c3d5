"""Depthwise causal conv1d with document isolation, and a per-document reference.

Mamba-1 runs a short depthwise causal convolution over the expanded channels before the SSM
(Gu & Dao 2023, "Mamba", Fig. 3; mamba-ssm `mamba_simple.py`: `nn.Conv1d(groups=d_inner,
padding=d_conv - 1)` truncated to the first L outputs, then SiLU). With K = d_conv taps:

    out[b, d, t] = bias[d] + sum_{k=0}^{K-1} weight[d, 0, K-1-k] * x[b, d, t-k]      (x[., ., <0] = 0)

In a packed window several documents follow each other; with document isolation a token must not
see the previous document's tail, i.e. x[t-k] counts only if t-k is in the same document as t.
Written as a sum of K shifted, weighted copies of x, that is one mask per shift: keep
x[t-k] where no document starts in (t-k, t]. Masking multiplies by exact zeros, so the output of
a document is bit-for-bit independent of what the documents before it contain.

The activation (SiLU) is left to the caller, as in mamba-ssm's slow path. `causal_conv1d_step` is
the same convolution one token at a time, for recurrent inference (the mixers' `step`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x, weight, bias=None, reset=None):
    """x (batch, D, L), weight (D, 1, K) (nn.Conv1d's depthwise layout), bias (D,) or None,
    reset (batch, L) bool or None: True where a document starts. Returns (batch, D, L).

    Computes time-major, on the (batch, L, D) transpose of x: the mixer's x is a (batch, D, L)
    view of (batch, L, D)-contiguous memory, so that transpose is free, every shifted slice is a
    contiguous block of rows, and the result is (batch, L, D)-contiguous again (a (batch, D, L)
    view of it is returned). Mixing the two layouts would cost transposing copies.
    """
    length, taps = x.shape[-1], weight.shape[-1]
    xt = x.transpose(1, 2)  # (batch, L, D)
    w = weight[:, 0, :].t()  # (K, D); w[K-1] multiplies x_t, w[K-1-k] multiplies x_{t-k}
    out = xt * w[taps - 1] if bias is None else torch.addcmul(bias, xt, w[taps - 1])
    same_doc = _same_document_masks(reset, taps, x.dtype) if reset is not None else None
    for k in range(1, min(taps, length)):
        shifted = xt[:, : length - k]  # x_{t-k} for t = k .. L-1
        if same_doc is not None:
            shifted = shifted * same_doc[k - 1][:, :, None]
        out[:, k:].addcmul_(shifted, w[taps - 1 - k])
    return out.transpose(1, 2)


def causal_conv1d_step(conv_state, x, weight, bias=None):
    """One token of `causal_conv1d`: x (batch, D) the newest input; conv_state (batch, D, K) the last
    K inputs, oldest first, shifted in place so that x becomes its last entry. Returns the output
    (batch, D) in conv_state's dtype (mamba-ssm's `causal_conv1d_update` without the activation).

    The newest input sits at index K-1 and meets weight[:, 0, K-1], as in the causal conv
    (out_t = sum_k weight[K-1-k] x_{t-k}); a zero state is an empty context.
    """
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state * weight[:, 0, :].to(conv_state.dtype)).sum(-1)
    return out if bias is None else out + bias.to(out.dtype)


def _same_document_masks(reset, taps, dtype):
    """For k = 1 .. K-1: (batch, L-k) masks, 1 where x_{t-k} is in the document of x_t (t >= k).

    A document index per token (how many documents have started up to and including it) makes
    this one comparison per shift: same document iff the index is unchanged across the shift.
    """
    doc = torch.cumsum(reset.to(torch.int32), dim=-1)  # (batch, L)
    length = doc.shape[-1]
    return [(doc[:, k:] == doc[:, : length - k]).to(dtype) for k in range(1, min(taps, length))]


def causal_conv1d_ref(x, weight, bias=None, reset=None):
    """The straightforward version: cut each row into its documents and run nn.Conv1d's causal,
    zero-padded depthwise convolution on each piece separately. Same arguments and result as
    `causal_conv1d`; slow (a Python loop over documents), for tests only.
    """
    batch, channels, length = x.shape
    taps = weight.shape[-1]
    if reset is None:
        reset = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
    rows = []
    for b in range(batch):
        starts = [0] + [t for t in range(1, length) if reset[b, t]] + [length]
        pieces = [
            F.conv1d(x[b : b + 1, :, s:e], weight, bias, padding=taps - 1, groups=channels)[..., : e - s]
            for s, e in zip(starts[:-1], starts[1:])
        ]
        rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(rows, dim=0)
