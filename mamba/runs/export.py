"""Write a trained model as a directory another library loads, from a checkpoint
(tools/export_hf.py) or at the end of a run (the trainer), in one of three formats.

Export matrix ("auto", the default and the end-of-run format, takes the first that fits, in
the order hf, bamba, mamba-ssm; a format that does not fit is refused with the reasons):

  model                                                   hf     bamba   mamba-ssm
  pure Mamba-1 / Mamba-2 (no attention, no MLPs)          auto   -       yes
  Mamba-2 + attention + MLPs meeting bamba.py's           -      auto    yes
    conditions (ngroups 1, attention without conv, ...)
  Mamba-3, pure or hybrid (transformers 4.53 has no       -      -       auto
    Mamba-3 class)
  every other model (Mamba-1 hybrids, hybrids without     -      -       auto
    MLPs, MLPs without attention, ngroups > 1, ...)

  hf         transformers' MambaForCausalLM / Mamba2ForCausalLM: config.json, model.safetensors
             (mamba.model.hf). Holds Mamba mixers only, so no hybrid.
  bamba      transformers' BambaForCausalLM: config.json, model.safetensors (mamba.model.bamba,
             whose docstring states the exact conditions; a model that fails one is refused with
             the reasons). The only transformers class with Mamba-2, attention and MLPs.
  mamba-ssm  mamba-ssm's MambaLMHeadModel.from_pretrained layout: config.json, pytorch_model.bin
             (mamba.model.mamba_ssm_format). Every model a training config builds has one (it refuses
             only a norm_eps other than mamba-ssm's fixed 1e-5), so "auto" does not fail. For
             Mamba-3 see that module's caveats (the 2.3.2 release's MambaLMHeadModel does not
             dispatch "Mamba3"; mamba-ssm's main branch computes A with another activation).
All three load back here with mamba.model.hf.model_from_pretrained (tools/generate.py) and as
model.init_from. The run's tokenizer files (mamba.data.tokenizer) go beside the weights in each.

The directory is written into a temporary sibling and renamed into place when complete, so it
appears whole or not at all.
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
from mamba.model.bamba import bamba_config, bamba_problems, bamba_state_dict
from mamba.model.hf import hf_config, hf_state_dict, mixer_kind
from mamba.model.lm import MambaLMHeadModel
from mamba.model.mamba_ssm_format import mamba_ssm_config, mamba_ssm_state_dict
from mamba.runs.checkpoints import model_with_weights
from mamba.runs.run_config import run_tokenizer

log = logging.getLogger(__name__)

FORMATS = ("auto", "hf", "bamba", "mamba-ssm")


def is_hybrid(model: MambaLMHeadModel) -> bool:
    return bool(model.config.attn_layer_idx) or model.config.d_intermediate > 0


def choose_format(model: MambaLMHeadModel, fmt: str = "auto") -> str:
    """The format to write: `fmt` itself, or for "auto" the first of hf, bamba, mamba-ssm that fits."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if mixer_kind(model) == "mamba3":
        log.info("exporting in mamba-ssm's layout: transformers has no Mamba-3 class")
        return "mamba-ssm"
    if not is_hybrid(model):
        return "hf"
    problems = bamba_problems(model)
    if not problems:
        return "bamba"
    log.info("exporting in mamba-ssm's layout: transformers has no class for this hybrid (not Bamba: %s)",
             "; ".join(problems))
    return "mamba-ssm"


def export_hf(model: MambaLMHeadModel, out_dir: str, tokenizer_path: str | None = None, fmt: str = "auto") -> str:
    """Write the model to out_dir in format `fmt` (module doc) with the tokenizer files; returns
    the format written.

    tokenizer_path: a tokenizer.json (or a directory holding one), copied with a
    tokenizer_config.json and special_tokens_map.json so `AutoTokenizer.from_pretrained` works.
    Everything is written into a temporary sibling directory renamed to out_dir when complete;
    out_dir must not exist or be empty.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new output directory")
    fmt = choose_format(model, fmt)
    # Build config and weights before touching the disk: a format that does not fit raises here.
    if fmt == "mamba-ssm":
        config, weights = mamba_ssm_config(model), mamba_ssm_state_dict(model)
    elif fmt == "bamba":
        config, weights = bamba_config(model), bamba_state_dict(model)
    else:
        config, weights = hf_config(model), hf_state_dict(model)
        _warn_mamba2_groups(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)  # not mkdtemp: its 0700 would keep the export from teammates
    try:
        if tokenizer_path is not None:
            ids = write_tokenizer_files(Path(tokenizer_path), tmp)
            if fmt != "mamba-ssm":  # mamba-ssm's MambaConfig(**config) takes no other keys
                # The model's special ids are the tokenizer's (hf_config would set all three to EOS).
                config.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if fmt == "mamba-ssm":
            torch.save(weights, tmp / "pytorch_model.bin")  # open(): the umask's mode
        else:
            _save_safetensors(weights, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fmt


def _save_safetensors(weights: dict[str, torch.Tensor], folder: Path) -> None:
    from safetensors.torch import save_file

    file = folder / "model.safetensors"
    save_file(weights, str(file), metadata={"format": "pt"})
    # safetensors writes through a 0600 temporary file: give the weights the mode the umask
    # gives files, read off the directory mkdir just made (0777 & ~umask).
    file.chmod(stat.S_IMODE(folder.stat().st_mode) & 0o666)


def _warn_mamba2_groups(model: MambaLMHeadModel) -> None:
    if mixer_kind(model) == "mamba2" and model.config.ngroups > 1:
        # transformers <= 4.53's MambaRMSNormGated normalises over all of d_inner, mamba-ssm per
        # group (group_size = d_inner / ngroups): the weights are right, HF's output differs.
        log.warning("ngroups=%d: HF transformers' Mamba2 normalises the gated RMSNorm over all "
                    "channels, not per group as mamba-ssm and this model do; its logits will differ",
                    model.config.ngroups)


def export_final_weights(cfg: TrainConfig, state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """The end-of-run export, on one rank: `state` is the full (unsharded) plain-model state dict
    the trainer gathered; out_dir (<save_folder>/hf) is replaced, with the training data's
    tokenizer, in the model's "auto" format (module doc), which exists for every model.
    """
    if out_dir.exists():  # the export of an earlier end of this run, before max_duration was raised
        shutil.rmtree(out_dir)
    model = model_with_weights(cfg.model, state, "the trained model")
    fmt = export_hf(model, str(out_dir), tokenizer_path=run_tokenizer(cfg))
    log.info("exported the final model to %s (%s format)", out_dir, fmt)
