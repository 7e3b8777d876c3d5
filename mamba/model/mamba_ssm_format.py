"""mamba-ssm's checkpoint layout, for every model built here: pure Mamba-1 / Mamba-2 / Mamba-3 and hybrids.

A directory of two files, what `mamba_ssm.MambaLMHeadModel.save_pretrained` writes and
`from_pretrained` reads (mamba_ssm/models/mixer_seq_simple.py, mamba-ssm 2.x):

  config.json        mamba-ssm's MambaConfig (mamba_ssm/models/config_mamba.py), exactly its
                     fields (from_pretrained calls MambaConfig(**config), so any other key is a
                     TypeError there): d_model, d_intermediate, n_layer, vocab_size (the real
                     vocabulary; the rows are padded to pad_vocab_size_multiple), ssm_cfg
                     ({"layer": "Mamba1" | "Mamba2" | "Mamba3"} + the mixer's arguments), attn_layer_idx,
                     attn_cfg (MHA's arguments), rms_norm, residual_in_fp32, fused_add_norm,
                     pad_vocab_size_multiple, tie_embeddings.
  pytorch_model.bin  torch.save(state_dict()): mamba-ssm's parameter names are ours (lm.py);
                     lm_head.weight is included even when tied (the same storage), since
                     from_pretrained loads strictly.

Reading (mamba_ssm_arch) turns such a config.json into our MambaConfig's arguments. Absent keys
take mamba-ssm's defaults, with one exception that is refused instead: MHA's `causal` defaults to
False there, and a model here only runs causal attention. Keys that would change the computation
in ways this model does not implement (an MLP inside attention, LayerNorm, Mamba-2 options such as
norm_before_gate) are refused by name rather than silently dropped.

Mamba-3 (ssm_cfg.layer "Mamba3"): the mixer's arguments are those of mamba-ssm 2.3.2's
`Mamba3.__init__` (mamba_ssm/modules/mamba3.py): d_state, expand, headdim, ngroups, rope_fraction,
dt_min, dt_max, dt_init_floor, A_floor, is_outproj_norm, is_mimo, mimo_rank, chunk_size; absent
ones take its defaults (d_state 128, headdim 64, chunk_size 64, mimo_rank 4, ...). Two caveats about mamba-ssm itself, read off its git history:
  - the 2.3.2 release's `create_block` (models/mixer_seq_simple.py) dispatches only "Mamba1" and
    "Mamba2" and raises ValueError on "Mamba3"; the dispatch came later on its main branch
    (commit b3cae1b, PR #968), so `MambaLMHeadModel.from_pretrained` of such a directory needs a
    mamba-ssm built from that source (the Mamba3 module alone is in 2.3.2);
  - that same main branch (commit c69aaab, PR #962) replaced the decay's softplus by a
    "heavy-tail" activation (A = -max(f(dd_A), A_floor), f(x) = 1 + x for x >= 0, 1 / (1 - x)
    below), unconditionally: a checkpoint written here (2.3.2's softplus) loads there with the
    same weights but a different A, hence different logits, and a checkpoint trained there
    reads here the same way. No config key records which one a checkpoint was trained with.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from mamba.model.attention import MHA
from mamba.model.lm import MambaLMHeadModel
from mamba.model.mlp import mlp_width


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model; the message names the key or field and both values."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckpointMismatchError(message)


SSM_LAYERS = {"Mamba1": "mamba1", "Mamba2": "mamba2", "Mamba3": "mamba3"}  # ssm_cfg.layer -> our ssm_layer
NORM_EPS = 1e-5  # create_block's norm_epsilon: MambaConfig cannot set it
# mamba-ssm MHA's keyword defaults (mamba_ssm/modules/mha.py); num_heads has none.
MHA_DEFAULTS = {
    "num_heads_kv": None, "head_dim": None, "mlp_dim": 0, "qkv_proj_bias": True, "out_proj_bias": True,
    "softmax_scale": None, "causal": False, "d_conv": 0, "rotary_emb_dim": 0, "rotary_emb_base": 10000.0,
    "rotary_emb_interleaved": False,
}
# ssm_cfg keys that only steer initialisation or kernel choice: read where we have them, else ignored.
_SSM_INIT_KEYS = {"dt_min", "dt_max", "dt_init_floor", "A_init_range", "dt_init", "dt_scale", "conv_init",
                  "use_fast_path", "use_mem_eff_path"}
_SSM_SHAPE_KEYS = {"mamba1": {"d_state", "d_conv", "expand", "dt_rank"},
                   "mamba2": {"d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"},
                   # mamba-ssm 2.3.2 Mamba3.__init__'s arguments that this model reads (all but the
                   # init-only dt_*)
                   "mamba3": {"d_state", "expand", "headdim", "ngroups", "chunk_size", "rope_fraction", "A_floor",
                              "is_outproj_norm", "is_mimo", "mimo_rank"}}
# mamba-ssm's Mamba3 defaults where they differ from MambaConfig's (mamba_ssm/modules/mamba3.py).
MAMBA3_DEFAULTS = {"d_state": 128, "headdim": 64, "chunk_size": 64}
# Mamba3 arguments that do not change the computation: `dropout`, `layer_idx`, `n_layer` it only
# absorbs ("Just to absorb the kwarg"); `fuse_pregate_headwise_norm` (after 2.3.2) moves MIMO's
# per-rank output norm into the kernel, the same computation.
_MAMBA3_IGNORED = {"dropout", "layer_idx", "n_layer", "fuse_pregate_headwise_norm"}
# Keys that change the computation: accepted only at the value this model implements.
_SSM_FIXED = {"bias": False, "conv_bias": True, "d_ssm": None, "D_has_hdim": False, "rmsnorm": True,
              "norm_before_gate": False, "dt_limit": [0.0, math.inf]}


# ----------------------------------------------------------------------------- the model's side
def attention_mixer(model: MambaLMHeadModel) -> MHA | None:
    """The first attention layer's mixer (all share attn_cfg), None in a pure Mamba model."""
    return next((layer.mixer for layer in model.backbone.layers if isinstance(layer.mixer, MHA)), None)


