"""Named model shapes and the recipe defaults create_mamba_config.py starts from.

The paper sizes are Gu & Dao 2023 (Mamba), Table 12 / the state-spaces/mamba checkpoints:
d_model x n_layer with GPT-NeoX's 50,280-token vocabulary. "1.6b" is this project's default
recipe: its entries are read from the schema defaults (mamba/config/schema.py, of which
config.yaml is the commented copy), so its numbers live in one place. "tiny" is for CPUs: it
trains in minutes on two cores.
"""
from __future__ import annotations

from mamba.config.schema import TrainConfig

_DEFAULT = TrainConfig()  # the default recipe, the "1.6b" entries below

MODEL_PRESETS: dict[str, dict] = {
    "tiny": {"d_model": 128, "n_layer": 4, "vocab_size": None},  # vocab taken from the data
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
    "370m": {"d_model": 1024, "n_layer": 48, "vocab_size": 50280},
    "790m": {"d_model": 1536, "n_layer": 48, "vocab_size": 50280},
    "1.4b": {"d_model": 2048, "n_layer": 48, "vocab_size": 50280},
    "2.8b": {"d_model": 2560, "n_layer": 64, "vocab_size": 50280},
    "1.6b": {"d_model": _DEFAULT.model.d_model, "n_layer": _DEFAULT.model.n_layer,
             "vocab_size": _DEFAULT.model.vocab_size},
    # state-spaces/mamba2attn-2.7b's config.json (Dao & Gu 2024, Sec. 9.2.3): Mamba-2 with 6 of its
    # 64 layers attention, GPT-NeoX's 50,277 tokens padded to a multiple of 16.
    "mamba2attn-2.7b": {
        "d_model": 2560, "n_layer": 64, "vocab_size": 50277, "ssm_layer": "mamba2", "d_state": 128, "headdim": 64,
        "pad_vocab_size_multiple": 16,
        "attn_layer_idx": [9, 18, 27, 36, 45, 56], "d_intermediate": 0,
        "attn_cfg": {"num_heads": 30, "head_dim": 128, "rotary_emb_dim": 64, "d_conv": 4, "causal": True,
                     "qkv_proj_bias": False, "out_proj_bias": False},
    },
    # Mamba-3 (SISO) in the 1.4b shape above: the paper's own 1.5B configuration (Lahoti et al.
    # 2026, arXiv 2603.15569) was not available to check here, so this is Mamba-1 1.4b's
    # d_model x n_layer (a Mamba-3 mixer has ~6 d_model^2 parameters, as mamba-ssm's README says,
    # about a Mamba-1 mixer's) with mamba-ssm 2.3.2's Mamba3 defaults: d_state 128, headdim 64,
    # chunk_size 64, rope_fraction 0.5, no output norm (mamba_ssm/modules/mamba3.py).
    "mamba3-1.4b": {"d_model": 2048, "n_layer": 48, "vocab_size": 50280, "ssm_layer": "mamba3", "d_state": 128,
                    "headdim": 64, "chunk_size": 64},
    # Mamba-3 MIMO (the paper's "Multi-Input, Multi-Output" form) in the same shape: rank 4, the rank
    # mamba-ssm 2.3.2's MIMO kernel is tuned for, and its recommended chunk of 64 / R = 16 tokens
    # (mamba_ssm/ops/tilelang/mamba3/mamba3_mimo.py). The rank adds 2 (R - 1) N d in_proj weights per
    # layer (a B and a C per rank; 6% more parameters) and, at Q = 64 / R, multiplies the scan's FLOPs by R.
    "mamba3-mimo-1.4b": {"d_model": 2048, "n_layer": 48, "vocab_size": 50280, "ssm_layer": "mamba3", "d_state": 128,
                         "headdim": 64, "chunk_size": 16, "is_mimo": True, "mimo_rank": 4},
}

# One attention layer in ATTN_EVERY when create_mamba_config.py is asked for a hybrid without a
# ratio (--attn-every with no value): Jamba's 1:7 attention-to-Mamba ratio (Lieber et al. 2024,
# Sec. 2), near mamba2attn's 6 in 64; Dao & Gu 2024 (Sec. 9.2.3) found ~10% attention layers best.
ATTN_EVERY = 8


def attention_layers(n_layer: int, every: int) -> list[int]:
    """One attention layer in every `every`, in the middle of each group as Jamba places them
    (attn_layer_offset = every // 2, period every): [every // 2, every // 2 + every, ...]."""
    if not 1 <= every <= n_layer:
        raise ValueError(f"--attn-every {every}: give 1..n_layer ({n_layer})")
    return list(range(every // 2, n_layer, every))


def attention_shape(d_model: int) -> dict:
    """attn_cfg for a hybrid of width d_model, after mamba2attn's: heads of 128 channels (64 below
    d_model 2048), as many as fill d_model, RoPE on half of each head, a 4-tap conv over q, k, v,
    no biases. GQA: override model.attn_cfg.num_heads_kv."""
    head_dim = 128 if d_model >= 2048 else 64
    if d_model % head_dim:
        head_dim = next(h for h in (64, 32, 16, 8, 4, 2, 1) if d_model % h == 0)
    return {"num_heads": d_model // head_dim, "head_dim": head_dim, "rotary_emb_dim": head_dim // 2, "d_conv": 4,
            "causal": True, "qkv_proj_bias": False, "out_proj_bias": False}

# Tokens per optimizer step when --global-batch-tokens is not given. The paper sizes follow the
# GPT-3 recipes the Mamba paper trained with (Brown et al. 2020, Table 2.1: 0.5M tokens up to
# 760M parameters, 1M for 1.3B and 2.7B); 1.6b is the default recipe's (896 x 4096); tiny is 8 x 256.
BATCH_TOKENS: dict[str, int] = {
    "tiny": 8 * 256, "130m": 2**19, "370m": 2**19, "790m": 2**19, "1.4b": 2**20, "2.8b": 2**20, "mamba3-1.4b": 2**20,
    "mamba3-mimo-1.4b": 2**20,
    "1.6b": _DEFAULT.trainer.global_batch_size * _DEFAULT.data.seq_len,
}
# Window length per preset (GPT-3 / Mamba paper: 2048; the default recipe: 4096; tiny: 256).
SEQ_LEN: dict[str, int] = {
    "tiny": 256, "130m": 2048, "370m": 2048, "790m": 2048, "1.4b": 2048, "2.8b": 2048, "mamba3-1.4b": 2048,
    "mamba3-mimo-1.4b": 2048,
    "1.6b": _DEFAULT.data.seq_len,
}
# Token budget when neither --tokens nor --tokens-per-param is given: 20 per parameter (Hoffmann
# et al. 2022, Chinchilla), except tiny, whose 300 steps of 2,048 tokens take minutes on a CPU.
TINY_TOKENS = 300 * 8 * 256
TOKENS_PER_PARAM = 20.0

# Everything but the model shape and the derived sizes for a tiny CPU run: a high learning rate
# so the loss visibly falls within a few hundred steps, no data-loader workers (2 cores).
TINY_RECIPE: dict = {
    "data": {"num_workers": 0},
    "optimizer": {"lr": 3.0e-3, "weight_decay": 0.1},
    "scheduler": {"alpha_f": 0.1},
    "logging": {"log_interval": "10ba"},
}
