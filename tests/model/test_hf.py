"""Interchange with HF transformers and mamba-ssm's checkpoint layout (mamba/model/hf.py; the
export directory itself is mamba/runs/export.py's).

transformers (the pinned 4.53) is the reference: its MambaForCausalLM on CPU runs its own
sequential torch implementation, so equal logits mean equal weights, names and semantics.
Tolerance: float32, |diff| <= 1e-5 * (1 + |logits|max) (two different fp32 summation orders).
"""
import json

import pytest
import torch
from transformers import MambaConfig as HFMambaConfig
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM, MambaForCausalLM

from mamba.model.hf import CheckpointMismatchError, load_pretrained
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.runs.export import export_hf

VOCAB = 50  # padded to 56 with the default multiple of 8


MAMBA2 = dict(ssm_layer="mamba2", headdim=16, chunk_size=8, kernels="torch")  # 4 heads


def random_model(seed: int, **overrides) -> MambaLMHeadModel:
    """A small model whose every weight is random (not the structured init), in eval mode."""
    torch.manual_seed(seed)
    cfg = dict(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, dt_rank=4)
    if overrides.get("ssm_layer") == "mamba2":
        del cfg["dt_rank"]
    model = MambaLMHeadModel(MambaConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(seed: int = 0, shape=(2, 23)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-5 * (1 + ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max |diff| {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_same_logits(tmp_path, tie):
    model = random_model(1, tie_embeddings=tie)
    export_hf(model, str(tmp_path / "hf"))
    hf = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == 56 and hf.config.tie_word_embeddings == tie
    ids = tokens()
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits)
    assert not any(p.name.startswith(".hf.tmp") for p in tmp_path.iterdir())  # temp dir renamed away


@pytest.mark.parametrize("tie", [True, False])
def test_mamba2_export_loads_in_transformers_with_same_logits(tmp_path, tie):
    # ngroups=1: transformers 4.53's gated norm spans all channels, which equals per-group only then.
    model = random_model(21, tie_embeddings=tie, **MAMBA2)
    export_hf(model, str(tmp_path / "hf"))
    hf = Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()  # CPU: its torch path
    assert hf.config.num_heads == 4 and hf.config.head_dim == 16
    ids = tokens(4, shape=(2, 21))  # several SSD chunks of 8 on both sides
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits)


def test_mamba2_import_from_transformers_save_pretrained(tmp_path):
    torch.manual_seed(22)
    hf_cfg = HFMamba2Config(vocab_size=56, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=4,
                            head_dim=16, n_groups=1, chunk_size=8, tie_word_embeddings=False)
    hf = Mamba2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    model = random_model(23, tie_embeddings=False, **MAMBA2)
    load_pretrained(model, str(tmp_path / "hf"))
    ids = tokens(5)
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits)


def test_import_from_transformers_save_pretrained(tmp_path):
    torch.manual_seed(3)
    hf_cfg = HFMambaConfig(vocab_size=56, hidden_size=32, state_size=8, num_hidden_layers=2,
                           time_step_rank=4, tie_word_embeddings=True)  # HF then omits lm_head.weight
    hf = MambaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    model = random_model(4)
    load_pretrained(model, str(tmp_path / "hf"))
    ids = tokens(1)
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits)


def write_mamba_ssm_dir(model: MambaLMHeadModel, path, vocab_size=VOCAB, pad=8, **ssm_cfg) -> None:
    """The layout state-spaces publishes: mamba-ssm's config.json and torch.save(state_dict())."""
    path.mkdir()
    c = model.config
    if c.ssm_layer == "mamba1":
        ssm_cfg = {"dt_rank": model.backbone.layers[0].mixer.dt_rank, **ssm_cfg}
    (path / "config.json").write_text(json.dumps({
        "d_model": c.d_model, "d_intermediate": 0, "n_layer": c.n_layer, "vocab_size": vocab_size,
        "ssm_cfg": {"d_state": c.d_state, **ssm_cfg}, "attn_layer_idx": [], "attn_cfg": {},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": pad, "tie_embeddings": c.tie_embeddings,
    }))
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # both tied keys, as mamba-ssm saves


