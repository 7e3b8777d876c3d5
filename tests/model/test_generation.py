"""Recurrent inference (MambaLMHeadModel.step, mamba/model/generation.py) against the parallel forward.

In float64 the step-by-step logits equal the full-sequence forward to 1e-10 (the same sums in
another order), for Mamba-1 and Mamba-2 (2 groups of 2 heads, SSD chunks of 8 so the 29 tokens
span several chunks), and so does each mixer's own step against its forward; the recurrent
state stays in float32 under a bf16 model; greedy decoding is deterministic, and sampling obeys
top-p.
"""
import pytest
import torch

from mamba.model.generation import generate, sample
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.model.mamba1 import Mamba
from mamba.model.mamba2 import Mamba2

VOCAB = 50


def random_model(seed: int, dtype=torch.float64, ssm_layer="mamba1") -> MambaLMHeadModel:
    torch.manual_seed(seed)
    mamba2 = dict(headdim=16, ngroups=2, chunk_size=8) if ssm_layer == "mamba2" else {}
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, dt_rank=4,
                                         ssm_layer=ssm_layer, kernels="torch", **mamba2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_step_by_step_logits_equal_full_forward_float64(ssm_layer):
    model = random_model(0, ssm_layer=ssm_layer)
    ids = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)  # (3, 29, 56)
    cache = model.allocate_inference_cache(batch=3)
    stepped = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    assert stepped.dtype == torch.float64
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mixer_class, kw", [(Mamba, dict(dt_rank=4)), (Mamba2, dict(headdim=16, ngroups=2))])
def test_each_mixer_step_equals_its_forward_float64(mixer_class, kw):
    torch.manual_seed(8)
    mixer = mixer_class(32, d_state=8, kernels_mode="torch", **kw).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 13, 32, dtype=torch.float64)
        full = mixer(x)
        conv_state, ssm_state = mixer.allocate_inference_cache(2)
        stepped = torch.stack([mixer.step(x[:, t], conv_state, ssm_state) for t in range(13)], dim=1)
    assert conv_state.dtype == ssm_state.dtype == torch.float64
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_inference_state_is_at_least_float32_under_bf16(ssm_layer):
    model = random_model(9, dtype=torch.bfloat16, ssm_layer=ssm_layer)
    cache = model.allocate_inference_cache(batch=2)
    assert len(cache) == 2 and all(s.dtype == torch.float32 for layer in cache for s in layer)
    logits = model.step(torch.tensor([3, 4]), cache)
    assert logits.shape == (2, 56) and logits.dtype == torch.bfloat16
    assert all(bool(layer[1].abs().sum() > 0) for layer in cache)  # the step wrote the SSM states


def test_step_by_step_float32_within_tight_tolerance():
    model = random_model(2, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
    cache = model.allocate_inference_cache(batch=2)
    stepped = torch.stack([model.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_greedy_decode_is_deterministic_and_follows_argmax_of_forward(ssm_layer):
    model = random_model(4, ssm_layer=ssm_layer)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, generate(model, prompt, max_new_tokens=12))
    with torch.no_grad():  # each new token is the argmax of the parallel forward over what precedes it
        logits = model(out[:, :-1])[:, 4:, :VOCAB]
    assert torch.equal(logits.argmax(-1), out[:, 5:])


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = random_model(6)
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(7))
    free = generate(model, prompt, max_new_tokens=6)
    eos = int(free[0, 6])  # make the third generated token the EOS
    out = generate(model, prompt, max_new_tokens=6, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0].item()
    assert out.shape[1] == 4 + first + 1 and torch.equal(out[0, : 4 + first], free[0, : 4 + first])


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0, 0.0]]) + 1e-30).repeat(4000, 1)
    draws = sample(logits, vocab_size=4, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    again = sample(logits, vocab_size=4, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    # 0.5 + 0.3 reaches 0.7: only tokens 0 and 1 remain, renormalised to 5/8 and 3/8.
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.03  # ~4 standard deviations
    full = sample(logits, vocab_size=4, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert set(full.tolist()) == {0, 1, 2, 3}  # padding ids 4, 5 never drawn
    assert torch.equal(sample(logits[:2], vocab_size=4), torch.zeros(2, dtype=torch.long))

