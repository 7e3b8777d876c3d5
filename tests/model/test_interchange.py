"""Interchange of hybrid (and pure) models: mamba-ssm's layout both ways (Mamba-1/2/3),
transformers' Bamba both ways, the export format choice and the end-of-run export of hybrids
(mamba/model/mamba_ssm_format.py, mamba/model/bamba.py, mamba/model/hf.py, mamba/runs/export.py).

mamba-ssm cannot be installed here (a CUDA build), so its layout is checked by round trip (export,
read back: torch.equal logits, the same weights through the same code) and against the shape of
state-spaces' published mamba2attn-2.7b config.json, whose absent keys must take mamba-ssm's
defaults. transformers 4.53's BambaForCausalLM on CPU runs its own torch path, the reference for
Bamba. Tolerance there: float32, |diff| <= 1e-5 * (1 + max|logits|), as tests/model/test_hf.py:
the two sides sum in different orders (chunked SSD, SDPA, RoPE tables); measured <= 4e-6 at
logits ~3, while a wrong mapping (up/gate swapped, no RoPE permutation) moves logits by ~0.1.
Token ids are real text: the source of the json package through the byte tokenizer.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, BambaConfig, BambaForCausalLM
from transformers.modeling_rope_utils import _compute_default_rope_parameters

from mamba.config.load import load_config
from mamba.config.schema import AttnConfig, ModelConfig
from mamba.data.manifest import write_index
from mamba.data.tokenizer import ByteTokenizer
from mamba.model.bamba import rotary_factor
from mamba.model.factory import build_model
from mamba.model.generation import generate
from mamba.model.hf import CheckpointMismatchError, load_pretrained, model_from_pretrained
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.model.ops.attention import rotary_inv_freq
from mamba.runs.export import choose_format, export_final_weights, export_hf

TOK = ByteTokenizer()
_BYTES = TOK.encode_batch([Path(json.__file__).read_text()])[0]
IDS = torch.tensor([_BYTES[:160], _BYTES[400:560]])  # two real windows, several SSD chunks of 16
# mamba-ssm's MambaConfig fields (mamba_ssm/models/config_mamba.py): from_pretrained takes no others.
MAMBA_SSM_FIELDS = ["d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                    "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"]
GQA_ROPE = dict(num_heads=4, num_heads_kv=2, head_dim=16, rotary_emb_dim=8, qkv_proj_bias=False, out_proj_bias=False)


def random_model(seed: int, attn: dict | None = None, **overrides) -> MambaLMHeadModel:
    """A small model with every weight random (not the structured init), in eval mode. Mamba-2 by
    default; the attention layers (attn_layer_idx) get attn_cfg if given, else GQA_ROPE updated by `attn`."""
    cfg = dict(d_model=32, n_layer=3, vocab_size=TOK.vocab_size, ssm_layer="mamba2", d_state=8, headdim=16,
               chunk_size=16, kernels="torch")
    cfg.update(overrides)
    if cfg.get("attn_layer_idx") and "attn_cfg" not in cfg:
        cfg["attn_cfg"] = {**GQA_ROPE, **(attn or {})}
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hybrid(seed: int, attn: dict | None = None, **overrides) -> MambaLMHeadModel:
    """Mamba-2 + attention at layer 1 + MLPs: a model that Bamba holds exactly."""
    return random_model(seed, attn, **{"attn_layer_idx": (1,), "d_intermediate": 128, **overrides})


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-5 * (1 + ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- mamba-ssm layout
MAMBA_SSM_CASES = {
    "mamba1": dict(ssm_layer="mamba1", dt_rank=4),
    "mamba2-ngroups2": dict(ngroups=2),
    "hybrid-gqa-rope-conv-mlp": dict(attn_layer_idx=(0, 2), d_intermediate=100, tie_embeddings=False),
    "mamba1-hybrid-no-mlp": dict(ssm_layer="mamba1", attn_layer_idx=(1,)),
    # Mamba-3 both ways of each option that changes the computation or the shapes.
    "mamba3-outproj-norm-rope-half": dict(ssm_layer="mamba3", is_outproj_norm=True, rope_fraction=0.5),
    "mamba3-gate-rope-full-ngroups2": dict(ssm_layer="mamba3", rope_fraction=1.0, ngroups=2, A_floor=0.05),
    "mamba3-hybrid-mlp": dict(ssm_layer="mamba3", is_outproj_norm=True, attn_layer_idx=(1,), d_intermediate=64),
    "mamba3-mimo-outproj-norm": dict(ssm_layer="mamba3", is_mimo=True, mimo_rank=2, is_outproj_norm=True),
    "mamba3-mimo-gate-rope-full": dict(ssm_layer="mamba3", is_mimo=True, mimo_rank=3, rope_fraction=1.0),
}
# mamba-ssm 2.3.2's Mamba3.__init__ arguments (mamba_ssm/modules/mamba3.py), in its order, less
# what it only absorbs (dropout, layer_idx, n_layer).
MAMBA3_ARGS = ["d_state", "expand", "headdim", "ngroups", "rope_fraction", "dt_min", "dt_max", "dt_init_floor",
               "A_floor", "is_outproj_norm", "is_mimo", "mimo_rank", "chunk_size"]


@pytest.mark.parametrize("case", MAMBA_SSM_CASES)
def test_mamba_ssm_layout_round_trip_gives_identical_logits(tmp_path, case):
    source = random_model(1, attn=dict(d_conv=4, rotary_emb_interleaved=True), **MAMBA_SSM_CASES[case])
    assert export_hf(source, str(tmp_path / "out"), fmt="mamba-ssm") == "mamba-ssm"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "pytorch_model.bin"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert list(cfg) == MAMBA_SSM_FIELDS and cfg["vocab_size"] == TOK.vocab_size
    saved = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert list(saved) == list(source.state_dict())  # lm_head included, as mamba-ssm saves it
    loaded = model_from_pretrained(tmp_path / "out")
    assert loaded.config.attn_layer_idx == source.config.attn_layer_idx
    assert torch.equal(logits(loaded), logits(source))
    if source.config.ssm_layer == "mamba3":
        assert cfg["ssm_cfg"] == {"layer": "Mamba3", **{k: getattr(source.config, k) for k in MAMBA3_ARGS[:-1]},
                                  "chunk_size": 16}
        assert list(cfg["ssm_cfg"])[1:] == MAMBA3_ARGS
        assert choose_format(source) == "mamba-ssm"  # auto: transformers has no Mamba-3 class


def test_hybrid_init_from_loads_a_mamba_ssm_checkpoint(tmp_path):
    """model.init_from (the training config) reads a hybrid through the factory into load_pretrained."""
    source = hybrid(2, attn=dict(d_conv=4), d_intermediate=128)
    export_hf(source, str(tmp_path / "ckpt"), fmt="mamba-ssm")
    cfg = ModelConfig(d_model=32, n_layer=3, vocab_size=TOK.vocab_size, ssm_layer="mamba2", d_state=8, headdim=16,
                      chunk_size=16, kernels="torch", attn_layer_idx=[1], d_intermediate=128,
                      attn_cfg=AttnConfig(**GQA_ROPE, d_conv=4), init_from=str(tmp_path / "ckpt"))
    assert torch.equal(logits(build_model(cfg).eval()), logits(source))


def test_mamba3_init_from_loads_a_mamba_ssm_checkpoint(tmp_path):
    """model.init_from of a Mamba-3 hybrid; A_floor, which shows in no shape, must match too."""
    source = random_model(20, ssm_layer="mamba3", is_outproj_norm=True, rope_fraction=1.0, A_floor=0.05,
                          attn_layer_idx=(2,), d_intermediate=64)
    export_hf(source, str(tmp_path / "ckpt"), fmt="mamba-ssm")
    keys = dict(d_model=32, n_layer=3, vocab_size=TOK.vocab_size, ssm_layer="mamba3", d_state=8, headdim=16,
                chunk_size=16, kernels="torch", is_outproj_norm=True, rope_fraction=1.0, attn_layer_idx=[2],
                d_intermediate=64, attn_cfg=AttnConfig(**GQA_ROPE), init_from=str(tmp_path / "ckpt"))
    assert torch.equal(logits(build_model(ModelConfig(**keys, A_floor=0.05)).eval()), logits(source))
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint has A_floor=0.05, the model 0.0001; "
                                                      r"set model.A_floor=0.05"):
        build_model(ModelConfig(**keys))
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint is a mamba3 model but model.ssm_layer is mamba2"):
        build_model(ModelConfig(**{**keys, "ssm_layer": "mamba2", "is_outproj_norm": False}))


def test_mamba3_mimo_rank_must_match_the_checkpoint(tmp_path):
    """A MIMO checkpoint into a SISO model (or another rank), and back: the message names the keys."""
    keys = dict(d_model=32, n_layer=2, vocab_size=TOK.vocab_size, ssm_layer="mamba3", d_state=8, headdim=16,
                chunk_size=16, kernels="torch")
    source = random_model(24, ssm_layer="mamba3", n_layer=2, is_mimo=True, mimo_rank=2)
    export_hf(source, str(tmp_path / "mimo"), fmt="mamba-ssm")
    init = str(tmp_path / "mimo")
    assert torch.equal(logits(build_model(ModelConfig(**keys, is_mimo=True, mimo_rank=2, init_from=init)).eval()),
                       logits(source))
    for extra in ({}, {"is_mimo": True, "mimo_rank": 4}):
        with pytest.raises(CheckpointMismatchError, match=r"checkpoint has mimo_rank=2, the model \d; "
                                                          r"set model.is_mimo=true model.mimo_rank=2"):
            build_model(ModelConfig(**keys, **extra, init_from=init))
    export_hf(random_model(25, ssm_layer="mamba3", n_layer=2), str(tmp_path / "siso"), fmt="mamba-ssm")
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint has mimo_rank=1, the model 2; set model.is_mimo=false"):
        build_model(ModelConfig(**keys, is_mimo=True, mimo_rank=2, init_from=str(tmp_path / "siso")))


def test_mamba3_layout_without_options_takes_mamba3_defaults(tmp_path):
    """ssm_cfg {"layer": "Mamba3"} alone: d_state 128, headdim 64 and chunk_size 64 are mamba-ssm
    Mamba3's defaults, not MambaConfig's (16, 256), and A_floor 1e-4, rope_fraction 0.5, no
    output norm."""
    source = random_model(21, ssm_layer="mamba3", d_model=64, n_layer=2, d_state=128, headdim=64, chunk_size=64)
    path = tmp_path / "bare"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "vocab_size": TOK.vocab_size,
                                                  "ssm_cfg": {"layer": "Mamba3"}}))
    torch.save(source.state_dict(), path / "pytorch_model.bin")
    loaded = model_from_pretrained(path)
    c = loaded.config
    assert (c.d_state, c.headdim, c.chunk_size, c.A_floor, c.rope_fraction, c.is_outproj_norm) == (
        128, 64, 64, 1e-4, 0.5, False)
    assert torch.equal(logits(loaded), logits(source))


MAMBA3_REFUSALS = {  # a change to an exported Mamba-3 model's ssm_cfg -> the message that names it
    "mimo-flag": (dict(is_mimo="yes"), r"ssm_cfg.is_mimo='yes' must be true or false"),
    "rope-quarter": (dict(rope_fraction=0.25), r"ssm_cfg.rope_fraction=0.25: .* 0.5 or 1.0"),
    "mamba2-key": (dict(d_conv=4), r"ssm_cfg.d_conv is not an argument of mamba-ssm 2.3.2's Mamba3"),
}


@pytest.mark.parametrize("case", MAMBA3_REFUSALS)
def test_unsupported_mamba3_options_are_refused_by_name(tmp_path, case):
    export_hf(random_model(22, ssm_layer="mamba3"), str(tmp_path / "ckpt"))
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    change, message = MAMBA3_REFUSALS[case]
    cfg["ssm_cfg"].update(change)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=message):
        model_from_pretrained(tmp_path / "ckpt")
    # A rank beside is_mimo false is what mamba-ssm ignores (it resets mimo_rank to 1): it loads.
    cfg["ssm_cfg"].update(is_mimo=False, mimo_rank=4, rope_fraction=0.5)
    cfg["ssm_cfg"].pop("d_conv", None)
    cfg_file.write_text(json.dumps(cfg))
    assert model_from_pretrained(tmp_path / "ckpt").config.ssm_layer == "mamba3"


def test_mamba3_has_no_transformers_format(tmp_path):
    model = random_model(23, ssm_layer="mamba3")
    for fmt, message in (("hf", "transformers .* has no Mamba-3 class; export it as mamba-ssm"),
                         ("bamba", "ssm_layer=mamba3: Bamba's Mamba layers are Mamba-2")):
        with pytest.raises(ValueError, match=message):
            export_hf(model, str(tmp_path / fmt), fmt=fmt)
    assert not list(tmp_path.iterdir())


def test_published_mamba2attn_layout_takes_mamba_ssm_defaults(tmp_path):
    """state-spaces/mamba2attn-2.7b's config.json, scaled down (2 heads of 32 for 30 of 128, rotary
    on half a head as theirs): its attn_cfg leaves out num_heads_kv, rotary_emb_base,
    rotary_emb_interleaved and softmax_scale, its ssm_cfg everything but the layer, so reading it
    must fill in mamba-ssm's MHA and Mamba2 defaults (d_state 128, headdim 64: not ours)."""
    attn_cfg = {"causal": True, "d_conv": 4, "head_dim": 32, "num_heads": 2, "out_proj_bias": False,
                "qkv_proj_bias": False, "rotary_emb_dim": 16}
    # Built from the same attn_cfg dict: our MHA's keyword defaults are mamba-ssm MHA's.
    source = random_model(3, d_model=64, n_layer=4, vocab_size=300, d_state=128, headdim=64, chunk_size=256,
                          pad_vocab_size_multiple=16, attn_layer_idx=(1, 3), attn_cfg=attn_cfg)
    path = tmp_path / "published"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "d_model": 64, "d_intermediate": 0, "n_layer": 4, "vocab_size": 300, "ssm_cfg": {"layer": "Mamba2"},
        "attn_layer_idx": [1, 3], "attn_cfg": attn_cfg, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}))
    torch.save(source.state_dict(), path / "pytorch_model.bin")
    loaded = model_from_pretrained(path)
    mha = loaded.backbone.layers[1].mixer
    assert (mha.num_heads_kv, mha.rotary_emb_base, mha.rotary_emb_interleaved, mha.softmax_scale) == (
        source.backbone.layers[1].mixer.num_heads_kv, 10000.0, False, None)
    assert torch.equal(logits(loaded), logits(source))


