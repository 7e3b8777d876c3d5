"""AdamW parameter groups: mamba-ssm's weight-decay exemptions, by name, configurable."""
import pytest
import torch

from mamba.config.schema import OptimizerConfig
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.training.optim import build_optimizer


def model(tie: bool) -> MambaLMHeadModel:
    return MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50, tie_embeddings=tie))


def groups_by_name(m: torch.nn.Module, cfg: OptimizerConfig) -> tuple[set, set]:
    opt = build_optimizer(m, cfg, device="cpu")
    names = {id(p): n for n, p in m.named_parameters()}
    decay, exempt = opt.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and exempt["weight_decay"] == 0.0
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in exempt["params"]}


def test_default_groups_follow_mamba_ssm():
    m = model(tie=False)
    decay, exempt = groups_by_name(m, OptimizerConfig())
    per_layer_decay = {"in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"}
    per_layer_exempt = {"A_log", "D", "conv1d.bias", "dt_proj.bias"}
    assert decay == {"backbone.embedding.weight", "lm_head.weight"} | {
        f"backbone.layers.{i}.mixer.{n}" for i in range(2) for n in per_layer_decay}
    assert exempt == {"backbone.norm_f.weight"} | {f"backbone.layers.{i}.norm.weight" for i in range(2)} | {
        f"backbone.layers.{i}.mixer.{n}" for i in range(2) for n in per_layer_exempt}


def test_tied_head_is_one_parameter_in_one_group():
    m = model(tie=True)
    decay, exempt = groups_by_name(m, OptimizerConfig())
    opt = build_optimizer(m, OptimizerConfig(), device="cpu")
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(m.parameters()))
    assert "backbone.embedding.weight" in decay and "lm_head.weight" not in decay | exempt


def test_no_decay_list_is_configurable_and_the_model_flag_still_holds():
    m = model(tie=False)
    # Drop norms and biases from the list: they are now decayed; A_log and D keep the model's flag.
    decay, exempt = groups_by_name(m, OptimizerConfig(no_decay=["embedding"]))
    assert "backbone.embedding.weight" in exempt and "backbone.norm_f.weight" in decay
    assert "backbone.layers.0.mixer.conv1d.bias" in decay
    assert {"backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D"} <= exempt
    # A copy of a Parameter (as after meta init or sharding) loses the flag; the default names catch it.
    for p in m.parameters():
        p.__dict__.pop("_no_weight_decay", None)
    decay, exempt = groups_by_name(m, OptimizerConfig())
    assert {"backbone.layers.1.mixer.A_log", "backbone.layers.1.mixer.D", "backbone.layers.1.mixer.dt_proj.bias"} <= exempt


def test_decay_is_decoupled_and_only_on_the_decay_group():
    """One AdamW step with zero gradients: Adam's update is 0, so only decoupled decay moves weights,
    by exactly lr * wd * w (Loshchilov & Hutter 2019, Algorithm 2, line 12)."""
    m = model(tie=False)
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.5)
    opt = build_optimizer(m, cfg, device="cpu")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n in ("lm_head.weight", "backbone.layers.0.mixer.in_proj.weight") else None
        if expected is not None:
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
        if n.endswith(("A_log", ".D", "norm.weight")):
            assert torch.equal(p.detach(), before[n]), n


def test_hybrid_attention_and_mlp_parameters_are_grouped_like_mamba_ssm():
    """Attention (with biases and conv) and MLP weights decay; their biases and the MLP norms do not."""
    m = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50, attn_layer_idx=(1,), d_intermediate=32,
                                     attn_cfg=dict(num_heads=2, d_conv=4)))
    decay, exempt = groups_by_name(m, OptimizerConfig())
    attn, mlp = "backbone.layers.1.mixer.", "backbone.layers.{}.mlp."
    assert {attn + "in_proj.weight", attn + "conv1d.weight", attn + "out_proj.weight"} <= decay
    assert {mlp.format(i) + f"fc{k}.weight" for i in range(2) for k in (1, 2)} <= decay
    assert {attn + "in_proj.bias", attn + "conv1d.bias", attn + "out_proj.bias"} <= exempt
    assert {f"backbone.layers.{i}.norm2.weight" for i in range(2)} <= exempt
    assert decay | exempt == {n for n, _ in m.named_parameters()} and not decay & exempt


@pytest.mark.parametrize("mimo", [False, True])
def test_mamba3_biases_norms_and_rank_scales_are_not_decayed(mimo):
    torch.manual_seed(0)
    m = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=50, ssm_layer="mamba3", d_state=16, headdim=16,
                                     chunk_size=8, is_outproj_norm=True, is_mimo=mimo, mimo_rank=2))
    decay, exempt = groups_by_name(m, OptimizerConfig())
    mixer = "backbone.layers.0.mixer."
    assert decay == {"backbone.embedding.weight", mixer + "in_proj.weight", mixer + "out_proj.weight"}
    scales = {"mimo_x", "mimo_z", "mimo_o"} if mimo else set()
    assert exempt == {"backbone.norm_f.weight", "backbone.layers.0.norm.weight"} | {
        mixer + n for n in {"dt_bias", "D", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight", "norm.weight"} | scales}
