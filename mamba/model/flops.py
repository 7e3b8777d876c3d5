"""FLOPs per token of a Mamba-1 language model, for throughput and MFU reporting.

Counted per token, forward pass, one multiply-add = 2 FLOPs (d = d_model, E = expand * d,
N = d_state, R = dt_rank, K = d_conv, V = padded vocab):

    in_proj   2 * d * 2E          x and the gate z
    conv1d    2 * E * K           depthwise causal convolution
    x_proj    2 * E * (R + 2N)    dt (low rank), B and C
    dt_proj   2 * R * E
    scan      9 * E * N           Gu & Dao 2023 (Mamba), Sec. 3.3 / App. D: the selective scan
                                  costs ~9 FLOPs per (channel, state) element
    out_proj  2 * E * d
    lm_head   2 * d * V           once per token, not per layer

Training counts forward + backward = 3x forward (backward is twice the forward's matmuls);
activation recomputation is not counted, as in the usual MFU definition (PaLM, App. B).
Norms, SiLU, gating and the embedding lookup are O(d) and ignored.
"""
from __future__ import annotations

import math


def dt_rank_of(config) -> int:
    """mamba-ssm's "auto" dt_rank: ceil(d_model / 16)."""
    return math.ceil(config.d_model / 16) if config.dt_rank == "auto" else int(config.dt_rank)


def forward_flops_per_token(config) -> int:
    d, n = config.d_model, config.d_state
    e = config.expand * d
    r = dt_rank_of(config)
    per_layer = (2 * d * 2 * e) + (2 * e * config.d_conv) + (2 * e * (r + 2 * n)) + (2 * r * e) \
        + (9 * e * n) + (2 * e * d)
    return config.n_layer * per_layer + 2 * d * config.padded_vocab_size


def flops_per_token(config) -> int:
    """Training FLOPs per token: forward + backward."""
    return 3 * forward_flops_per_token(config)