def ssm_mixer(model: MambaLMHeadModel):
    """The first Mamba layer's mixer, None if every layer is attention."""
    return next((layer.mixer for layer in model.backbone.layers if not isinstance(layer.mixer, MHA)), None)


def model_attn_cfg(model: MambaLMHeadModel) -> dict:
    """The attention layers' MHA arguments, every key written out and resolved (num_heads_kv,
    head_dim as the module uses them); {} without attention layers."""
    mha = attention_mixer(model)
    if mha is None:
        return {}
    return {
        "num_heads": mha.num_heads, "num_heads_kv": mha.num_heads_kv, "head_dim": mha.head_dim,
        "rotary_emb_dim": mha.rotary_emb_dim, "rotary_emb_base": float(mha.rotary_emb_base),
        "rotary_emb_interleaved": mha.rotary_emb_interleaved, "qkv_proj_bias": mha.in_proj.bias is not None,
        "out_proj_bias": mha.out_proj.bias is not None, "d_conv": mha.d_conv, "causal": True,
        "softmax_scale": mha.softmax_scale,
    }


def mamba_ssm_config(model: MambaLMHeadModel) -> dict:
    """config.json of the model in mamba-ssm's layout (mamba-ssm's MambaConfig fields, in its order)."""
    c = model.config
    check(c.norm_eps == NORM_EPS,
          f"norm_eps={c.norm_eps}: mamba-ssm's MambaConfig cannot record a norm epsilon (its blocks use "
          f"{NORM_EPS}), so the exported model would compute differently there")
    layer = {v: k for k, v in SSM_LAYERS.items()}[c.ssm_layer]
    if c.ssm_layer == "mamba3":  # Mamba3.__init__'s names, in its order: it has no conv
        ssm_cfg = {"layer": layer, "d_state": c.d_state, "expand": c.expand, "headdim": c.headdim,
                   "ngroups": c.ngroups, "rope_fraction": c.rope_fraction, "dt_min": c.dt_min, "dt_max": c.dt_max,
                   "dt_init_floor": c.dt_init_floor, "A_floor": c.A_floor, "is_outproj_norm": c.is_outproj_norm,
                   "is_mimo": c.is_mimo, "mimo_rank": c.mimo_rank, "chunk_size": c.chunk_size}
    else:
        ssm_cfg = {"layer": layer, "d_state": c.d_state, "d_conv": c.d_conv, "expand": c.expand,
                   "dt_min": c.dt_min, "dt_max": c.dt_max, "dt_init_floor": c.dt_init_floor}
    if c.ssm_layer == "mamba1":
        ssm_cfg["dt_rank"] = c.dt_rank
    elif c.ssm_layer == "mamba2":
        ssm_cfg.update(headdim=c.headdim, ngroups=c.ngroups, chunk_size=c.chunk_size,
                       A_init_range=list(c.A_init_range))
    attn_layer_idx = [i for i, layer in enumerate(model.backbone.layers) if isinstance(layer.mixer, MHA)]
    return {
        "d_model": c.d_model, "d_intermediate": c.d_intermediate, "n_layer": c.n_layer,
        "vocab_size": c.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": attn_layer_idx,
        "attn_cfg": model_attn_cfg(model), "rms_norm": True, "residual_in_fp32": c.residual_in_fp32,
        "fused_add_norm": True, "pad_vocab_size_multiple": c.pad_vocab_size_multiple,
        "tie_embeddings": c.tie_embeddings,
    }


