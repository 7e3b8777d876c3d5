"""Build the LM from the validated `model:` config section: the one mapping from ModelConfig
(YAML keys) to MambaConfig (the model's own dataclass, mamba-ssm's names).

    build_model(cfg.model)                 # initialised on the default device, mamba-ssm's init
    build_model(cfg.model, device="meta")  # shapes only, no memory, no init: materialise later
                                           # with model.to_empty(device=...) + model.init_weights()

The meta route is what large FSDP runs want: no rank holds a full float32 model before sharding.
With `init_from` set the pretrained weights are loaded after the init (not on meta, where there
is nothing to load into yet; the caller loads after materialising).
"""
from __future__ import annotations

import dataclasses

import torch

from mamba.model.lm import MambaConfig, MambaLMHeadModel


def mamba_config(model_cfg) -> MambaConfig:
    """ModelConfig (mamba/config/schema.py) -> MambaConfig; defaults of unnamed fields are mamba-ssm's."""
    m = model_cfg
    return MambaConfig(
        d_model=m.d_model, n_layer=m.n_layer, vocab_size=m.vocab_size, ssm_layer=m.ssm_layer,
        d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, dt_min=m.dt_min, dt_max=m.dt_max,
        headdim=m.headdim, ngroups=m.ngroups, chunk_size=m.chunk_size,
        A_init_range=tuple(m.A_init_range), rope_fraction=m.rope_fraction, A_floor=m.A_floor,
        is_outproj_norm=m.is_outproj_norm, is_mimo=m.is_mimo, mimo_rank=m.mimo_rank, kernels=m.kernels,
        pad_vocab_size_multiple=m.pad_vocab_size_multiple, tie_embeddings=m.tie_embeddings,
        document_isolation=m.document_isolation, attn_layer_idx=tuple(m.attn_layer_idx),
        attn_cfg=attn_kwargs(m.attn_cfg) if m.attn_layer_idx else {}, d_intermediate=m.d_intermediate,
    )


def attn_kwargs(attn_cfg) -> dict:
    """AttnConfig -> mamba-ssm's attn_cfg dict (MHA's keyword arguments), every key written out."""
    return dataclasses.asdict(attn_cfg)


def build_model(model_cfg, device: str | torch.device | None = None) -> MambaLMHeadModel:
    """The LM for `model_cfg` on `device` (None: torch's default device).

    device="meta": parameters without storage and without init (init_weights runs on the real
    device after `to_empty`); `init_from` is then left to the caller as well.
    """
    config = mamba_config(model_cfg)
    with torch.device(device if device is not None else torch.get_default_device()):
        model = MambaLMHeadModel(config)  # runs init_weights; on meta that only records shapes
    init_from = getattr(model_cfg, "init_from", None)
    if init_from and torch.device(device if device is not None else "cpu").type != "meta":
        from mamba.model import hf  # imported here: the key mapping is only needed for loading

        hf.load_pretrained(model, init_from)
    return model
