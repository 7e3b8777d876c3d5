"""Recurrent inference: one token at a time with conv and SSM state caches, O(1) work per token.

A Mamba layer's whole memory of the past is two small tensors per sequence:
  conv state  (batch, C, d_conv): the last d_conv inputs of the depthwise causal conv
              (C = d_inner for Mamba-1, d_inner + 2 * ngroups * d_state for Mamba-2's xBC);
  SSM state   Mamba-1 (batch, d_inner, d_state), Mamba-2 (batch, nheads, headdim, d_state).
A step updates both from the new token alone, so the cost per generated token does not grow with
the context. The step equations are the per-token form of the training forward (the recurrence
in mamba/model/ops/selective_scan.py; Mamba-2: Dao & Gu 2024, "Transformers are SSMs", eq. (1)
with scalar-per-head A), as in mamba-ssm's `Mamba.step` / `Mamba2.step`. The prompt is consumed
by the same step (prefill costs len(prompt) steps): one code path, checked against the parallel
forward by tests/model/test_generation.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba.model.lm import MambaLMHeadModel


class InferenceCache:
    """Per-layer (conv_state, ssm_state) for `batch` sequences, zero = empty context."""

    def __init__(self, model: MambaLMHeadModel, batch: int):
        param = model.backbone.embedding.weight
        # States accumulate over the whole context: keep them in at least float32.
        dtype = torch.promote_types(param.dtype, torch.float32)
        self.layers = [layer_state(layer.mixer, batch, param.device, dtype) for layer in model.backbone.layers]


def layer_state(mixer, batch: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero (conv_state, ssm_state) for one Mamba-1 or Mamba-2 mixer (shapes: module docstring)."""
    conv = torch.zeros(batch, mixer.conv1d.weight.shape[0], mixer.d_conv, device=device, dtype=dtype)
    if hasattr(mixer, "x_proj"):  # Mamba-1
        return conv, torch.zeros(batch, mixer.d_inner, mixer.d_state, device=device, dtype=dtype)
    return conv, torch.zeros(batch, mixer.nheads, mixer.headdim, mixer.d_state, device=device, dtype=dtype)


def _conv_step(conv_state: torch.Tensor, x: torch.Tensor, conv1d: torch.nn.Conv1d) -> torch.Tensor:
    """Shift x (batch, C) into conv_state (batch, C, K) in place; return the conv output (batch, C).

    The newest input sits at index K-1 and meets weight[:, 0, K-1], as in the causal conv
    (out_t = sum_k weight[K-1-k] x_{t-k}).
    """
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state * conv1d.weight[:, 0, :].to(conv_state.dtype)).sum(-1)
    return out if conv1d.bias is None else out + conv1d.bias.to(out.dtype)


