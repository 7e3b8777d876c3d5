"""Bamba: HF transformers' BambaForCausalLM (transformers/models/bamba, 4.53) for Mamba-2 +
attention hybrids with MLPs: when our weights are exactly a Bamba model, its
config.json and state dict, and the way back (reading a Bamba directory into our model).

A Bamba layer is our Block: x + mixer(input_layernorm(x)), then x + MLP(pre_ff_layernorm(x)).
The mixer is BambaMixer (mamba-ssm's Mamba-2: in_proj [z, xBC, dt], conv over [x, B, C],
dt_bias, A_log and D per head, gated RMSNorm, out_proj) or, at attn_layer_indices,
BambaAttention (q/k/v/o_proj; RoPE on the first int(head_dim * partial_rotary_factor) channels,
rotate-half; logits scaled by head_dim^-0.5). The MLP is down(silu(gate(x)) * up(x)).

Conditions (bamba_problems lists every one that fails, export refuses with them):
  mixers     ssm_layer mamba2: BambaMixer is a Mamba-2 mixer.
  MLP        d_intermediate > 0: every Bamba layer has an MLP (BambaDecoderLayer.feed_forward).
  ngroups    1: BambaRMSNormGated normalises over all of d_inner (its torch path), ours and
             mamba-ssm per group of d_inner / ngroups; the two agree only for one group.
  attention  at least one attention layer: transformers 4.53's Bamba cache
             (HybridMambaAttentionDynamicCache.get_seq_length) indexes the first one, so
             generate() fails without (the forward alone would work);
             d_conv 0 (Bamba has no convolution over q, k, v); qkv_proj_bias == out_proj_bias
             (one attention_bias flag for all four projections); softmax_scale null or
             head_dim^-0.5 (Bamba's fixed scaling).
Mapped, not refused: any head_dim (written as head_dim, which BambaAttention and its RoPE read),
GQA, rotary_emb_dim R (partial_rotary_factor = R / head_dim, nudged up so that transformers'
int(head_dim * factor) gives R; R = 0 is factor 0, no rotation), rotary_emb_base (rope_theta),
an interleaved (GPT-J) RoPE (each q and k head's first R rows permuted from pairs (2j, 2j+1) to
(j, j + R/2): rotate-half then turns the same pairs by the same angles, and q.k is unchanged when
q and k are permuted alike), the Mamba-2 bias flags (mamba_proj_bias, mamba_conv_bias), norm_eps
(rms_norm_eps, the gated norm's too), tied embeddings, vocabulary padding (vocab_size = rows).
Not in Bamba's config, and harmless in float32: Bamba keeps the residual stream in the model's
dtype where ours is float32 (residual_in_fp32), so bf16 results differ by rounding only.

Keys (ours -> Bamba; layer prefix backbone.layers.{i} -> model.layers.{i}):
  backbone.embedding / norm_f        model.embed_tokens / model.final_layernorm
  norm / norm2                       input_layernorm / pre_ff_layernorm
  mlp.fc1 rows [value; gate], fc2    feed_forward.up_proj (value), gate_proj (gate), down_proj
  mixer.* (Mamba-2)                  mamba.* (the same names)
  mixer.in_proj rows [q | k | v]     self_attn.q_proj, k_proj, v_proj (weight and bias)
  mixer.out_proj                     self_attn.o_proj
  lm_head                            lm_head (left out when tied: transformers re-ties it)

Reading a Bamba directory (bamba_arch, state_from_bamba) needs what our modules implement:
hidden_act silu, mlp_bias false, rope_scaling null, mamba_n_groups 1, intermediate_size a
multiple of 128 (GatedMLP's width), mamba_proj_bias false and mamba_conv_bias true (our Mamba2's).
"""
from __future__ import annotations

import math
import re

import torch

from mamba.model.attention import MHA
from mamba.model.lm import MambaLMHeadModel
from mamba.model.mamba_ssm_format import attention_mixer, check, model_attn_cfg, ssm_mixer
from mamba.model.mlp import MLP_MULTIPLE

