"""AdamW with Mamba's weight-decay groups, and the learning-rate schedules."""
from __future__ import annotations

import torch
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)

from mamba.config.schema import OptimizerConfig, SchedulerConfig


def wants_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Decay matrices and embeddings only.

    Excluded, as in mamba-ssm's training setups: parameters flagged `_no_weight_decay` by the model
    (A_log, D, the dt bias: decaying them would pull the SSM towards A = -1, D = 0 and dt =
    softplus(0)), every bias, and every norm weight (1-D tensors).
    """
    # The name check backs up the flag, which is lost on any copy of the Parameter (e.g. sharding).
    ssm_parameter = name.endswith((".A_log", ".D", ".dt_bias"))
    return not (getattr(param, "_no_weight_decay", False) or ssm_parameter
                or name.endswith(".bias") or param.ndim < 2)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, decided by name before any FSDP wrapping (names change after it)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # tied weights are yielded once
        if param.requires_grad:
            (decay if wants_weight_decay(name, param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # torch's AdamW is decoupled (Loshchilov & Hutter 2019): wd is multiplied by lr, as in
    # mamba-ssm's and most LLM recipes' reported settings (lr 4.5e-4, wd 0.1).
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )


def build_scheduler(cfg: SchedulerConfig):
    if cfg.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=cfg.t_warmup, t_max=cfg.t_max, alpha_f=cfg.alpha_f)
    if cfg.name == "linear":
        return LinearWithWarmupScheduler(t_warmup=cfg.t_warmup, t_max=cfg.t_max, alpha_f=cfg.alpha_f)
    return ConstantWithWarmupScheduler(t_warmup=cfg.t_warmup, t_max=cfg.t_max)