def _mamba1_step(m, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """hidden (batch, d_model) -> (batch, d_model); updates the states in place."""
    dtype = conv_state.dtype
    x, z = m.in_proj(hidden).to(dtype).chunk(2, dim=-1)  # (batch, E) each
    x = F.silu(_conv_step(conv_state, x, m.conv1d))
    dt, B, C = torch.split(m.x_proj(x.to(hidden.dtype)).to(dtype), [m.dt_rank, m.d_state, m.d_state], dim=-1)
    # A, D and the dt bias as the parallel forward takes them: float32 (mamba1.py, as mamba-ssm).
    dt = F.softplus(F.linear(dt, m.dt_proj.weight.to(dtype), m.dt_proj.bias.float().to(dtype)))  # (batch, E)
    A = -torch.exp(m.A_log.float()).to(dtype)  # (E, N)
    # h = exp(dt A) h + dt B x;  y = <C, h> + D x;  y *= silu(z)
    ssm_state.mul_(torch.exp(dt[:, :, None] * A)).add_(dt[:, :, None] * x[:, :, None] * B[:, None, :])
    y = torch.einsum("ben,bn->be", ssm_state, C) + m.D.float().to(dtype) * x
    y = y * F.silu(z)
    return m.out_proj(y.to(hidden.dtype))


def _mamba2_step(m, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """hidden (batch, d_model) -> (batch, d_model); updates the states in place.

    in_proj's output is [z (E), xBC (E + 2 G N), dt (H)] (mamba-ssm 2.x without the optional
    d_mlp part); x is (H, P) per token, B and C (G, N), head h reading group h // (H / G).
    """
    dtype = conv_state.dtype
    batch = hidden.shape[0]
    H, P, N, G = m.nheads, m.headdim, m.d_state, m.ngroups
    d_ssm = H * P  # = d_inner
    zxbcdt = m.in_proj(hidden).to(dtype)
    z, xBC, dt = torch.split(zxbcdt, [d_ssm, d_ssm + 2 * G * N, H], dim=-1)
    xBC = F.silu(_conv_step(conv_state, xBC, m.conv1d))
    x, B, C = torch.split(xBC, [d_ssm, G * N, G * N], dim=-1)
    x = x.view(batch, H, P)
    B = B.view(batch, G, N).repeat_interleave(H // G, dim=1)  # (batch, H, N)
    C = C.view(batch, G, N).repeat_interleave(H // G, dim=1)
    # A, D and dt_bias in float32 as the parallel forward takes them (mamba2.py, as mamba-ssm).
    dt = F.softplus(dt + m.dt_bias.float().to(dtype))  # (batch, H)
    A = -torch.exp(m.A_log.float()).to(dtype)  # (H,)
    ssm_state.mul_(torch.exp(dt * A)[:, :, None, None]).add_(
        (dt[:, :, None] * x)[:, :, :, None] * B[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", ssm_state, C)
    y = y + m.D.float().to(dtype)[:, None] * x  # D: one skip weight per head
    y = m.norm(y.reshape(batch, d_ssm).to(hidden.dtype), z.to(hidden.dtype))  # gated RMSNorm
    return m.out_proj(y)


def mixer_step(mixer, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """One token through a Mamba-1 or Mamba-2 mixer: (batch, d_model) -> (batch, d_model)."""
    step_fn = _mamba1_step if hasattr(mixer, "x_proj") else _mamba2_step
    return step_fn(mixer, hidden, conv_state, ssm_state)


@torch.no_grad()
def step(model: MambaLMHeadModel, tokens: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
    """Feed one token per sequence: tokens (batch,) int64 -> logits (batch, padded_vocab)."""
    hidden, residual = model.backbone.embedding(tokens), None
    for layer, (conv_state, ssm_state) in zip(model.backbone.layers, cache.layers):
        # The block's prenorm-residual form (mamba/model/block.py) for one token.
        residual = hidden if residual is None else hidden + residual
        normed = layer.norm(residual.to(layer.norm.weight.dtype))
        if layer.residual_in_fp32:
            residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        hidden = mixer_step(layer.mixer, normed, conv_state, ssm_state)
    residual = hidden + residual
    norm_f = model.backbone.norm_f
    return model.lm_head(norm_f(residual.to(norm_f.weight.dtype)))


def sample(logits: torch.Tensor, vocab_size: int, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits (batch, padded_vocab); padding rows are never chosen.

    temperature 0: greedy (argmax). Otherwise softmax(logits / temperature), restricted to the
    smallest set of most likely tokens whose probability reaches top_p (nucleus sampling,
    Holtzman et al. 2020), renormalised.
    """
    logits = logits[:, :vocab_size].float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the top one stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: MambaLMHeadModel, input_ids: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """input_ids (batch, L) prompt, L >= 1 -> (batch, L + n) with n <= max_new_tokens new tokens.

    vocab_size: ids that may be generated are < vocab_size (default: the model's real vocabulary;
    a HF directory records only the padded one, so pass the tokenizer's size there).
    Stops early once every sequence has produced eos_token_id; finished sequences are padded
    with eos_token_id.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, L) with L >= 1, got shape {tuple(input_ids.shape)}")
    cache = InferenceCache(model, input_ids.shape[0])
    for t in range(input_ids.shape[1]):
        logits = step(model, input_ids[:, t], cache)
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        token = sample(logits, vocab_size or model.config.vocab_size, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out.append(token[:, None])
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(model, token, cache)
    return torch.cat(out, dim=1)
