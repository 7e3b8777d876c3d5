"""Interchange with mamba-ssm and HF transformers: the pure mapping of configs and state dicts.

Our parameter names are mamba-ssm's (`backbone.embedding`, `backbone.layers.{i}.norm`,
`backbone.layers.{i}.mixer.*`, `backbone.norm_f`, `lm_head`). HF transformers' MambaForCausalLM
and Mamba2ForCausalLM (modeling_mamba.py / modeling_mamba2.py, 4.4x-4.5x) use the same names except
`backbone.embeddings` for the embedding, so the mapping is one rename.

Layouts read by `load_pretrained` and `model_from_pretrained`:
  mamba-ssm    config.json {d_model, n_layer, vocab_size, ssm_cfg, attn_layer_idx, attn_cfg,
               d_intermediate, pad_vocab_size_multiple, tie_embeddings, ...} + pytorch_model.bin, as
               state-spaces publishes on the Hub (`MambaLMHeadModel.save_pretrained` /
               `from_pretrained`, mixer_seq_simple.py), pure Mamba or hybrid, Mamba-1/2/3
               (mamba_ssm_format.py, whose docstring has Mamba-3's caveats);
  HF           config.json {model_type: mamba | mamba2, hidden_size, ...} + model.safetensors or
               pytorch_model.bin, optionally sharded with a *.index.json;
  HF Bamba     the same with model_type bamba: Mamba-2 + attention + MLPs (bamba.py).
The other way, hf_config and hf_state_dict give a HF Mamba/Mamba2 directory's config.json and
weights (mamba_ssm_format and bamba the other two formats); mamba.runs.export writes the
directory itself (with the tokenizer files of mamba.data.tokenizer) and picks the format.
transformers (4.53) has no Mamba-3 class, so a Mamba-3 model has only the mamba-ssm layout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mamba.model import bamba
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.model.mamba_ssm_format import (  # CheckpointMismatchError: callers import it from here
    CheckpointMismatchError, arch_fields, check, check_hybrid_layout, mamba_ssm_arch, ssm_mixer)

HF_EMBEDDING = "backbone.embeddings.weight"
OUR_EMBEDDING = "backbone.embedding.weight"
HEAD = "lm_head.weight"


# ----------------------------------------------------------------------------- architecture
def mixer_kind(model: MambaLMHeadModel) -> str:
    """"mamba1", "mamba2" or "mamba3"."""
    return model.config.ssm_layer


def hf_config(model: MambaLMHeadModel, eos_token_id: int | None = None) -> dict:
    """The config.json of the equivalent HF MambaForCausalLM / Mamba2ForCausalLM.

    HF's vocab_size is the number of embedding rows, i.e. our padded vocabulary.
    """
    c, mixer = model.config, model.backbone.layers[0].mixer
    if c.ssm_layer == "mamba3":
        raise ValueError("a Mamba-3 model has no transformers format: transformers (4.53 here) has no Mamba-3 "
                         "class; export it as mamba-ssm")
    if c.attn_layer_idx or c.d_intermediate:
        raise ValueError("a hybrid model (attention layers or MLPs) has no transformers Mamba/Mamba2 format: "
                         "MambaForCausalLM and Mamba2ForCausalLM hold Mamba mixers only; export it as "
                         "bamba (Mamba-2 hybrids that fit) or mamba-ssm (any model)")
    common = {
        "vocab_size": c.padded_vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layer,
        "layer_norm_epsilon": c.norm_eps,
        "expand": c.expand,
        "conv_kernel": mixer.d_conv,
        "state_size": mixer.d_state,
        "use_bias": model.backbone.layers[0].mixer.in_proj.bias is not None,
        "use_conv_bias": mixer.conv1d.bias is not None,
        "hidden_act": "silu",
        "residual_in_fp32": c.residual_in_fp32,
        "initializer_range": c.initializer_range,
        "rescale_prenorm_residual": c.rescale_prenorm_residual,
        "tie_word_embeddings": c.tie_embeddings,
        "use_cache": True,
        "torch_dtype": str(model.backbone.embedding.weight.dtype).removeprefix("torch."),
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    if mixer_kind(model) == "mamba1":
        return {
            "architectures": ["MambaForCausalLM"], "model_type": "mamba", **common,
            "intermediate_size": mixer.d_inner,
            "time_step_rank": mixer.dt_rank,
            "time_step_min": c.dt_min, "time_step_max": c.dt_max, "time_step_floor": c.dt_init_floor,
            "time_step_scale": 1.0, "time_step_init_scheme": "random",
        }
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **common,
        "num_heads": mixer.nheads,
        "head_dim": mixer.headdim,
        "n_groups": mixer.ngroups,
        "chunk_size": getattr(mixer, "chunk_size", 256),
        "time_step_min": c.dt_min, "time_step_max": c.dt_max, "time_step_floor": c.dt_init_floor,
        "time_step_limit": [0.0, float("inf")],
        "rms_norm": True,
    }


def _checkpoint_fields(cfg: dict, path: Path) -> dict:
    """Architecture fields of a mamba-ssm or HF config.json, in one vocabulary: kind, d_model,
    n_layer, vocab_size (HF: the embedding rows; mamba-ssm: the real vocabulary), tie, d_state,
    for Mamba-2 headdim, ngroups (None where unknown), attn_layer_idx, attn_cfg, d_intermediate."""
    if cfg.get("model_type") == "bamba":
        return arch_fields(bamba.bamba_arch(cfg, path))
    if "model_type" in cfg:  # HF
        kind = {"mamba": "mamba1", "mamba2": "mamba2"}.get(cfg["model_type"])
        if kind is None:
            raise CheckpointMismatchError(
                f"{path}: model_type {cfg['model_type']!r} is not a Mamba model (expected mamba, mamba2 or bamba)")
        return {
            "kind": kind, "d_model": cfg["hidden_size"], "n_layer": cfg["num_hidden_layers"],
            "vocab_size": cfg["vocab_size"], "tie": cfg.get("tie_word_embeddings", True),
            "d_state": cfg.get("state_size"), "headdim": cfg.get("head_dim"), "ngroups": cfg.get("n_groups"),
            "attn_layer_idx": (), "attn_cfg": {}, "d_intermediate": 0,
        }
    if "d_model" in cfg:  # mamba-ssm MambaConfig (mamba_ssm/models/config_mamba.py)
        return arch_fields(mamba_ssm_arch(cfg, path))
    raise CheckpointMismatchError(
        f"{path}: neither a HF config (model_type) nor a mamba-ssm config (d_model, n_layer)")


# ----------------------------------------------------------------------------- reading files
def read_checkpoint_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict with OUR key names) of a mamba-ssm or HF directory."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json; expected a mamba-ssm or HF Mamba checkpoint directory")
    cfg = json.loads((root / "config.json").read_text())
    state = _read_weights(root)
    if cfg.get("model_type") == "bamba":
        return cfg, bamba.state_from_bamba(state)
    renamed = {}
    for key, value in state.items():
        key = OUR_EMBEDDING if key == HF_EMBEDDING else key
        renamed[key] = value
    return cfg, renamed


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (root / index_name).is_file():
            files = sorted(set(json.loads((root / index_name).read_text())["weight_map"].values()))
            state = {}
            for name in files:
                state.update(_read_weight_file(root / name))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return _read_weight_file(root / name)
    raise FileNotFoundError(f"{root}: no model.safetensors or pytorch_model.bin (nor a sharded *.index.json)")


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- import
def load_pretrained(model: MambaLMHeadModel, path: str) -> None:
    """Copy a mamba-ssm or HF Mamba/Mamba2/Bamba checkpoint directory's weights into `model`, in place.

    Architecture (hybrid layout included: attention layers, their attn_cfg, the MLP width) and
    every shape must match, except the vocabulary: embedding/head rows are copied
    up to the smaller of the two paddings, and our extra padding rows keep their initialisation
    (a checkpoint with more rows loads only if those rows are padding beyond our vocabulary).
    A tied checkpoint loads into an untied model (the head starts as a copy of the embedding); an
    untied one into a tied model is refused, since its head would be lost.
    """
    cfg, state = read_checkpoint_dir(path)
    fields = _checkpoint_fields(cfg, Path(path) / "config.json")
    ours = mixer_kind(model)
    check(fields["kind"] == ours,
          f"{path}: checkpoint is a {fields['kind']} model but model.ssm_layer is {ours}")
    for name, value in (("d_model", model.config.d_model), ("n_layer", model.config.n_layer)):
        check(fields[name] == value, f"{path}: checkpoint has {name}={fields[name]}, the model {value}; "
                                     f"set model.{name}={fields[name]}")
    mixer = ssm_mixer(model)
    # Mamba-3's rope_fraction, is_outproj_norm and MIMO rank (1: SISO) also show in the shapes,
    # A_floor only in the result.
    for name in ("d_state", "headdim", "ngroups", "rope_fraction", "A_floor", "is_outproj_norm", "mimo_rank"):
        if fields.get(name) is not None and hasattr(mixer, name):
            fix = f"model.{name}={fields[name]}"
            if name == "mimo_rank":
                fix = "model.is_mimo=false" if fields[name] == 1 else f"model.is_mimo=true {fix}"
            check(fields[name] == getattr(mixer, name),
                  f"{path}: checkpoint has {name}={fields[name]}, the model {getattr(mixer, name)}; set {fix}")
    check_hybrid_layout(model, fields, path)

    params = model.state_dict()
    embedding = state.get(OUR_EMBEDDING)
    check(embedding is not None, f"{path}: no {OUR_EMBEDDING} (or {HF_EMBEDDING}) in the weights")
    head = state.get(HEAD)
    ckpt_tied = head is None or head is embedding or (fields["tie"] and torch.equal(head, embedding))
    if model.config.tie_embeddings and not ckpt_tied:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint's lm_head.weight differs from its embedding (untied) but the "
            f"model ties them; set model.tie_embeddings=false")
    if head is None:
        head = embedding

    expected = set(params) - {OUR_EMBEDDING, HEAD}
    present = set(state) - {OUR_EMBEDDING, HEAD}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    check(not missing, f"{path}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    check(not unexpected, f"{path}: weights the model does not have: {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(expected):
        check(tuple(state[key].shape) == tuple(params[key].shape),
              f"{path}: {key} has shape {tuple(state[key].shape)} in the checkpoint but "
              f"{tuple(params[key].shape)} in the model")

    real_vocab = fields["vocab_size"]
    with torch.no_grad():
        for key in sorted(expected):
            params[key].copy_(state[key])
        _copy_rows(model.backbone.embedding.weight, embedding, real_vocab, OUR_EMBEDDING, path)
        if not model.config.tie_embeddings:
            _copy_rows(model.lm_head.weight, head, real_vocab, HEAD, path)


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, real_vocab: int, key: str, path) -> None:
    """Copy vocabulary rows; dst (V_ours, d), src (V_ckpt, d)."""
    check(src.shape[1:] == dst.shape[1:],
          f"{path}: {key} has shape {tuple(src.shape)} in the checkpoint but {tuple(dst.shape)} in the model")
    rows = min(src.shape[0], dst.shape[0])
    check(rows >= min(real_vocab, src.shape[0]),
          f"{path}: {key} has {src.shape[0]} rows for a vocabulary of {real_vocab}, but the model "
          f"has only {dst.shape[0]} rows ({tuple(dst.shape)}); set model.vocab_size={real_vocab}")
    dst[:rows].copy_(src[:rows])


def model_from_pretrained(path: str | os.PathLike) -> MambaLMHeadModel:
    """Build the model a mamba-ssm or HF Mamba/Mamba2/Bamba directory describes and load its weights."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json; expected a mamba-ssm or HF Mamba checkpoint directory")
    cfg = json.loads((root / "config.json").read_text())
    fields = _checkpoint_fields(cfg, root / "config.json")
    if cfg.get("model_type") == "bamba":
        arch = bamba.bamba_arch(cfg, root / "config.json")
    elif "model_type" in cfg:  # HF: vocab_size already counts the padding rows
        arch = dict(
            d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
            d_state=cfg.get("state_size", 16), d_conv=cfg.get("conv_kernel", 4), expand=cfg.get("expand", 2),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5), pad_vocab_size_multiple=1,
            tie_embeddings=cfg.get("tie_word_embeddings", True))
        if fields["kind"] == "mamba1":
            arch["dt_rank"] = cfg.get("time_step_rank", "auto")
        else:
            arch.update(headdim=cfg["head_dim"], ngroups=cfg.get("n_groups", 1), chunk_size=cfg.get("chunk_size", 256))
    else:  # mamba-ssm: ssm_cfg holds the mixer's own arguments, absent ones at its defaults
        arch = mamba_ssm_arch(cfg, root / "config.json")
    config = MambaConfig(**{"ssm_layer": fields["kind"], **arch})
    model = MambaLMHeadModel(config)
    load_pretrained(model, str(root))
    return model.eval()


# ----------------------------------------------------------------------------- export
def hf_state_dict(model: MambaLMHeadModel) -> dict[str, torch.Tensor]:
    """Our weights under HF names, contiguous CPU tensors; a tied head is left out (HF re-ties it)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == HEAD and model.config.tie_embeddings:
            continue
        out[HF_EMBEDDING if key == OUR_EMBEDDING else key] = value.detach().cpu().contiguous().clone()
    return out