def mamba_ssm_state_dict(model: MambaLMHeadModel) -> dict[str, torch.Tensor]:
    """The state dict as mamba-ssm saves it: our names, every key (a tied head shares the
    embedding's storage, so torch.save writes it once), on the CPU."""
    return {key: value.detach().cpu() for key, value in model.state_dict().items()}


# ----------------------------------------------------------------------------- reading a config.json
def parse_attn_cfg(attn_cfg: dict, d_model: int, where: str) -> dict:
    """A checkpoint's attn_cfg -> our MHA arguments, resolved (num_heads_kv, head_dim filled in)."""
    check(isinstance(attn_cfg, dict), f"{where}: attn_cfg must be a mapping of MHA arguments, got {attn_cfg!r}")
    unknown = sorted(set(attn_cfg) - set(MHA_DEFAULTS) - {"num_heads"})
    check(not unknown, f"{where}: attn_cfg keys {unknown} are not arguments of mamba-ssm's MHA that this "
                       f"model implements ({sorted(MHA_DEFAULTS) + ['num_heads']})")
    check(attn_cfg.get("num_heads", 0) > 0,
          f"{where}: attn_cfg.num_heads is missing or not positive ({attn_cfg.get('num_heads')!r}); "
          f"mamba-ssm's MHA requires it")
    cfg = {**MHA_DEFAULTS, **attn_cfg}
    check(not cfg.pop("mlp_dim"),
          f"{where}: attn_cfg.mlp_dim={attn_cfg.get('mlp_dim')} (an MLP fused into the attention's "
          f"projections) is not supported; only mlp_dim 0 (use d_intermediate for MLPs)")
    check(cfg["causal"] is True,
          f"{where}: attn_cfg.causal is {attn_cfg.get('causal', 'absent')!r}, and mamba-ssm's MHA "
          f"defaults to causal=False (bidirectional); this model only runs causal attention. If the "
          f"checkpoint is a causal language model, add \"causal\": true to its attn_cfg")
    cfg["num_heads_kv"] = cfg["num_heads_kv"] or cfg["num_heads"]
    if cfg["head_dim"] is None:
        check(d_model % cfg["num_heads"] == 0,
              f"{where}: attn_cfg has no head_dim and d_model={d_model} is not a multiple of "
              f"num_heads={cfg['num_heads']}")
        cfg["head_dim"] = d_model // cfg["num_heads"]
    cfg["rotary_emb_base"] = float(cfg["rotary_emb_base"])
    return cfg


