"""The attention mixer of hybrid models, with mamba-ssm 2.x's `MHA` parameter names, shapes and
options (`mamba_ssm/modules/mha.py`; mlp_dim = 0), so hybrid state dicts load in mamba-ssm.

Per token, with h query heads, h_kv key/value heads, D = head_dim:

    qkv     = in_proj(hidden)                    (h + 2 h_kv) D: q, then k, then v
    qkv     = causal_conv1d(qkv)                 only with d_conv > 0: depthwise, no activation
    q, k, v = heads of qkv                       q (h, D), k and v (h_kv, D)
    q, k    = rotary(q, k, in-document position) only with rotary_emb_dim > 0: the first R channels
    out     = out_proj(attention(q, k, v))       causal, within the token's document (ops/attention.py)

Document isolation as in the SSM mixers: `reset` (batch, L) marks document starts; attention,
the optional conv and the rotary positions all restart there.

Recurrent inference: the state of an attention layer is its KV cache (every past k and v; it
grows with the context, unlike a Mamba layer's fixed state) and, with d_conv > 0, the conv state.
`step` appends the new token's k and v and attends over the cache: the per-token form of forward.
"""
from __future__ import annotations

import torch
from torch import nn

from mamba.model.mixer_init import state_options
from mamba.model.ops import kernels
from mamba.model.ops.attention import apply_rotary, attention_step, document_attention, positions_from_reset
from mamba.model.ops.causal_conv1d import causal_conv1d, causal_conv1d_step


