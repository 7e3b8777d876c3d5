"""mamba-ssm's initialisation for both mixers, through build_model, directly and via the meta
device (to_empty + init_weights)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba.config.schema import ModelConfig
from mamba.model.factory import build_model

N_LAYER, D_MODEL = 4, 64


def cfg(ssm_layer, **kw):
    return ModelConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=1000, ssm_layer=ssm_layer, d_state=16,
                       headdim=16, chunk_size=32, kernels="torch", **kw)


def no_decay_names(model):
    return {n for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}


def check_init(model, ssm_layer):
    """The distribution properties of mamba-ssm's init (`Mamba`/`Mamba2.__init__`, `_init_weights`)."""
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
    emb = model.backbone.embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.001 and abs(emb.mean().item()) < 0.001  # N(0, 0.02^2)
    d_inner = 2 * D_MODEL
    for layer in model.backbone.layers:
        mixer = layer.mixer
        assert torch.equal(layer.norm.weight, torch.ones(D_MODEL))
        dt_bias = mixer.dt_proj.bias if ssm_layer == "mamba1" else mixer.dt_bias
        dt = F.softplus(dt_bias.double())  # the initial step sizes: log-uniform in [1e-3, 0.1]
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))
        if ssm_layer == "mamba1":
            n = torch.arange(1, 17, dtype=torch.float32)
            assert torch.equal(mixer.A_log, torch.log(n).expand(d_inner, -1))  # S4D-real
        else:
            assert mixer.A_log.shape == (d_inner // 16,)  # one per head, A ~ U(1, 16)
            assert mixer.A_log.min() >= 0 and mixer.A_log.max() <= math.log(16)
            assert torch.equal(mixer.norm.weight, torch.ones(d_inner))
        # out_proj: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), / sqrt(n_residuals * n_layer)
        bound = 1 / math.sqrt(d_inner) / math.sqrt(1 * N_LAYER)
        w = mixer.out_proj.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(-b, b)
        assert mixer.conv1d.bias.abs().max() <= 0.5  # nn.Conv1d's default: U(+-1/sqrt(d_conv))


def test_dt_distribution_is_log_uniform():
    """Many heads: the softplus of the stored bias is log-uniform over [dt_min, dt_max]."""
    model = build_model(ModelConfig(d_model=1024, n_layer=1, vocab_size=8, ssm_layer="mamba2", headdim=1,
                                    d_state=1, kernels="torch"))
    log_dt = F.softplus(model.backbone.layers[0].mixer.dt_bias.double()).log()  # 2048 samples
    lo, hi = math.log(1e-3), math.log(0.1)
    assert abs(log_dt.mean().item() - (lo + hi) / 2) < 0.1
    assert abs(log_dt.std().item() - (hi - lo) / math.sqrt(12)) < 0.05
    A = model.backbone.layers[0].mixer.A_log.exp()  # U(1, 16)
    assert abs(A.mean().item() - 8.5) < 0.3 and A.min() >= 1 and A.max() <= 16


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_build_model_init(ssm_layer):
    model = build_model(cfg(ssm_layer))
    check_init(model, ssm_layer)
    dt_name = "dt_proj.bias" if ssm_layer == "mamba1" else "dt_bias"
    assert no_decay_names(model) == {f"backbone.layers.{i}.mixer.{n}" for i in range(N_LAYER)
                                     for n in ("A_log", "D", dt_name)}


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_meta_then_materialise_equals_direct_build(ssm_layer):
    direct = build_model(cfg(ssm_layer))
    model = build_model(cfg(ssm_layer), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    assert no_decay_names(model) == no_decay_names(direct)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    check_init(model, ssm_layer)
    assert torch.isfinite(model(torch.randint(0, 1000, (1, 40)))).all()


def test_untied_head_and_config_mapping():
    model = build_model(cfg("mamba2", tie_embeddings=False, pad_vocab_size_multiple=64, expand=3, ngroups=2))
    c = model.config
    assert (c.ssm_layer, c.expand, c.ngroups, c.headdim, c.chunk_size, c.padded_vocab_size) == ("mamba2", 3, 2, 16, 32, 1024)
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert model.backbone.layers[0].mixer.nheads == 3 * D_MODEL // 16


@pytest.mark.parametrize("overrides,message", [
    (["model.ssm_layer=mamba2", "model.d_model=100", "model.headdim=64"], "headdim=64 must divide"),
    (["model.ssm_layer=mamba2", "model.ngroups=5"], "ngroups=5 must divide"),
    (["model.kernels=gpu"], "model.kernels='gpu'"),
    (["model.A_init_range=[0,16]"], "A_init_range"),
    (["model.ssm_layer=mamba4"], "mamba4"),
])
def test_model_keys_are_validated(overrides, message):
    from mamba.config.load import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["model.ssm_layer=mamba2"]).model.ssm_layer == "mamba2"