REFUSED_CONFIGS = {  # a change to an exported hybrid's config.json -> the message that names it
    "causal-absent": (lambda c: c["attn_cfg"].pop("causal"), r"attn_cfg.causal is 'absent'.*\"causal\": true"),
    "causal-false": (lambda c: c["attn_cfg"].update(causal=False), r"attn_cfg.causal is False.*causal=False"),
    "mlp-dim": (lambda c: c["attn_cfg"].update(mlp_dim=64), r"attn_cfg.mlp_dim=64 .*only mlp_dim 0"),
    "unknown-attn-key": (lambda c: c["attn_cfg"].update(window=8), r"attn_cfg keys \['window'\]"),
    "unknown-layer": (lambda c: c["ssm_cfg"].update(layer="Mamba4"), r"ssm_cfg.layer='Mamba4' is not supported"),
    "norm-before-gate": (lambda c: c["ssm_cfg"].update(norm_before_gate=True), r"ssm_cfg.norm_before_gate=True"),
    "layer-out-of-range": (lambda c: c.update(attn_layer_idx=[1, 7]), r"attn_layer_idx=\[1, 7\] .* 0..2"),
    "layernorm": (lambda c: c.update(rms_norm=False), r"rms_norm=False \(LayerNorm"),
}


@pytest.mark.parametrize("case", REFUSED_CONFIGS)
def test_unsupported_mamba_ssm_configs_are_refused_by_name(tmp_path, case):
    export_hf(hybrid(5), str(tmp_path / "ckpt"), fmt="mamba-ssm")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    change, message = REFUSED_CONFIGS[case]
    change(cfg)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=message):
        model_from_pretrained(tmp_path / "ckpt")