class KVCache:
    """One attention layer's keys and values so far: k, v (batch, length, h_kv, D) views of
    buffers that grow by doubling, so appending T tokens costs O(T) copies in all."""

    def __init__(self, batch: int, heads_kv: int, head_dim: int, device=None, dtype=None):
        self._k = torch.zeros(batch, 16, heads_kv, head_dim, device=device, dtype=dtype)
        self._v = torch.zeros_like(self._k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one token's k, v (batch, h_kv, D); returns the whole cache (batch, length, h_kv, D)."""
        if self.length == self._k.shape[1]:
            self._k = torch.cat((self._k, torch.zeros_like(self._k)), dim=1)
            self._v = torch.cat((self._v, torch.zeros_like(self._v)), dim=1)
        self._k[:, self.length] = k
        self._v[:, self.length] = v
        self.length += 1
        return self._k[:, : self.length], self._v[:, : self.length]


class MHA(nn.Module):
    """Multi-head (grouped-query) causal attention: (batch, L, d_model) -> (batch, L, d_model).

    Parameters (mamba-ssm names): in_proj.weight ((h + 2 h_kv) D, d_model) (+ bias with
    qkv_proj_bias), conv1d.weight ((h + 2 h_kv) D, 1, d_conv) and conv1d.bias with d_conv > 0,
    out_proj.weight (d_model, h D) (+ bias with out_proj_bias). The rotary frequencies are not
    state (mamba-ssm keeps them as a non-persistent buffer): ops/attention.apply_rotary computes them.
    """

    def __init__(self, d_model: int, num_heads: int, num_heads_kv: int | None = None, head_dim: int | None = None,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
                 qkv_proj_bias: bool = True, out_proj_bias: bool = True, d_conv: int = 0, causal: bool = True,
                 softmax_scale: float | None = None, kernels_mode: str = "auto", device=None, dtype=None):
        super().__init__()
        if not causal:
            raise ValueError("MHA: causal=False would let a language model see the tokens it predicts; "
                             "set attn_cfg.causal: true")
        self.d_model, self.num_heads = d_model, num_heads
        self.num_heads_kv = num_heads_kv or num_heads
        if num_heads <= 0 or num_heads % self.num_heads_kv:
            raise ValueError(f"MHA: num_heads_kv={self.num_heads_kv} must divide num_heads={num_heads} (> 0)")
        if head_dim is None and d_model % num_heads:
            raise ValueError(f"MHA: d_model={d_model} is not a multiple of num_heads={num_heads}; set head_dim")
        self.head_dim = head_dim or d_model // num_heads
        if rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"MHA: rotary_emb_dim={rotary_emb_dim} must be even and <= head_dim={self.head_dim}")
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.d_conv, self.softmax_scale, self.kernels_mode = d_conv, softmax_scale, kernels_mode
        self._rotary = (rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved)  # apply_rotary's arguments
        factory = {"device": device, "dtype": dtype}
        self.q_dim = self.num_heads * self.head_dim
        self.kv_dim = self.num_heads_kv * self.head_dim
        qkv_dim = self.q_dim + 2 * self.kv_dim
        self.in_proj = nn.Linear(d_model, qkv_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, d_conv, groups=qkv_dim, padding=d_conv - 1, **factory)
        self.out_proj = nn.Linear(self.q_dim, d_model, bias=out_proj_bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear / nn.Conv1d defaults with Linear biases zero (mamba-ssm `_init_weights`); safe
        after `to_empty()` from the meta device."""
        for linear in (self.in_proj, self.out_proj):
            linear.reset_parameters()
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.d_conv > 0:
            self.conv1d.reset_parameters()

    def _split_heads(self, qkv: torch.Tensor):
        """(..., (h + 2 h_kv) D) -> q (..., h, D), k and v (..., h_kv, D)."""
        q, k, v = torch.split(qkv, [self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        return (q.unflatten(-1, (self.num_heads, self.head_dim)), k.unflatten(-1, (self.num_heads_kv, self.head_dim)),
                v.unflatten(-1, (self.num_heads_kv, self.head_dim)))

    def forward(self, hidden_states: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (batch, L, d_model); reset (batch, L) bool, True at document starts."""
        batch, length, _ = hidden_states.shape
        qkv = self.in_proj(hidden_states)  # (batch, L, (h + 2 h_kv) D)
        if self.d_conv > 0:
            qkv = causal_conv1d(qkv.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, reset).transpose(1, 2)
        q, k, v = self._split_heads(qkv)
        if self.rotary_emb_dim > 0:
            positions = positions_from_reset(reset, batch, length, hidden_states.device)
            q = apply_rotary(q, positions, *self._rotary)
            k = apply_rotary(k, positions, *self._rotary)
        if kernels.use_flash_attention(self.kernels_mode, q):
            out = kernels.flash_attention_varlen(q, k, v, reset, self.softmax_scale)
        else:
            out = document_attention(q, k, v, reset, self.softmax_scale)  # (batch, L, h, D)
        return self.out_proj(out.flatten(2))

    def allocate_inference_cache(self, batch: int, device=None, dtype=None) -> tuple:
        """An empty context: (KVCache,), and a zero conv state (batch, (h + 2 h_kv) D, d_conv) with
        d_conv > 0; in at least float32 (mixer_init.state_options)."""
        options = state_options(self.in_proj.weight, device, dtype)
        cache = KVCache(batch, self.num_heads_kv, self.head_dim, **options)
        if self.d_conv == 0:
            return (cache,)
        return cache, torch.zeros(batch, self.conv1d.weight.shape[0], self.d_conv, **options)

    def step(self, hidden: torch.Tensor, cache: KVCache, conv_state: torch.Tensor | None = None) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model); appends to the cache (and shifts
        the conv state) in place. Computed in the cache's dtype; the projections in the weights'."""
        dtype = cache._k.dtype
        qkv = self.in_proj(hidden).to(dtype)  # (batch, (h + 2 h_kv) D)
        if self.d_conv > 0:
            qkv = causal_conv1d_step(conv_state, qkv, self.conv1d.weight, self.conv1d.bias)
        q, k, v = self._split_heads(qkv)
        if self.rotary_emb_dim > 0:
            position = torch.full((hidden.shape[0], 1), cache.length, device=hidden.device)
            q = apply_rotary(q[:, None], position, *self._rotary)[:, 0]
            k = apply_rotary(k[:, None], position, *self._rotary)[:, 0]
        keys, values = cache.append(k, v)
        out = attention_step(q, keys, values, self.softmax_scale)  # (batch, h, D)
        return self.out_proj(out.flatten(1).to(hidden.dtype))
