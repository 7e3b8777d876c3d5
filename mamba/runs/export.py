"""Write a trained model as a HF transformers directory (config.json, model.safetensors and the
tokenizer files), from a checkpoint (tools/export_hf.py) or at the end of a run (the trainer).

The key and config mapping is mamba.model.hf's; this module handles the directory: it is written
into a temporary sibling and renamed into place when complete, so it appears whole or not at all.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import torch

from mamba.config.schema import TrainConfig
from mamba.data.tokenizer import write_tokenizer_files
from mamba.files import temp_dir_beside
from mamba.model.hf import hf_config, hf_state_dict, mixer_kind
from mamba.model.lm import MambaLMHeadModel
from mamba.runs.checkpoints import model_with_weights
from mamba.runs.run_config import run_tokenizer

log = logging.getLogger(__name__)


def export_hf(model: MambaLMHeadModel, out_dir: str, tokenizer_path: str | None = None) -> None:
    """Write a HF transformers directory (config.json, model.safetensors, tokenizer files).

    tokenizer_path: a tokenizer.json (or a directory holding one), copied with a
    tokenizer_config.json and special_tokens_map.json so `AutoTokenizer.from_pretrained` works.
    Everything is written into a temporary sibling directory renamed to out_dir when complete;
    out_dir must not exist or be empty.
    """
    from safetensors.torch import save_file

    if mixer_kind(model) == "mamba2" and model.config.ngroups > 1:
        # transformers <= 4.53's MambaRMSNormGated normalises over all of d_inner, mamba-ssm per
        # group (group_size = d_inner / ngroups): the weights are right, HF's output differs.
        log.warning("ngroups=%d: HF transformers' Mamba2 normalises the gated RMSNorm over all "
                    "channels, not per group as mamba-ssm and this model do; its logits will differ",
                    model.config.ngroups)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)  # not mkdtemp: its 0700 would keep the export from teammates
    try:
        config = hf_config(model)
        if tokenizer_path is not None:
            ids = write_tokenizer_files(Path(tokenizer_path), tmp)
            # The model's special ids are the tokenizer's (hf_config would set all three to EOS).
            config.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weights = tmp / "model.safetensors"
        save_file(hf_state_dict(model), str(weights), metadata={"format": "pt"})
        # safetensors writes through a 0600 temporary file: give the weights the mode the umask
        # gives files, read off the directory mkdir just made (0777 & ~umask).
        weights.chmod(stat.S_IMODE(tmp.stat().st_mode) & 0o666)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_final_weights(cfg: TrainConfig, state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """The end-of-run export, on one rank: `state` is the full (unsharded) plain-model state dict
    the trainer gathered; out_dir (<save_folder>/hf) is replaced, with the training data's tokenizer.
    """
    if out_dir.exists():  # the export of an earlier end of this run, before max_duration was raised
        shutil.rmtree(out_dir)
    model = model_with_weights(cfg.model, state, "the trained model")
    export_hf(model, str(out_dir), tokenizer_path=run_tokenizer(cfg))
    log.info("exported the final model to %s", out_dir)
