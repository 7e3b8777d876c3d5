"""Chunked cross-entropy over the vocabulary: the LM head and the loss fused, chunk by chunk.

The plain loss `F.cross_entropy(lm_head(h).float(), labels)` materialises B x L x V logits in
fp32 (plus the same again for their gradient): for B*L = 64k tokens and V = 50k that is 13 GB, more
than the whole Mamba-130m training state. Here the N = B*L flattened tokens are cut into chunks of
`chunk_size` rows; only one chunk's (chunk_size, V) fp32 logits exist at a time, in forward AND
backward:

    forward   per chunk: logits = h_c @ W^T (fp32), keep lse_c = logsumexp(logits) and the target
              logit; loss = sum over counted tokens of (lse - target) / n_counted
    backward  per chunk, logits recomputed from the saved h and W (one extra matmul per chunk,
              the price of not storing N x V):  g = (softmax(logits) - onehot(target)) * dL / n
              dh_c = g @ W,   dW += g^T @ h_c

Padded vocabulary: the model's head has `padded_vocab_size` rows (a multiple of 8, as in
mamba-ssm) but only the first `vocab_size` are real tokens. The loss uses W[:vocab_size]: padded
rows take no part in the softmax and get exactly zero gradient from the loss, so the loss is the
tokenizer-vocabulary cross-entropy whatever the padding. A label >= vocab_size is an error.

IGNORE_INDEX (-100, mamba/layout.py) tokens contribute nothing; the mean is over counted tokens, as
`F.cross_entropy(reduction="mean")`. One deliberate difference: when no token of the batch is
counted, F.cross_entropy returns nan (0/0); this returns 0 with zero gradients, so a micro batch
made only of masked tokens (possible with loss masks) cannot poison a gradient-accumulation step.
"""
from __future__ import annotations

import torch

from mamba.layout import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 4096  # rows of (chunk, V) fp32 logits: 4096 x 50k x 4 B = 0.8 GB at most


class _ChunkedCrossEntropy(torch.autograd.Function):
    """hidden (N, d), weight (V_used, d), labels (N,) -> scalar mean loss; see the module doc."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
        counted = labels != IGNORE_INDEX
        n_counted = int(counted.sum())
        lse = torch.zeros(n, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        safe_labels = torch.where(counted, labels, 0)  # gather needs a valid index everywhere
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (hidden[rows] @ weight.t()).to(acc)  # (chunk, V_used) fp32: the only big buffer
            lse[rows] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_labels[rows, None])[:, 0]
            total += ((lse[rows] - target) * counted[rows]).sum()
        ctx.save_for_backward(hidden, weight, safe_labels, counted, lse)
        ctx.chunk_size, ctx.n_counted = chunk_size, n_counted
        return total / max(n_counted, 1)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe_labels, counted, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        scale = grad_loss.to(acc) / max(ctx.n_counted, 1)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            logits = (hidden[rows] @ weight.t()).to(acc)  # recomputed, (chunk, V_used)
            g = torch.exp(logits - lse[rows, None])  # softmax
            g.scatter_add_(1, safe_labels[rows, None], torch.full_like(g[:, :1], -1.0))
            g *= (counted[rows] * scale)[:, None]  # ignored rows: zero gradient
            if grad_hidden is not None:
                grad_hidden[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += g.t() @ hidden[rows].to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ head_weight[:vocab_size].T` against `labels`.

    hidden (..., d) final hidden states (any leading shape, e.g. (B, L, d)); head_weight
    (V_padded, d) the LM head (tied or not); labels (...) int64 with IGNORE_INDEX for tokens that
    carry no loss; vocab_size the real vocabulary (default: every head row). The matmul runs in
    the common dtype of hidden and head_weight (bf16 under mixed precision, as the plain head
    would), the softmax and the sums in fp32 (fp64 for fp64 inputs); the loss comes back in that
    dtype.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and labels "
                         f"{tuple(labels.shape)} must share the leading (token) dimensions")
    if chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size={chunk_size} must be >= 1")
    vocab_size = head_weight.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab_size <= head_weight.shape[0]:
        raise ValueError(f"chunked_cross_entropy: vocab_size={vocab_size} must be in 1..{head_weight.shape[0]} "
                         "(the head's rows)")
    labels = labels.reshape(-1)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"chunked_cross_entropy: label {int(labels[bad][0])} is outside the vocabulary "
                         f"0..{vocab_size - 1} (and is not ignore_index {IGNORE_INDEX}); check the "
                         "tokenizer's vocab size against model.vocab_size")
    dtype = torch.promote_types(hidden.dtype, head_weight.dtype)
    return _ChunkedCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]).to(dtype), head_weight[:vocab_size].to(dtype), labels, chunk_size
    )