# BambaConfig's defaults (configuration_bamba.py, 4.53) for keys a config.json may leave out.
BAMBA_DEFAULTS = {
    "vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "attn_layer_indices": None, "mamba_n_heads": 128, "mamba_d_head": "auto",
    "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
    "mamba_conv_bias": True, "mamba_proj_bias": False, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
    "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "head_dim": None,
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def bamba_problems(model: MambaLMHeadModel) -> list[str]:
    """Why the model is not exactly a BambaForCausalLM; [] when it is (conditions: module doc)."""
    c, problems = model.config, []
    if c.ssm_layer != "mamba2":
        problems.append(f"ssm_layer={c.ssm_layer}: Bamba's Mamba layers are Mamba-2 (BambaMixer)")
    if c.d_intermediate <= 0:
        problems.append("d_intermediate=0: every Bamba layer has an MLP after its mixer")
    if c.ssm_layer == "mamba2" and c.ngroups != 1:
        problems.append(f"ngroups={c.ngroups}: Bamba's gated RMSNorm normalises over all of d_inner, this "
                        f"model per group (d_inner / ngroups); they agree only for ngroups=1")
    if c.ssm_layer == "mamba2" and (c.expand * c.d_model) % c.headdim:
        problems.append(f"expand * d_model = {c.expand * c.d_model} is not a multiple of headdim={c.headdim}")
    mha = attention_mixer(model)
    if mha is None:
        problems.append("no attention layer: transformers' Bamba cache (HybridMambaAttentionDynamicCache, "
                        "4.53) needs one, generate() fails without")
    else:
        if mha.d_conv > 0:
            problems.append(f"attn_cfg.d_conv={mha.d_conv}: Bamba's attention has no convolution over q, k, v")
        if (mha.in_proj.bias is None) != (mha.out_proj.bias is None):
            problems.append("attn_cfg.qkv_proj_bias != out_proj_bias: Bamba has one attention_bias flag "
                            "for the q, k, v and output projections")
        if mha.softmax_scale is not None and mha.softmax_scale != mha.head_dim ** -0.5:
            problems.append(f"attn_cfg.softmax_scale={mha.softmax_scale}: Bamba scales attention logits by "
                            f"head_dim^-0.5 = {mha.head_dim ** -0.5}")
    return problems


def rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """partial_rotary_factor f with int(head_dim * f) == rotary_dim, transformers' rule: R / head_dim
    can round to just below, which int() would truncate to R - 1, so step up to the next float."""
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, math.inf)
    return factor


def bamba_config(model: MambaLMHeadModel) -> dict:
    """config.json of the equivalent BambaForCausalLM; raises ValueError naming each problem."""
    problems = bamba_problems(model)
    if problems:
        raise ValueError("the model is not a transformers Bamba model: " + "; ".join(problems))
    c, a = model.config, model_attn_cfg(model)
    mixer = ssm_mixer(model)
    return {
        "architectures": ["BambaForCausalLM"], "model_type": "bamba",
        "vocab_size": c.padded_vocab_size, "tie_word_embeddings": c.tie_embeddings,
        "hidden_size": c.d_model, "intermediate_size": model.backbone.layers[0].mlp.hidden,
        "num_hidden_layers": c.n_layer,
        "attn_layer_indices": [i for i, layer in enumerate(model.backbone.layers) if isinstance(layer.mixer, MHA)],
        "num_attention_heads": a["num_heads"], "num_key_value_heads": a["num_heads_kv"], "head_dim": a["head_dim"],
        "attention_bias": a["qkv_proj_bias"], "attention_dropout": 0.0, "mlp_bias": False,
        "rope_theta": a["rotary_emb_base"], "rope_scaling": None,
        "partial_rotary_factor": rotary_factor(a["rotary_emb_dim"], a["head_dim"]),
        "mamba_n_heads": c.expand * c.d_model // c.headdim, "mamba_d_head": c.headdim, "mamba_n_groups": c.ngroups,
        "mamba_d_state": c.d_state, "mamba_d_conv": c.d_conv, "mamba_expand": c.expand,
        "mamba_chunk_size": c.chunk_size,
        "mamba_conv_bias": mixer is None or mixer.conv1d.bias is not None,
        "mamba_proj_bias": mixer is not None and mixer.in_proj.bias is not None,
        "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "initializer_range": c.initializer_range,
        "max_position_embeddings": 262144,  # BambaConfig's default; RoPE here has no length limit
        "use_cache": True, "num_logits_to_keep": 1, "z_loss_coefficient": 0.0,
        "torch_dtype": str(model.backbone.embedding.weight.dtype).removeprefix("torch."),
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }


def _neox_order(mha: MHA) -> torch.Tensor:
    """Channel order within a head that turns interleaved RoPE pairs (2j, 2j+1) into rotate-half
    pairs (j, j + R/2); channels past R stay."""
    order, r = torch.arange(mha.head_dim), mha.rotary_emb_dim
    order[: r // 2], order[r // 2: r] = torch.arange(0, r, 2), torch.arange(1, r, 2)
    return order


def _attention_tensors(mha: MHA, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for kind in ("weight", "bias"):
        packed = getattr(mha.in_proj, kind)
        if packed is None:
            continue
        q, k, v = torch.split(packed, [mha.q_dim, mha.kv_dim, mha.kv_dim])
        if mha.rotary_emb_interleaved and mha.rotary_emb_dim > 0:
            order = _neox_order(mha)
            q = q.unflatten(0, (mha.num_heads, mha.head_dim))[:, order].flatten(0, 1)
            k = k.unflatten(0, (mha.num_heads_kv, mha.head_dim))[:, order].flatten(0, 1)
        out.update({f"{prefix}q_proj.{kind}": q, f"{prefix}k_proj.{kind}": k, f"{prefix}v_proj.{kind}": v})
        if getattr(mha.out_proj, kind) is not None:
            out[f"{prefix}o_proj.{kind}"] = getattr(mha.out_proj, kind)
    return out


def bamba_state_dict(model: MambaLMHeadModel) -> dict[str, torch.Tensor]:
    """Our weights under Bamba's names (module doc), contiguous CPU copies (safetensors refuses
    shared storage); a tied head is left out."""
    problems = bamba_problems(model)
    if problems:
        raise ValueError("the model is not a transformers Bamba model: " + "; ".join(problems))
    out = {"model.embed_tokens.weight": model.backbone.embedding.weight,
           "model.final_layernorm.weight": model.backbone.norm_f.weight}
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.backbone.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.norm.weight
        out[p + "pre_ff_layernorm.weight"] = layer.norm2.weight
        value, gate = layer.mlp.fc1.weight.chunk(2)
        out.update({p + "feed_forward.up_proj.weight": value, p + "feed_forward.gate_proj.weight": gate,
                    p + "feed_forward.down_proj.weight": layer.mlp.fc2.weight})
        if isinstance(layer.mixer, MHA):
            out.update(_attention_tensors(layer.mixer, p + "self_attn."))
        else:
            out.update({p + "mamba." + name: t for name, t in layer.mixer.state_dict().items()})
    return {key: t.detach().cpu().contiguous().clone() for key, t in out.items()}


# ----------------------------------------------------------------------------- reading Bamba
def bamba_arch(cfg: dict, path) -> dict:
    """MambaConfig arguments for a Bamba config.json (absent keys at BambaConfig's defaults)."""
    g = {**BAMBA_DEFAULTS, **cfg}
    where = str(path)
    for key, wanted in (("hidden_act", "silu"), ("mlp_bias", False), ("rope_scaling", None),
                        ("mamba_n_groups", 1), ("mamba_proj_bias", False), ("mamba_conv_bias", True)):
        check(g[key] == wanted, f"{where}: Bamba {key}={g[key]!r} is not supported; this model implements "
                                f"{key}={wanted!r} only" + (" (its gated norm is per group, Bamba's over all "
                                                            "channels)" if key == "mamba_n_groups" else ""))
    hidden, heads = g["hidden_size"], g["num_attention_heads"]
    check(float(g["mamba_expand"]).is_integer(), f"{where}: mamba_expand={g['mamba_expand']} must be an integer here")
    d_inner = int(g["mamba_expand"]) * hidden
    d_head = d_inner // g["mamba_n_heads"] if g["mamba_d_head"] == "auto" else g["mamba_d_head"]
    check(d_head * g["mamba_n_heads"] == d_inner,
          f"{where}: mamba_n_heads={g['mamba_n_heads']} * mamba_d_head={d_head} != mamba_expand * hidden_size = {d_inner}")
    check(g["intermediate_size"] % MLP_MULTIPLE == 0,
          f"{where}: intermediate_size={g['intermediate_size']} is not a multiple of {MLP_MULTIPLE}, the "
          f"MLP widths this model (mamba-ssm's GatedMLP) can have")
    head_dim = g["head_dim"] or hidden // heads
    idx = tuple(sorted(g["attn_layer_indices"] or ()))
    attn_cfg = {
        "num_heads": heads, "num_heads_kv": g["num_key_value_heads"] or heads, "head_dim": head_dim,
        "rotary_emb_dim": int(head_dim * g["partial_rotary_factor"]), "rotary_emb_base": float(g["rope_theta"]),
        "rotary_emb_interleaved": False, "qkv_proj_bias": g["attention_bias"], "out_proj_bias": g["attention_bias"],
        "d_conv": 0, "causal": True, "softmax_scale": None,
    }
    return dict(
        ssm_layer="mamba2", d_model=hidden, n_layer=g["num_hidden_layers"], vocab_size=g["vocab_size"],
        d_state=g["mamba_d_state"], d_conv=g["mamba_d_conv"], expand=int(g["mamba_expand"]), headdim=d_head,
        ngroups=1, chunk_size=g["mamba_chunk_size"], norm_eps=g["rms_norm_eps"], pad_vocab_size_multiple=1,
        tie_embeddings=g["tie_word_embeddings"], attn_layer_idx=idx, attn_cfg=attn_cfg if idx else {},
        d_intermediate=g["intermediate_size"],
    )


_RENAMES = {"input_layernorm.weight": "norm.weight", "pre_ff_layernorm.weight": "norm2.weight",
            "feed_forward.down_proj.weight": "mlp.fc2.weight", "self_attn.o_proj.weight": "mixer.out_proj.weight",
            "self_attn.o_proj.bias": "mixer.out_proj.bias"}
_PACKED = {"mlp.fc1.weight": ("feed_forward.up_proj.weight", "feed_forward.gate_proj.weight"),
           **{f"mixer.in_proj.{kind}": tuple(f"self_attn.{x}_proj.{kind}" for x in "qkv") for kind in ("weight", "bias")}}


def state_from_bamba(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Bamba state dict under our names: the inverse of bamba_state_dict (non-interleaved RoPE).
    Keys it does not know keep their names, for load_pretrained to report."""
    out, layers = {}, {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match:
            layers.setdefault(int(match[1]), {})[match[2]] = value
        else:
            out[{"model.embed_tokens.weight": "backbone.embedding.weight",
                 "model.final_layernorm.weight": "backbone.norm_f.weight"}.get(key, key)] = value
    for i, parts in layers.items():
        ours = f"backbone.layers.{i}."
        for name, sources in _PACKED.items():
            if all(s in parts for s in sources):
                out[ours + name] = torch.cat([parts.pop(s) for s in sources])
        for name, value in parts.items():
            if name.startswith("mamba."):
                out[ours + "mixer." + name.removeprefix("mamba.")] = value
            elif name in _RENAMES:
                out[ours + _RENAMES[name]] = value
            else:
                out[f"model.layers.{i}.{name}"] = value  # unknown: reported by load_pretrained
    return out