LAYOUT_MISMATCHES = {  # the model differs from the checkpoint (hybrid(6)) in ... -> the message
    "attn_layer_idx": (dict(attn_layer_idx=(2,)), r"attn_layer_idx=\[1\], the model \[2\]; set model.attn_layer_idx=\[1\]"),
    "pure-model": (dict(attn_layer_idx=()), r"attn_layer_idx=\[1\], the model \[\]"),
    "rotary_emb_dim": (dict(attn=dict(rotary_emb_dim=4)), r"attn_cfg.rotary_emb_dim=8, the model 4"),
    "rotary_emb_base": (dict(attn=dict(rotary_emb_base=500.0)), r"attn_cfg.rotary_emb_base=10000.0, the model 500.0"),
    "num_heads_kv": (dict(attn=dict(num_heads_kv=4)), r"attn_cfg.num_heads_kv=2, the model 4"),
    "d_intermediate": (dict(d_intermediate=256), r"d_intermediate=128 \(MLP width 128\), the model 256"),
}


@pytest.mark.parametrize("case", LAYOUT_MISMATCHES)
def test_load_pretrained_names_the_mismatching_hybrid_field(tmp_path, case):
    export_hf(hybrid(6), str(tmp_path / "ckpt"), fmt="mamba-ssm")
    overrides, message = LAYOUT_MISMATCHES[case]
    with pytest.raises(CheckpointMismatchError, match=message):
        load_pretrained(hybrid(7, **overrides), str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------- Bamba
BAMBA_CASES = {
    "gqa-rope": dict(),
    "interleaved-rope": dict(attn=dict(rotary_emb_interleaved=True)),
    "no-rope-biases-untied": dict(attn=dict(rotary_emb_dim=0, qkv_proj_bias=True, out_proj_bias=True),
                                  tie_embeddings=False),
    # head_dim 44 != d_model / num_heads; 44 * (30 / 44) is just below 30, which transformers'
    # int(head_dim * factor) truncates to 29 unless rotary_factor nudges; MQA; two attention layers.
    "mqa-wide-heads": dict(attn=dict(head_dim=44, num_heads_kv=1, rotary_emb_dim=30, rotary_emb_base=500.0),
                           attn_layer_idx=(0, 2)),
}


@pytest.mark.parametrize("case", BAMBA_CASES)
def test_bamba_export_matches_transformers_logits_and_greedy_tokens(tmp_path, case):
    model = hybrid(8, **BAMBA_CASES[case])
    assert export_hf(model, str(tmp_path / "out")) == "bamba"  # auto picks it for this hybrid
    ref = BambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ref.config.attn_layer_indices == list(model.config.attn_layer_idx)
    with torch.no_grad():
        assert_close(logits(model), ref(IDS).logits)
        # Greedy over every row on both sides (transformers does not know the real vocabulary).
        prompt = IDS[:1, :40]
        theirs = ref.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    ours = generate(model, prompt, 20, vocab_size=model.config.padded_vocab_size)
    assert torch.equal(ours, theirs)


def test_bamba_export_reads_back_here_exactly(tmp_path):
    model = hybrid(9, tie_embeddings=False)
    export_hf(model, str(tmp_path / "out"), fmt="bamba")
    assert torch.equal(logits(model_from_pretrained(tmp_path / "out")), logits(model))
    into = hybrid(10, tie_embeddings=False)  # load_pretrained (model.init_from) into a built model
    load_pretrained(into, str(tmp_path / "out"))
    assert torch.equal(logits(into), logits(model))


def test_bamba_import_from_transformers_save_pretrained(tmp_path):
    torch.manual_seed(11)
    cfg = BambaConfig(vocab_size=264, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4,
                      mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16, tie_word_embeddings=False)
    ref = BambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "bamba")
    model = model_from_pretrained(tmp_path / "bamba")
    assert model.config.attn_cfg["rotary_emb_dim"] == 4  # BambaConfig's partial_rotary_factor 0.5 of 8
    with torch.no_grad():
        assert_close(logits(model), ref(IDS).logits)