def _ssm_arguments(ssm_cfg: dict, kind: str, where: str) -> dict:
    """ssm_cfg (without layer) -> MambaConfig's mixer arguments; refuses what this model lacks."""
    if kind == "mamba3":
        return _mamba3_arguments(ssm_cfg, where)
    arguments = {}
    for key, value in ssm_cfg.items():
        if key in _SSM_SHAPE_KEYS[kind] or key in {"dt_min", "dt_max", "dt_init_floor", "A_init_range"}:
            arguments[key] = tuple(value) if key == "A_init_range" else value
        elif key in _SSM_FIXED:
            check((list(value) if isinstance(value, (list, tuple)) else value) == _SSM_FIXED[key],
                  f"{where}: ssm_cfg.{key}={value!r} is not supported; this model implements "
                  f"{key}={_SSM_FIXED[key]!r} only")
        else:
            check(key in _SSM_INIT_KEYS,
                  f"{where}: ssm_cfg.{key} is not an argument of mamba-ssm's {kind} mixer that this model reads")
    return arguments


def _mamba3_arguments(ssm_cfg: dict, where: str) -> dict:
    """A Mamba3 ssm_cfg (without layer) -> MambaConfig's arguments, at mamba-ssm's defaults where absent."""
    arguments = dict(MAMBA3_DEFAULTS)
    for key, value in ssm_cfg.items():
        if key in _SSM_SHAPE_KEYS["mamba3"] or key in {"dt_min", "dt_max", "dt_init_floor"}:
            arguments[key] = value
        else:
            check(key in _MAMBA3_IGNORED,
                  f"{where}: ssm_cfg.{key} is not an argument of mamba-ssm 2.3.2's Mamba3 that this model "
                  f"reads (mamba-ssm would swallow it unread through **kwargs); remove it if that is intended")
    rope_fraction = arguments.get("rope_fraction", 0.5)
    check(rope_fraction in (0.5, 1.0),
          f"{where}: ssm_cfg.rope_fraction={rope_fraction!r}: mamba-ssm's Mamba3 allows 0.5 or 1.0")
    check(isinstance(arguments.get("is_mimo", False), bool),
          f"{where}: ssm_cfg.is_mimo={arguments.get('is_mimo')!r} must be true or false")
    if not arguments.get("is_mimo", False):
        arguments.pop("mimo_rank", None)  # mamba-ssm sets it to 1 without is_mimo
    return arguments


