"""Interchange with mamba-ssm and HF transformers: the pure mapping of configs and state dicts.

Our parameter names are mamba-ssm's (`backbone.embedding`, `backbone.layers.{i}.norm`,
`backbone.layers.{i}.mixer.*`, `backbone.norm_f`, `lm_head`). HF transformers' MambaForCausalLM
and Mamba2ForCausalLM (modeling_mamba.py / modeling_mamba2.py, 4.4x-4.5x) use the same names except
`backbone.embeddings` for the embedding, so the mapping is one rename.

Layouts read by `load_pretrained`:
  mamba-ssm    config.json {d_model, n_layer, vocab_size, ssm_cfg, pad_vocab_size_multiple,
               tie_embeddings, ...} + pytorch_model.bin, as state-spaces publishes on the Hub
               (`MambaLMHeadModel.save_pretrained` / `from_pretrained`, mixer_seq_simple.py);
  HF           config.json {model_type: mamba | mamba2, hidden_size, ...} + model.safetensors or
               pytorch_model.bin, optionally sharded with a *.index.json.
The other way, hf_config and hf_state_dict give a HF directory's config.json and weights;
mamba.runs.export writes the directory itself (with the tokenizer files of mamba.data.tokenizer).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mamba.model.lm import MambaConfig, MambaLMHeadModel

HF_EMBEDDING = "backbone.embeddings.weight"
OUR_EMBEDDING = "backbone.embedding.weight"
HEAD = "lm_head.weight"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model; the message names the key and both shapes."""


# ----------------------------------------------------------------------------- architecture
def mixer_kind(model: MambaLMHeadModel) -> str:
    """"mamba1" or "mamba2"."""
    return model.config.ssm_layer


