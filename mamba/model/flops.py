"""FLOPs per token of a Mamba-1, Mamba-2, Mamba-3 or hybrid language model, for throughput and MFU reporting.

One multiply-add = 2 FLOPs; a (m x k) @ (k x n) matmul costs 2 m k n. Per token, forward pass,
with d = d_model, E = d_inner = expand * d, N = d_state, K = d_conv, V = padded vocab:

Mamba-1 layer (Gu & Dao 2023, Sec. 3 / Fig. 3; R = dt_rank), matmuls (the Linear layers of
mamba-ssm's `Mamba`, whose shapes the terms read off):
    in_proj   2 * d * 2E          x and the gate z
    x_proj    2 * E * (R + 2N)    dt (low rank), B and C
    dt_proj   2 * R * E
    out_proj  2 * E * d
  and the rest:
    conv1d    2 * E * K           depthwise causal convolution, one multiply-add per tap
    scan      9 * E * N           Gu & Dao 2023, Sec. 3.3.2 / App. D: the selective scan costs
                                  about 9 FLOPs per (channel, state) element per token
                                  (discretise, recurrence, output contraction)

Mamba-2 layer (Dao & Gu 2024, Sec. 6-7; H = nheads, P = headdim, G = ngroups, Q = chunk_size,
capped at the sequence length), matmuls:
    in_proj   2 * d * (2E + 2GN + H)   z, x, B, C and dt in one projection (mamba-ssm `Mamba2`)
    out_proj  2 * E * d
  and the chunked SSD scan (Dao & Gu 2024, Sec. 6 "SSD algorithm"; the matmuls of
  ops/ssd.py, each Q x Q block computed in full, as the kernels do, causal mask or not):
    C B^T     2 * Q * G * N       intra-chunk scores, per group
    M x       2 * Q * E           intra-chunk outputs
    states    2 * N * E           each chunk's final state, B^T x
    C s_in    2 * N * E           outputs from the state entering the chunk
    conv1d    2 * (E + 2GN) * K   the conv runs over x, B and C together

Mamba-3 layer (Lahoti et al. 2026, arXiv 2603.15569; mamba-ssm 2.3.2's `Mamba3`; S = the rotary
angles, mamba3.rope_angles; R = mimo_rank with is_mimo, 1 for SISO), matmuls:
    in_proj   2 * d * (2E + 2RGN + 3H + S)   z, x, B, C (R of each with MIMO), dt, A, trap and the
                                             angles in one projection
    out_proj  2 * E * d
  and the chunked scan (ops/mamba3_scan.py's mamba3_scan_chunked, the SSD steps with keys and
  queries per head, since the rotary angles depend on each head's dt; mamba-ssm's kernels compute
  the same blocks). MIMO makes each token R rows (token i, rank r) of the chunk, so a chunk of Q
  tokens is one SSD block of Q R rows per head; per token (the chunk's cost over its Q tokens):
    q k^T     2 * Q R^2 * H * N   step 1, intra-chunk scores: (QR x N) @ (N x QR) per head
    W v       2 * Q R^2 * E       step 1, intra-chunk outputs: (QR x QR) @ (QR x P) per head
    states    2 * R * N * E       step 2, each chunk's final state: (P x QR) @ (QR x N) per head
    q s_in    2 * R * N * E       step 4, outputs from the state entering the chunk: (QR x N) @ (N x P)
  R = 1 is the SISO count. No conv. The rotations, B/C norms, trapezoid weights and angle sums are
  O(R H N) per token, and MIMO's per-rank input scaling (mimo_x), gates (mimo_z) and weighted sum of
  the R outputs (mimo_o) O(R E): ignored like the other elementwise work (torch runs the mimo_o sum
  as a batched matmul of 2 R E FLOPs, 0.2% of the scan at the mamba3-mimo-1.4b shape).

Attention layer of a hybrid (mamba-ssm's MHA; h query heads, h_kv key/value heads, D head_dim,
L the sequence length), matmuls:
    in_proj   2 * d * (h + 2 h_kv) D   q, k and v
    out_proj  2 * h D * d
  and the rest:
    scores    2 * h * D * (L + 1) / 2  Q K^T: causal, so a query meets (L + 1) / 2 keys on average
    values    2 * h * D * (L + 1) / 2  P V, the same count; together the forward third of PaLM's
                                       12 * layers * H * Q * T training term (Chowdhery et al. 2022,
                                       App. B), halved for the causal mask
    conv1d    2 * (h + 2 h_kv) D * K   with attn_cfg.d_conv = K > 0
  Document isolation masks more, but the kernels compute the causal window, so that is counted.
MLP after a mixer (d_intermediate > 0; I = its hidden width rounded up to a multiple of 128, as
mamba-ssm's GatedMLP): fc1 2 * d * 2I (value and gate), fc2 2 * I * d.

Every layer: lm_head 2 * d * V once per token. The embedding lookup is a gather (no FLOPs). Norms, SiLU,
gating, softplus, the inter-chunk state recurrence (per chunk, not per token) are O(E) or less
per token and ignored.

Training counts forward + backward = 3x forward: each matmul's backward is two matmuls of the same
size (input and weight gradients). Activation recomputation (checkpointing, the chunked loss's
recomputed logits) is not counted, as in the usual MFU definition (Chowdhery et al. 2022, PaLM,
App. B), so MFU stays comparable across recomputation settings.
"""
from __future__ import annotations

from mamba.model.mamba1 import resolve_dt_rank
from mamba.model.mamba3 import rope_angles
from mamba.model.mlp import mlp_width


