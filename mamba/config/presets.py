"""Named model shapes and the recipes create_mamba_config.py starts from.

The paper sizes are Gu & Dao 2023 (Mamba), Table 12 / the state-spaces/mamba checkpoints:
d_model x n_layer with GPT-NeoX's 50,280-token vocabulary. "1.6b" is this project's default
recipe (config.yaml). "tiny" is for CPUs: it trains in minutes on two cores.
"""
from __future__ import annotations

MODEL_PRESETS: dict[str, dict] = {
    "tiny": {"d_model": 128, "n_layer": 4, "vocab_size": None},  # vocab taken from the data
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280},
    "370m": {"d_model": 1024, "n_layer": 48, "vocab_size": 50280},
    "790m": {"d_model": 1536, "n_layer": 48, "vocab_size": 50280},
    "1.4b": {"d_model": 2048, "n_layer": 48, "vocab_size": 50280},
    "2.8b": {"d_model": 2560, "n_layer": 64, "vocab_size": 50280},
    "1.6b": {"d_model": 2688, "n_layer": 28, "vocab_size": 65024},
}

# Everything but the model shape for a tiny CPU run: 2 ranks x 4 windows of 256 tokens per step,
# short warmup and a high learning rate so the loss visibly falls within a few hundred steps.
TINY_RECIPE: dict = {
    "data": {"seq_len": 256, "num_workers": 0},
    "optimizer": {"lr": 3.0e-3, "weight_decay": 0.1},
    "scheduler": {"name": "cosine", "t_warmup": "20ba", "alpha_f": 0.1},
    "trainer": {
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "max_duration": "300ba",
        "precision": "fp32",
        "device": "cpu",
        "save_interval": "100ba",
        "log_interval": "10ba",
    },
}