def test_import_mamba_ssm_layout_gives_identical_logits(tmp_path):
    source = random_model(5)
    write_mamba_ssm_dir(source, tmp_path / "ckpt")
    model = random_model(6)
    load_pretrained(model, str(tmp_path / "ckpt"))
    ids = tokens(2)
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))
    assert model.lm_head.weight is model.backbone.embedding.weight  # still tied


def test_import_with_other_vocab_padding_copies_rows_and_keeps_ours(tmp_path):
    source = random_model(7)  # 56 rows
    write_mamba_ssm_dir(source, tmp_path / "ckpt")
    model = random_model(8, pad_vocab_size_multiple=16)  # 64 rows
    before = model.backbone.embedding.weight[56:].clone()
    load_pretrained(model, str(tmp_path / "ckpt"))
    emb = model.backbone.embedding.weight
    assert torch.equal(emb[:56], source.backbone.embedding.weight)
    assert torch.equal(emb[56:], before)
    ids = tokens(3)
    with torch.no_grad():
        assert torch.equal(model(ids)[..., :56], source(ids))


def test_import_tied_checkpoint_into_untied_model_copies_head(tmp_path):
    source = random_model(9)
    write_mamba_ssm_dir(source, tmp_path / "ckpt")
    model = random_model(10, tie_embeddings=False)
    load_pretrained(model, str(tmp_path / "ckpt"))
    assert torch.equal(model.lm_head.weight, source.backbone.embedding.weight)


def test_mamba2_mamba_ssm_layout_gives_identical_logits(tmp_path):
    source = random_model(24, ngroups=2, **MAMBA2)
    write_mamba_ssm_dir(source, tmp_path / "ckpt", layer="Mamba2", headdim=16, ngroups=2, chunk_size=8)
    model = random_model(25, ngroups=2, **MAMBA2)
    load_pretrained(model, str(tmp_path / "ckpt"))
    ids = tokens(6)
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))


def test_mixer_kind_mismatch_is_refused(tmp_path):
    write_mamba_ssm_dir(random_model(26), tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatchError, match="checkpoint is a mamba1 model but model.ssm_layer is mamba2"):
        load_pretrained(random_model(27, **MAMBA2), str(tmp_path / "ckpt"))


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    write_mamba_ssm_dir(random_model(11, expand=3), tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(random_model(12), str(tmp_path / "ckpt"))
    msg = str(err.value)
    # d_inner = 3 * 32 in the checkpoint, 2 * 32 here; keys are checked in sorted order.
    assert "backbone.layers.0.mixer.A_log" in msg
    assert "(96, 8)" in msg and "(64, 8)" in msg


def test_untied_checkpoint_into_tied_model_is_refused(tmp_path):
    write_mamba_ssm_dir(random_model(13, tie_embeddings=False), tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatchError, match="tie_embeddings=false"):
        load_pretrained(random_model(14), str(tmp_path / "ckpt"))


def test_larger_real_vocabulary_is_refused(tmp_path):
    write_mamba_ssm_dir(random_model(15, vocab_size=60), tmp_path / "ckpt", vocab_size=60)
    with pytest.raises(CheckpointMismatchError, match="model.vocab_size=60"):
        load_pretrained(random_model(16), str(tmp_path / "ckpt"))


def test_model_init_from_config_key_loads_the_checkpoint(tmp_path):
    """`model.init_from` (the training config) goes through the factory into load_pretrained."""
    from mamba.config.schema import ModelConfig
    from mamba.model.factory import build_model

    source = random_model(28, dt_rank="auto")  # ModelConfig has no dt_rank key: "auto" = 2 here
    write_mamba_ssm_dir(source, tmp_path / "ckpt")
    cfg = ModelConfig(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, init_from=str(tmp_path / "ckpt"))
    model = build_model(cfg).eval()
    ids = tokens(7)
    with torch.no_grad():
        assert torch.equal(model(ids), source(ids))