BAMBA_REFUSALS = {  # a hybrid(12) changed by ... -> the reason named
    "mamba1": (dict(ssm_layer="mamba1"), r"ssm_layer=mamba1: Bamba's Mamba layers are Mamba-2"),
    "no-mlp": (dict(d_intermediate=0), r"d_intermediate=0: every Bamba layer has an MLP"),
    "no-attention": (dict(attn_layer_idx=()), r"no attention layer: .*generate\(\) fails"),
    "ngroups": (dict(ngroups=2), r"ngroups=2: Bamba's gated RMSNorm normalises over all of d_inner"),
    "attn-conv": (dict(attn=dict(d_conv=4)), r"attn_cfg.d_conv=4: Bamba's attention has no convolution"),
    "bias-flags": (dict(attn=dict(qkv_proj_bias=True)), r"qkv_proj_bias != out_proj_bias: Bamba has one attention_bias"),
    "softmax-scale": (dict(attn=dict(softmax_scale=0.5)), r"softmax_scale=0.5: Bamba scales .* head_dim\^-0.5 = 0.25"),
}


@pytest.mark.parametrize("case", BAMBA_REFUSALS)
def test_bamba_refuses_what_it_cannot_hold_and_auto_falls_back_to_mamba_ssm(tmp_path, case):
    overrides, reason = BAMBA_REFUSALS[case]
    model = hybrid(12, **overrides)
    with pytest.raises(ValueError, match="not a transformers Bamba model: .*" + reason):
        export_hf(model, str(tmp_path / "out"), fmt="bamba")
    assert not list(tmp_path.iterdir())  # nothing written, not even the temporary directory
    assert choose_format(model) == "mamba-ssm"