def hf_config(model: MambaLMHeadModel, eos_token_id: int | None = None) -> dict:
    """The config.json of the equivalent HF MambaForCausalLM / Mamba2ForCausalLM.

    HF's vocab_size is the number of embedding rows, i.e. our padded vocabulary.
    """
    c, mixer = model.config, model.backbone.layers[0].mixer
    if c.attn_layer_idx or c.d_intermediate:
        raise ValueError("a hybrid model (attention layers or MLPs) has no transformers Mamba/Mamba2 format: "
                         "MambaForCausalLM and Mamba2ForCausalLM hold Mamba mixers only")
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
    """Architecture fields of a mamba-ssm or HF config.json, in one vocabulary:
    kind, d_model, n_layer, rows (embedding rows, None if unknown), vocab_size (real, if known),
    tie, d_state, and for Mamba-2 headdim, ngroups."""
    if "model_type" in cfg:  # HF
        kind = {"mamba": "mamba1", "mamba2": "mamba2"}.get(cfg["model_type"])
        if kind is None:
            raise CheckpointMismatchError(
                f"{path}: model_type {cfg['model_type']!r} is not a Mamba model (expected mamba or mamba2)")
        return {
            "kind": kind, "d_model": cfg["hidden_size"], "n_layer": cfg["num_hidden_layers"],
            "vocab_size": cfg["vocab_size"], "tie": cfg.get("tie_word_embeddings", True),
            "d_state": cfg.get("state_size"), "headdim": cfg.get("head_dim"), "ngroups": cfg.get("n_groups"),
        }
    if "d_model" in cfg:  # mamba-ssm MambaConfig (mamba_ssm/models/config_mamba.py)
        ssm_cfg = cfg.get("ssm_cfg") or {}
        kind = "mamba2" if ssm_cfg.get("layer") == "Mamba2" else "mamba1"
        if cfg.get("attn_layer_idx") or cfg.get("d_intermediate", 0):
            raise CheckpointMismatchError(
                f"{path}: hybrid attention layers (attn_layer_idx) or MLPs (d_intermediate) are not "
                f"supported; only pure Mamba LMs load")
        return {
            "kind": kind, "d_model": cfg["d_model"], "n_layer": cfg["n_layer"],
            "vocab_size": cfg["vocab_size"], "tie": cfg.get("tie_embeddings", True),
            "d_state": ssm_cfg.get("d_state", 16 if kind == "mamba1" else 128),
            "headdim": ssm_cfg.get("headdim", 64) if kind == "mamba2" else None,
            "ngroups": ssm_cfg.get("ngroups", 1) if kind == "mamba2" else None,
        }
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
    """Copy a mamba-ssm or HF Mamba/Mamba2 checkpoint directory's weights into `model`, in place.

    Architecture and every shape must match, except the vocabulary: embedding/head rows are copied
    up to the smaller of the two paddings, and our extra padding rows keep their initialisation
    (a checkpoint with more rows loads only if those rows are padding beyond our vocabulary).
    A tied checkpoint loads into an untied model (the head starts as a copy of the embedding); an
    untied one into a tied model is refused, since its head would be lost.
    """
    cfg, state = read_checkpoint_dir(path)
    fields = _checkpoint_fields(cfg, Path(path) / "config.json")
    ours = mixer_kind(model)
    _check(fields["kind"] == ours,
           f"{path}: checkpoint is a {fields['kind']} model but model.ssm_layer is {ours}")
    for name, value in (("d_model", model.config.d_model), ("n_layer", model.config.n_layer)):
        _check(fields[name] == value, f"{path}: checkpoint has {name}={fields[name]}, the model {value}; "
                                      f"set model.{name}={fields[name]}")
    mixer = model.backbone.layers[0].mixer
    for name in ("d_state", "headdim", "ngroups"):
        if fields.get(name) is not None and hasattr(mixer, name):
            _check(fields[name] == getattr(mixer, name),
                   f"{path}: checkpoint has {name}={fields[name]}, the model {getattr(mixer, name)}")

    params = model.state_dict()
    embedding = state.get(OUR_EMBEDDING)
    _check(embedding is not None, f"{path}: no {OUR_EMBEDDING} (or {HF_EMBEDDING}) in the weights")
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
    _check(not missing, f"{path}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    _check(not unexpected, f"{path}: weights the model does not have: {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(expected):
        _check(tuple(state[key].shape) == tuple(params[key].shape),
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
    _check(src.shape[1:] == dst.shape[1:],
           f"{path}: {key} has shape {tuple(src.shape)} in the checkpoint but {tuple(dst.shape)} in the model")
    rows = min(src.shape[0], dst.shape[0])
    _check(rows >= min(real_vocab, src.shape[0]),
           f"{path}: {key} has {src.shape[0]} rows for a vocabulary of {real_vocab}, but the model "
           f"has only {dst.shape[0]} rows ({tuple(dst.shape)}); set model.vocab_size={real_vocab}")
    dst[:rows].copy_(src[:rows])


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointMismatchError(message)


def model_from_pretrained(path: str | os.PathLike) -> MambaLMHeadModel:
    """Build the model a mamba-ssm or HF Mamba/Mamba2 directory describes and load its weights."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no config.json; expected a mamba-ssm or HF Mamba checkpoint directory")
    cfg = json.loads((root / "config.json").read_text())
    fields = _checkpoint_fields(cfg, root / "config.json")
    if "model_type" in cfg:  # HF: vocab_size already counts the padding rows
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
        ssm = cfg.get("ssm_cfg") or {}
        arch = dict(
            d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
            d_state=fields["d_state"], d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
            norm_eps=cfg.get("norm_epsilon", 1e-5), pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
            tie_embeddings=cfg.get("tie_embeddings", True))
        if fields["kind"] == "mamba1":
            arch["dt_rank"] = ssm.get("dt_rank", "auto")
        else:
            arch.update(headdim=fields["headdim"], ngroups=fields["ngroups"], chunk_size=ssm.get("chunk_size", 256))
    config = MambaConfig(ssm_layer=fields["kind"], **arch)
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