def mamba_ssm_arch(cfg: dict, path: Path) -> dict:
    """MambaConfig arguments for a mamba-ssm config.json (absent keys at mamba-ssm's defaults)."""
    where = str(path)
    missing = [key for key in ("d_model", "n_layer", "vocab_size") if key not in cfg]
    check(not missing, f"{where}: mamba-ssm config without {missing}; a checkpoint's config.json records them")
    ssm_cfg = dict(cfg.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    check(layer in SSM_LAYERS, f"{where}: ssm_cfg.layer={layer!r} is not supported; choose one of {sorted(SSM_LAYERS)}")
    kind = SSM_LAYERS[layer]
    check(cfg.get("rms_norm", True) is True,
          f"{where}: rms_norm={cfg.get('rms_norm')!r} (LayerNorm blocks) is not supported; this model uses RMSNorm")
    n_layer = cfg["n_layer"]
    idx = cfg.get("attn_layer_idx") or []
    check(all(isinstance(i, int) and 0 <= i < n_layer for i in idx) and len(set(idx)) == len(idx),
          f"{where}: attn_layer_idx={idx} must be distinct layer indices in 0..{n_layer - 1} (n_layer={n_layer})")
    d_intermediate = cfg.get("d_intermediate", 0)
    check(isinstance(d_intermediate, int) and d_intermediate >= 0,
          f"{where}: d_intermediate={d_intermediate!r} must be an integer >= 0")
    arch = dict(
        ssm_layer=kind, d_model=cfg["d_model"], n_layer=n_layer, vocab_size=cfg["vocab_size"],
        d_state=16 if kind == "mamba1" else 128, norm_eps=cfg.get("norm_epsilon", NORM_EPS),
        pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
        tie_embeddings=cfg.get("tie_embeddings", True), residual_in_fp32=cfg.get("residual_in_fp32", True),
        attn_layer_idx=tuple(sorted(idx)), d_intermediate=d_intermediate,
        attn_cfg=parse_attn_cfg(cfg.get("attn_cfg") or {}, cfg["d_model"], where) if idx else {},
    )
    arch.update(_ssm_arguments(ssm_cfg, kind, where))
    return arch


def arch_fields(arch: dict) -> dict:
    """The architecture fields load_pretrained compares, from MambaConfig arguments (for Mamba-3
    also rope_fraction, A_floor, is_outproj_norm and the MIMO rank (1 for SISO): A_floor changes the
    result, not a shape)."""
    heads = arch["ssm_layer"] in ("mamba2", "mamba3")
    mamba3 = arch["ssm_layer"] == "mamba3"
    return {
        "kind": arch["ssm_layer"], "d_model": arch["d_model"], "n_layer": arch["n_layer"],
        "vocab_size": arch["vocab_size"], "tie": arch["tie_embeddings"], "d_state": arch["d_state"],
        "headdim": arch.get("headdim", 64) if heads else None, "ngroups": arch.get("ngroups", 1) if heads else None,
        "rope_fraction": arch.get("rope_fraction", 0.5) if mamba3 else None,
        "A_floor": arch.get("A_floor", 1e-4) if mamba3 else None,
        "is_outproj_norm": arch.get("is_outproj_norm", False) if mamba3 else None,
        "mimo_rank": (arch.get("mimo_rank", 4) if arch.get("is_mimo", False) else 1) if mamba3 else None,
        "attn_layer_idx": tuple(arch["attn_layer_idx"]), "attn_cfg": arch["attn_cfg"],
        "d_intermediate": arch["d_intermediate"],
    }


def check_hybrid_layout(model: MambaLMHeadModel, fields: dict, path) -> None:
    """The checkpoint's attention layers, their MHA arguments and the MLP width must be the model's;
    the message names the field and the model key to set."""
    ours_idx = tuple(i for i, layer in enumerate(model.backbone.layers) if isinstance(layer.mixer, MHA))
    theirs_idx = tuple(sorted(fields["attn_layer_idx"]))
    check(theirs_idx == ours_idx, f"{path}: checkpoint has attn_layer_idx={list(theirs_idx)}, the model "
                                  f"{list(ours_idx)}; set model.attn_layer_idx={list(theirs_idx)}")
    if ours_idx:
        ours_cfg = model_attn_cfg(model)
        for key, value in fields["attn_cfg"].items():
            check(ours_cfg[key] == value, f"{path}: checkpoint has attn_cfg.{key}={value!r}, the model "
                                          f"{ours_cfg[key]!r}; set model.attn_cfg.{key}={value!r}")
    theirs, ours = fields["d_intermediate"], model.config.d_intermediate
    check(mlp_width(theirs) == mlp_width(ours),
          f"{path}: checkpoint has d_intermediate={theirs} (MLP width {mlp_width(theirs)}), the model "
          f"{ours} (width {mlp_width(ours)}); set model.d_intermediate={theirs}")
