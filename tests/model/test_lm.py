"""MambaLMHeadModel: mamba-ssm's parameter layout, HF transformers' logits, document isolation,
meta-device initialisation, and that it trains."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

from mamba.model import MambaConfig, MambaLMHeadModel

transformers.logging.set_verbosity_error()  # HF warns that its CUDA fast path is unavailable

SMALL = MambaConfig(d_model=64, n_layer=2, vocab_size=100)


def mixer_shapes(d_model, d_state=16, d_conv=4, expand=2):
    e, r = expand * d_model, math.ceil(d_model / 16)
    return {
        "A_log": (e, d_state), "D": (e,), "in_proj.weight": (2 * e, d_model),
        "conv1d.weight": (e, 1, d_conv), "conv1d.bias": (e,), "x_proj.weight": (r + 2 * d_state, e),
        "dt_proj.weight": (e, r), "dt_proj.bias": (e,), "out_proj.weight": (d_model, e),
    }


def test_parameter_names_and_shapes_are_mamba_ssm():
    model = MambaLMHeadModel(SMALL)
    assert SMALL.padded_vocab_size == 104
    expected = {"backbone.embedding.weight": (104, 64), "backbone.norm_f.weight": (64,),
                "lm_head.weight": (104, 64)}
    for i in range(2):
        expected[f"backbone.layers.{i}.norm.weight"] = (64,)
        for name, shape in mixer_shapes(64).items():
            expected[f"backbone.layers.{i}.mixer.{name}"] = shape
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.lm_head.weight is model.backbone.embedding.weight
    untied = MambaLMHeadModel(dataclasses.replace(SMALL, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    no_decay = {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_decay == {f"backbone.layers.{i}.mixer.{n}" for i in range(2)
                        for n in ("A_log", "D", "dt_proj.bias")}


def test_num_parameters():
    model = MambaLMHeadModel(SMALL)
    per_layer = 64 + sum(math.prod(s) for s in mixer_shapes(64).values())
    assert model.num_parameters() == 104 * 64 + 2 * per_layer + 64  # tied head counted once
    assert model.num_parameters(exclude_embedding=True) == 2 * per_layer + 64
    untied = MambaLMHeadModel(dataclasses.replace(SMALL, tie_embeddings=False))
    assert untied.num_parameters() == 2 * 104 * 64 + 2 * per_layer + 64


def hf_twin(model: MambaLMHeadModel) -> MambaForCausalLM:
    """HF's MambaForCausalLM with the same architecture, loaded with `model`'s weights."""
    c = model.config
    hf = MambaForCausalLM(HFMambaConfig(
        hidden_size=c.d_model, state_size=c.d_state, num_hidden_layers=c.n_layer,
        vocab_size=c.padded_vocab_size, expand=c.expand, conv_kernel=c.d_conv,
        time_step_rank=math.ceil(c.d_model / 16), use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=c.norm_eps, residual_in_fp32=True, tie_word_embeddings=c.tie_embeddings,
    ))
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_hf_transformers(dtype, tol, tie):
    """HF's sequential CPU path is an independent implementation of the same network.

    Tolerances: float32 rounding; in float64 HF still computes RMSNorm statistics and the
    residual in float32 (~1e-7 differences), so 1e-6 there.
    """
    torch.manual_seed(0)
    model = MambaLMHeadModel(dataclasses.replace(SMALL, tie_embeddings=tie))
    with torch.no_grad():  # move the norms and skips off their all-equal initial values
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
                p.uniform_(0.5, 1.5)
    model, hf = model.to(dtype), hf_twin(model).to(dtype)
    input_ids = torch.randint(0, SMALL.vocab_size, (2, 64))
    with torch.no_grad():
        ours = model(input_ids)
        theirs = hf(input_ids, use_cache=False).logits.to(dtype)  # HF returns float32 logits
    assert ours.shape == (2, 64, 104) and ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def two_documents(model, first_len=15, total=40, seed=0):
    """A batch of 2 windows holding a document of first_len tokens, then one of the rest."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (2, total), generator=g)
    position_ids = torch.cat([torch.arange(first_len), torch.arange(total - first_len)]).expand(2, -1)
    return input_ids, position_ids


def test_document_isolation():
    torch.manual_seed(0)
    model = MambaLMHeadModel(dataclasses.replace(SMALL, d_model=32)).double()
    blind = MambaLMHeadModel(dataclasses.replace(model.config, document_isolation=False)).double()
    blind.load_state_dict(model.state_dict())
    input_ids, position_ids = two_documents(model)
    changed = input_ids.clone()
    changed[:, :15] = (changed[:, :15] + 1 + torch.arange(15)) % model.config.vocab_size
    with torch.no_grad():
        logits, logits_changed = model(input_ids, position_ids), model(changed, position_ids)
        # Isolation on: document B's logits are bit-for-bit independent of document A ...
        assert torch.equal(logits[:, 15:], logits_changed[:, 15:])
        assert not torch.equal(logits[:, :15], logits_changed[:, :15])
        # ... and equal to document B run on its own.
        alone = model(input_ids[:, 15:], position_ids[:, 15:])
        torch.testing.assert_close(logits[:, 15:], alone, rtol=1e-10, atol=1e-10)
        # Isolation off: the state flows across the boundary.
        assert not torch.equal(blind(input_ids, position_ids)[:, 15:], blind(changed, position_ids)[:, 15:])
        # Without position_ids, or with no boundary inside the window, nothing is reset.
        whole = torch.arange(40).expand(2, -1)
        assert torch.equal(model(input_ids), model(input_ids, whole))
        assert torch.equal(blind(input_ids, position_ids), model(input_ids))


def test_meta_device_init():
    config = dataclasses.replace(SMALL, n_layer=4)
    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    assert model.backbone.embedding.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.backbone.embedding.weight  # re-tied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    n = torch.arange(1, 17, dtype=torch.float32)
    for layer in model.backbone.layers:
        mixer = layer.mixer
        assert torch.equal(mixer.A_log, torch.log(n).expand(128, -1))
        assert torch.equal(mixer.D, torch.ones(128))
        assert torch.equal(layer.norm.weight, torch.ones(64))
        assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay
        dt = F.softplus(mixer.dt_proj.bias)  # the initial step sizes, in [dt_init_floor, dt_max]
        assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert mixer.dt_proj.weight.abs().max() <= 4**-0.5  # U(-dt_rank^-0.5, dt_rank^-0.5)
        # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in), then / sqrt(n_layer)
        assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(128) / math.sqrt(4)
        assert mixer.out_proj.weight.abs().max() > 0.8 / math.sqrt(128) / math.sqrt(4)
        assert mixer.conv1d.bias.abs().max() <= 0.5  # nn.Conv1d default: bound 1/sqrt(K)
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.002
    # the same forward as a model built directly on the CPU
    input_ids, _ = two_documents(model)
    assert torch.isfinite(model(input_ids)).all()


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = MambaLMHeadModel(SMALL)
    input_ids, position_ids = two_documents(model, first_len=20, total=65, seed=3)
    inputs, labels, positions = input_ids[:, :-1], input_ids[:, 1:], position_ids[:, :-1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for _ in range(30):
        logits = model(inputs, positions)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1.0, losses
