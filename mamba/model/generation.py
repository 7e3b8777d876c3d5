"""Text generation from a Mamba LM: the decoding loop and sampling.

A Mamba layer's whole memory of the past is two small tensors per sequence, its conv and SSM
states; `MambaLMHeadModel.step` updates them from the new token alone (each mixer's `step`, the
per-token form of its forward, as mamba-ssm's `Mamba.step` / `Mamba2.step`), so the cost per
generated token does not grow with the context. The prompt is consumed by the same step (prefill
costs len(prompt) steps): one code path, checked against the parallel forward by
tests/model/test_generation.py.
"""
from __future__ import annotations

import torch

from mamba.model.lm import MambaLMHeadModel


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
    cache = model.allocate_inference_cache(input_ids.shape[0])
    for t in range(input_ids.shape[1]):
        logits = model.step(input_ids[:, t], cache)
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
        logits = model.step(token, cache)
    return torch.cat(out, dim=1)
