"""AdamW with Mamba's weight-decay groups."""
from __future__ import annotations

from typing import Sequence

import torch

from mamba.config.schema import OptimizerConfig


def wants_weight_decay(name: str, param: torch.nn.Parameter, no_decay: Sequence[str]) -> bool:
    """Decay unless a dotted part of `name` is listed in `no_decay` or the model flags the parameter.

    The default list (optimizer.no_decay) follows mamba-ssm's training setups: A_log, D and the dt
    bias (decaying them would pull the SSM towards A = -1, D = 0 and dt = softplus(0)), every bias
    and every norm weight stay undecayed; matrices and the embedding are decayed. Mamba-3's biases
    and norms have names of their own (B_bias, C_bias, B_norm, C_norm), listed with them, as are
    MIMO's mimo_x, mimo_z, mimo_o: per-channel scales of each rank's input, gate and output
    (initialised 1/R, 1, 1/R), which decay would pull towards switching the ranks off, as it
    would a norm weight. The model's own
    `_no_weight_decay` flag (set on A_log and D by the mixer) is honoured too, but names are the
    primary rule: the flag is lost on any copy of the Parameter (meta init, sharding).
    """
    parts = set(name.split("."))
    return not (getattr(param, "_no_weight_decay", False) or parts.intersection(no_decay))


def parameter_groups(model: torch.nn.Module, weight_decay: float, no_decay: Sequence[str]) -> list[dict]:
    """Two AdamW groups, decided by name before any FSDP wrapping (names change after it)."""
    decay, exempt = [], []
    for name, param in model.named_parameters():  # tied weights are yielded once
        if param.requires_grad:
            (decay if wants_weight_decay(name, param, no_decay) else exempt).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device: str) -> torch.optim.Optimizer:
    """torch's AdamW: decoupled decay (Loshchilov & Hutter 2019), so wd is multiplied by lr, as in
    mamba-ssm's and most LLM recipes' reported settings (lr 4.5e-4, wd 0.1). On GPU the fused
    kernel does the whole update in one launch per parameter group (also under FSDP2's DTensors).
    Gradient clipping is Composer's GradientClipping algorithm, set up by the trainer.
    """
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay, cfg.no_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device == "gpu",
    )