def test_bamba_configs_this_model_cannot_run_are_refused(tmp_path):
    export_hf(hybrid(13), str(tmp_path / "out"), fmt="bamba")
    cfg_file = tmp_path / "out" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointMismatchError, match="intermediate_size=100 is not a multiple of 128"):
        model_from_pretrained(tmp_path / "out")
    cfg_file.write_text(json.dumps({**cfg, "mamba_n_groups": 2}))
    with pytest.raises(CheckpointMismatchError, match="mamba_n_groups=2 is not supported.*per group"):
        model_from_pretrained(tmp_path / "out")


def test_rotary_factor_gives_transformers_the_rotary_dim_and_frequencies():
    """transformers' own RoPE init (int(head_dim * partial_rotary_factor) channels) on the factor
    we write: R / 2 frequencies, ours, for every even R <= head_dim (1 in 50 need the nudge)."""
    for head_dim in range(1, 97):
        for rotary_dim in range(0, head_dim + 1, 2):
            config = SimpleNamespace(rope_theta=500.0, head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                                     partial_rotary_factor=rotary_factor(rotary_dim, head_dim))
            inv_freq, _ = _compute_default_rope_parameters(config)
            assert torch.allclose(inv_freq, rotary_inv_freq(rotary_dim, 500.0), rtol=1e-6, atol=0), (head_dim, rotary_dim)


