"""mamba/runs/export.py: the HF directory appears whole or not at all, and the trainer's end-of-run
export (rank 0's part) writes the gathered weights. Logits against transformers: tests/model/test_hf.py;
from real checkpoints and runs: tests/tools/test_export_hf.py."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from mamba.config.load import load_config
from mamba.data.manifest import write_index
from mamba.data.tokenizer import ByteTokenizer
from mamba.model.factory import build_model
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.runs.export import export_final_weights, export_hf


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=50, d_state=8))
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_hf(model, str(tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left behind


def test_end_of_run_export_replaces_the_earlier_one_with_the_gathered_weights(tmp_path):
    """A byte-tokenizer run (no tokenizer files to ship); the gathered state of a tied model
    without lm_head.weight still exports, and a stale export of the same run is replaced."""
    packed = tmp_path / "packed"
    packed.mkdir()
    byte = ByteTokenizer()
    write_index(packed, [], byte.identity, byte.eos_id)
    cfg = load_config(None, [f"data.sources=[{{path: '{packed}'}}]", "model.d_model=32", "model.n_layer=2",
                             "model.vocab_size=300", "model.ssm_layer=mamba1"])
    torch.manual_seed(0)
    trained = build_model(cfg.model, device="cpu")
    state = {k: v for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    out = tmp_path / "ckpt" / "hf"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("an earlier end of this run")

    torch.manual_seed(1)  # the export must not depend on the fresh build's own initialisation
    export_final_weights(cfg, state, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = AutoModelForCausalLM.from_pretrained(out)
    for key, value in hf.state_dict().items():
        ours = trained.state_dict()["backbone.embedding.weight" if key == "backbone.embeddings.weight" else key]
        assert torch.equal(value, ours), key
