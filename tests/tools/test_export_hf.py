"""tools/export_hf.py (and tools/generate.py) on real Composer checkpoints from tiny in-process,
1-rank training runs: a full checkpoint via mamba.training.train, a DCP-sharded one via FSDP2.

The exported directory must load in HF transformers (model and tokenizer) and give the trained
model's logits (float32, |diff| <= 1e-5 * (1 + max|logits|)), or exactly its weights; --format
mamba-ssm reads back here with identical logits. Hybrids: tests/model/test_interchange.py.
"""
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.utils.parallelism import FSDP2Config, ParallelismConfig
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoTokenizer, MambaForCausalLM

from mamba.config.load import load_config, to_dict
from mamba.data.loader import build_train_dataloader
from mamba.data.tokenizer import load_tokenizer
from mamba.model.composer_model import ComposerMambaLM
from mamba.model.factory import build_model
from mamba.model.generation import generate
from mamba.model.hf import model_from_pretrained
from mamba.runs.checkpoints import load_model_from_checkpoint, resolve_checkpoint
from mamba.training.trainer import train

REPO = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    """tools/NAME.py as a module, to call its main(argv) in this process (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_tool = load_tool("export_hf")


def tiny_run(work: Path, run_name: str, save_folder: Path) -> list[str]:
    """Overrides for a 2-layer CPU run on work/packed saving full checkpoints every 2 batches."""
    return [
        f"run_name={run_name}", f"data.sources=[{{path: '{work / 'packed'}'}}]", "data.seq_len=32",
        "data.num_workers=0", "model.d_model=32", "model.n_layer=2", "model.vocab_size=300",
        "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "trainer.save_interval=2ba",
        "trainer.device=cpu", "logging.progress_bar=false", f"trainer.save_folder={save_folder}",
        "fsdp.state_dict_type=full", "scheduler.t_warmup=1ba", "logging.metrics_file=null",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Pack 12 stdlib modules with a fresh BPE, train 2 batches on CPU, save a full checkpoint."""
    work = tmp_path_factory.mktemp("export")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [str(p) for p in sorted(stdlib.glob("*.py"))[:12]]
    proc = subprocess.run([sys.executable, "tools/pack.py", "--tokenizer", "bpe:300", "--out", str(work / "packed"),
                           *sources], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    save_folder = work / "ckpt"
    cfg = load_config(None, [*tiny_run(work, "export", save_folder), "model.tie_embeddings=false",
                             "trainer.max_duration=2ba"])
    trainer = train(cfg)
    # One process trains a 1-rank FSDP2 model (DTensor parameters): its full weights, as a plain model.
    model = build_model(cfg.model)
    model.load_state_dict(get_model_state_dict(trainer.state.model.model,
                                               options=StateDictOptions(full_state_dict=True)))
    model.eval()
    trainer.close()
    if not (save_folder / "config.yaml").exists():  # what the trainer writes at start, if it does not yet
        OmegaConf.save(OmegaConf.create(to_dict(cfg)), save_folder / "config.yaml")
    return work, save_folder, model


def test_export_from_save_folder_loads_in_transformers(trained):
    work, save_folder, model = trained
    out = work / "hf"
    assert export_tool.main([str(save_folder), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]

    hf = MambaForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "def main():\n    return 0\n"
    ids = torch.tensor([tok(text)["input_ids"]])
    assert tok.decode(ids[0]) == text
    # The bpe:N tokenizer's own specials (ids 0, 1, 2), in the tokenizer and the model config
    # alike; a byte-level BPE has no unknown token, so unk falls back to EOS as GPT-2's does.
    assert (tok.eos_token, tok.bos_token, tok.pad_token, tok.unk_token) == (
        "<|endoftext|>", "<|bos|>", "<|pad|>", "<|endoftext|>")
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert (hf.config.eos_token_id, hf.config.bos_token_id, hf.config.pad_token_id) == (0, 1, 2)
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())


def test_export_format_choice_on_the_command_line(trained, tmp_path, capsys):
    """--format mamba-ssm writes mamba-ssm's layout (with the tokenizer), which reads back as the
    trained model; --format bamba refuses this pure Mamba-1 model with the reason, writing nothing."""
    work, save_folder, model = trained
    out = tmp_path / "ssm"
    assert export_tool.main([str(save_folder), str(out), "--format", "mamba-ssm"]) == 0
    assert f"to {out} as mamba-ssm with tokenizer" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "pytorch_model.bin", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    ids = torch.tensor([load_tokenizer(str(out / "tokenizer.json")).encode_batch(["import os\n"])[0]])
    with torch.no_grad():
        assert torch.equal(model_from_pretrained(out)(ids), model(ids))

    with pytest.raises(SystemExit) as exit_info:
        export_tool.main([str(save_folder), str(tmp_path / "bamba"), "--format", "bamba"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "ssm_layer=mamba1: Bamba's Mamba layers are Mamba-2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssm"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_follows_the_umask(trained, tmp_path, umask):
    """A teammate reads an export as any file its owner makes: the directory and its files get
    the umask's permissions (not a temporary directory's 0700)."""
    _, save_folder, _ = trained
    out = tmp_path / "hf"
    previous = os.umask(umask)
    try:
        assert export_tool.main([str(save_folder), str(out)]) == 0
    finally:
        os.umask(previous)
    assert len(list(out.iterdir())) == 5
    for p in [out, *out.iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~umask, p


def test_checkpoint_resolution_and_weights_roundtrip(trained):
    _, save_folder, model = trained
    resolved = resolve_checkpoint(save_folder)
    assert resolved.name == "ep0-ba2-rank0.pt"
    loaded, cfg = load_model_from_checkpoint(resolved)
    assert cfg.model.d_model == 32
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_sharded_fsdp2_checkpoint_exports(trained, one_rank_gloo):
    """A DCP-sharded checkpoint (FSDP2, Composer's "sharded" state dict) on one in-process rank,
    read back by the export tool in a fresh process without a process group."""
    work, save_folder, _ = trained
    cfg = load_config(save_folder / "config.yaml")
    composer_model = ComposerMambaLM(build_model(cfg.model))
    sharded = work / "sharded"
    trainer = Trainer(
        model=composer_model, train_dataloader=build_train_dataloader(cfg.data, 2, cfg.model.vocab_size, 0),
        optimizers=torch.optim.AdamW(composer_model.parameters(), lr=1e-3), max_duration="1ba", device="cpu",
        device_train_microbatch_size=2,
        parallelism_config=ParallelismConfig(fsdp2=FSDP2Config(state_dict_type="sharded")),
        save_folder=str(sharded), save_interval="1ba", progress_bar=False)
    trainer.fit()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in composer_model.model.state_dict().items()}
    trainer.close()
    assert (sharded / "ep0-ba1" / ".metadata").is_file()
    (sharded / "config.yaml").write_bytes((save_folder / "config.yaml").read_bytes())

    out = work / "hf-sharded"
    proc = subprocess.run([sys.executable, "tools/export_hf.py", str(sharded / "ep0-ba1"), str(out),
                           "--tokenizer", str(work / "packed" / "tokenizer.json")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = MambaForCausalLM.from_pretrained(out)
    for key, value in hf.state_dict().items():
        ours = full["backbone.embedding.weight" if key == "backbone.embeddings.weight" else key]
        assert torch.equal(value, ours), key


def test_resuming_a_finished_run_only_exports_and_a_longer_run_re_exports(trained):
    """A job requeued after its final checkpoint resumes a finished run: it must exit cleanly
    (Composer's fit() would refuse it) and export only if that is missing; raising max_duration
    and resuming trains on and replaces the export with the new final weights."""
    work, _, _ = trained
    save_folder = work / "finished"
    overrides = [*tiny_run(work, "finished", save_folder), "trainer.export_hf=true", "trainer.autoresume=true"]
    hf_weights = save_folder / "hf" / "model.safetensors"

    def run(max_duration):
        trainer = train(load_config(None, [*overrides, f"trainer.max_duration={max_duration}"]))
        batches = int(trainer.state.timestamp.batch)
        trainer.close()
        return batches

    assert run("2ba") == 2 and hf_weights.is_file()
    first_export = hf_weights.read_bytes()
    checkpoints = sorted(p.name for p in save_folder.glob("*.pt"))
    assert run("2ba") == 2  # the requeued job: nothing trained, nothing written
    assert sorted(p.name for p in save_folder.glob("*.pt")) == checkpoints
    assert hf_weights.read_bytes() == first_export
    shutil.rmtree(save_folder / "hf")  # preempted before its export: the resumed job exports
    assert run("2ba") == 2 and hf_weights.read_bytes() == first_export
    assert run("4ba") == 4  # trained on: the export is the new final model
    assert hf_weights.read_bytes() != first_export
    final = MambaForCausalLM.from_pretrained(save_folder / "hf")
    resumed, _ = load_model_from_checkpoint(resolve_checkpoint(save_folder))
    assert torch.equal(final.lm_head.weight, resumed.lm_head.weight)


def test_missing_config_is_a_clear_error(tmp_path, trained, capsys):
    _, save_folder, _ = trained
    lone = tmp_path / "lone" / "x.pt"
    lone.parent.mkdir()
    lone.symlink_to(resolve_checkpoint(save_folder))
    with pytest.raises(SystemExit) as exit_info:
        export_tool.main([str(lone), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "no config.yaml next to checkpoint" in err
    assert "--config" in err and not (tmp_path / "out").exists()


def test_generate_tool_greedy_from_checkpoint(trained, capsys):
    """tools/generate.py on the save_folder: greedy text = the trained model's own greedy tokens."""
    work, save_folder, model = trained
    tool = load_tool("generate")
    prompt = "import os\n"
    assert tool.main([str(save_folder), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out

    tok = load_tokenizer(str(work / "packed" / "tokenizer.json"))
    ids = tok.encode_batch([prompt])[0]
    out = generate(model, torch.tensor([ids]), 8, eos_token_id=tok.eos_id)
    assert printed == prompt + tok.decode(out[0, len(ids):].tolist()) + "\n"