def test_auto_format_of_a_pure_model_is_transformers_mamba():
    assert choose_format(random_model(14)) == "hf"
    assert choose_format(random_model(14, ssm_layer="mamba1")) == "hf"


# ----------------------------------------------------------------------------- end of a run
@pytest.mark.parametrize("hybrid_keys, fmt", [
    (["model.ssm_layer=mamba2", "model.d_intermediate=128", "model.attn_cfg.rotary_emb_dim=8"], "bamba"),
    (["model.ssm_layer=mamba1", "model.attn_cfg.d_conv=4"], "mamba-ssm"),
])
def test_end_of_run_export_of_a_hybrid(tmp_path, hybrid_keys, fmt):
    """The trainer's export (rank 0's part) of a hybrid run writes its auto format, which reads
    back as the trained model; a byte-tokenizer run, so no tokenizer files."""
    packed = tmp_path / "packed"
    packed.mkdir()
    write_index(packed, [], TOK.identity, TOK.eos_id)
    cfg = load_config(None, [f"data.sources=[{{path: '{packed}'}}]", "model.d_model=32", "model.n_layer=3",
                             f"model.vocab_size={TOK.vocab_size}", "model.d_state=8", "model.headdim=16",
                             "model.chunk_size=16", "model.kernels=torch", "model.attn_layer_idx=[1]",
                             "model.attn_cfg.num_heads=4", "model.attn_cfg.num_heads_kv=2",
                             "model.attn_cfg.qkv_proj_bias=false", "model.attn_cfg.out_proj_bias=false",
                             *hybrid_keys])
    torch.manual_seed(15)
    trained = build_model(cfg.model).eval()
    out = tmp_path / "ckpt" / "hf"
    export_final_weights(cfg, trained.state_dict(), out)
    weights = {"bamba": "model.safetensors", "mamba-ssm": "pytorch_model.bin"}[fmt]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", weights]
    assert torch.equal(logits(model_from_pretrained(out)), logits(trained))
    if fmt == "bamba":
        assert_close(logits(trained), AutoModelForCausalLM.from_pretrained(out)(IDS).logits.detach())