def mamba1_layer_flops(config) -> tuple[int, int]:
    """(matmul, other) forward FLOPs per token of one Mamba-1 mixer."""
    d, n = config.d_model, config.d_state
    e, r = config.expand * d, resolve_dt_rank(d, config.dt_rank)
    matmul = 2 * d * 2 * e + 2 * e * (r + 2 * n) + 2 * r * e + 2 * e * d
    other = 2 * e * config.d_conv + 9 * e * n
    return matmul, other


def mamba2_layer_flops(config, seq_len: int | None = None) -> tuple[int, int]:
    """(matmul in Linear layers, SSD + conv) forward FLOPs per token of one Mamba-2 mixer."""
    d, n, g = config.d_model, config.d_state, config.ngroups
    e = config.expand * d
    h = e // config.headdim
    q = config.chunk_size if seq_len is None else min(config.chunk_size, seq_len)  # ops/ssd.py's Q
    matmul = 2 * d * (2 * e + 2 * g * n + h) + 2 * e * d
    other = ssd_flops(config, q) + 2 * (e + 2 * g * n) * config.d_conv
    return matmul, other


def ssd_flops(config, q: int) -> int:
    """Forward FLOPs per token of the chunked SSD scan's matmuls with chunk length q."""
    e, n, g = config.expand * config.d_model, config.d_state, config.ngroups
    return 2 * q * g * n + 2 * q * e + 4 * n * e


def mamba3_rank(config) -> int:
    """R: the Mamba-3 MIMO rank, 1 for SISO (as the mixer sets it)."""
    return config.mimo_rank if config.is_mimo else 1


def mamba3_layer_flops(config, seq_len: int | None = None) -> tuple[int, int]:
    """(matmul in Linear layers, chunked scan) forward FLOPs per token of one Mamba-3 mixer, SISO or MIMO."""
    d, n, g = config.d_model, config.d_state, config.ngroups
    e, r = config.expand * d, mamba3_rank(config)
    h = e // config.headdim
    q = config.chunk_size if seq_len is None else min(config.chunk_size, seq_len)  # the scan's Q
    matmul = 2 * d * (2 * e + 2 * r * g * n + 3 * h + rope_angles(n, config.rope_fraction)) + 2 * e * d
    return matmul, mamba3_scan_flops(config, q)


def mamba3_scan_flops(config, q: int) -> int:
    """Forward FLOPs per token of the chunked Mamba-3 scan's matmuls with chunk length q (q tokens,
    q R rows with MIMO's rank R): scores and values over the q R rows, chunk states, read-out."""
    e, n, r = config.expand * config.d_model, config.d_state, mamba3_rank(config)
    return 2 * q * r * r * (e // config.headdim) * n + 2 * q * r * r * e + 4 * r * n * e


def attention_layer_flops(config, seq_len: int) -> tuple[int, int]:
    """(matmul in Linear layers, attention + conv) forward FLOPs per token of one MHA mixer."""
    a, d = config.attn_cfg, config.d_model
    h = a["num_heads"]
    h_kv = a.get("num_heads_kv") or h
    head_dim = a.get("head_dim") or d // h
    qkv = (h + 2 * h_kv) * head_dim
    matmul = 2 * d * qkv + 2 * h * head_dim * d
    other = 2 * 2 * h * head_dim * (seq_len + 1) // 2 + 2 * qkv * a.get("d_conv", 0)
    return matmul, other


def mlp_flops(config) -> int:
    """Forward FLOPs per token of one gated MLP (0 without: d_intermediate = 0); all matmul."""
    hidden = mlp_width(config.d_intermediate)
    return 2 * config.d_model * 2 * hidden + 2 * hidden * config.d_model if config.d_intermediate else 0


def layer_flops(config, seq_len: int | None = None, layer_idx: int = 0) -> tuple[int, int]:
    """(matmul, other) forward FLOPs per token of layer `layer_idx`, its MLP included (in matmul)."""
    if layer_idx in config.attn_layer_idx:
        if seq_len is None:
            raise ValueError("flops: a model with attention layers needs the sequence length")
        matmul, other = attention_layer_flops(config, seq_len)
    elif config.ssm_layer == "mamba1":
        matmul, other = mamba1_layer_flops(config)
    elif config.ssm_layer == "mamba2":
        matmul, other = mamba2_layer_flops(config, seq_len)
    elif config.ssm_layer == "mamba3":
        matmul, other = mamba3_layer_flops(config, seq_len)
    else:
        raise ValueError(f"flops: ssm_layer={config.ssm_layer!r} has no FLOPs formula (mamba1 | mamba2 | mamba3)")
    return matmul + mlp_flops(config), other


def forward_matmul_flops_per_token(config, seq_len: int | None = None) -> int:
    """Forward FLOPs per token of the Linear layers (mixer projections, MLPs and head) only: the
    part `torch.utils.flop_counter.FlopCounterMode` sees as aten.mm / aten.addmm (tests/model/test_flops.py)."""
    return sum(layer_flops(config, seq_len, i)[0] for i in range(config.n_layer)) + \
        2 * config.d_model * config.padded_vocab_size


def forward_flops_per_token(config, seq_len: int | None = None) -> int:
    """All forward FLOPs per token; seq_len caps Mamba-2's and Mamba-3's chunk length (None: chunk_size) and
    sets attention's length term (required with attention layers)."""
    return sum(sum(layer_flops(config, seq_len, i)) for i in range(config.n_layer)) + \
        2 * config.d_model * config.padded_vocab_size


def flops_per_token(config, seq_len: int | None = None) -> int:
    """Training FLOPs per token: forward + backward (3x forward)."""
    return 3 * forward_flops_per_token(config, seq_len)
