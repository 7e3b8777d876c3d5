"""train(cfg): a validated config in, a trained and checkpointed model out. Reads top-down."""
from __future__ import annotations

import logging
import os

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.utils import dist, reproducibility
from composer.utils.parallelism import FSDP2Config, ParallelismConfig

from mamba.config.load import check_world_size
from mamba.config.schema import TrainConfig
from mamba.data.loader import build_train_dataloader
from mamba.model.composer_model import ComposerMambaLM
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.training.metrics_file import JSONLinesLogger
from mamba.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> Trainer:
    device = _resolve_device(cfg.trainer.device)
    dist.initialize_dist(device)  # before the sampler, which needs the world size and rank
    if device == "cpu":
        _limit_cpu_threads()
    per_rank_batch = check_world_size(cfg, dist.get_world_size())

    # Same seed on every rank: every rank builds identical initial weights before FSDP shards them.
    reproducibility.seed_all(cfg.seed)
    model = ComposerMambaLM(build_model(cfg))
    log.info("model: %s parameters", f"{model.model.num_parameters():,}")

    train_loader = build_train_dataloader(cfg.data, per_rank_batch, cfg.model.vocab_size, cfg.seed)
    optimizer = build_optimizer(model, cfg.optimizer)

    t = cfg.trainer
    trainer = Trainer(
        run_name=cfg.run_name,
        seed=cfg.seed,
        model=model,
        train_dataloader=train_loader,
        optimizers=optimizer,
        schedulers=build_scheduler(cfg.scheduler),
        step_schedulers_every_batch=True,
        max_duration=t.max_duration,
        device=device,
        precision=_resolve_precision(t.precision, device),
        device_train_microbatch_size=t.micro_batch_size,
        parallelism_config=_parallelism(cfg, world_size=dist.get_world_size()),
        algorithms=[GradientClipping("norm", cfg.optimizer.grad_clip_norm)] if cfg.optimizer.grad_clip_norm else [],
        callbacks=[SpeedMonitor(window_size=10), LRMonitor()],
        loggers=[JSONLinesLogger(cfg.metrics_file.format(run_name=cfg.run_name))] if cfg.metrics_file else [],
        progress_bar=t.progress_bar,
        log_to_console=not t.progress_bar,
        console_log_interval=t.log_interval,
        save_folder=t.save_folder.format(run_name=cfg.run_name),
        save_interval=t.save_interval,
        save_num_checkpoints_to_keep=t.save_num_checkpoints_to_keep,
        save_overwrite=False,
        autoresume=t.autoresume,
    )
    trainer.fit()
    return trainer


def build_model(cfg: TrainConfig) -> MambaLMHeadModel:
    m = cfg.model
    return MambaLMHeadModel(
        MambaConfig(
            d_model=m.d_model,
            n_layer=m.n_layer,
            vocab_size=m.vocab_size,
            d_state=m.d_state,
            d_conv=m.d_conv,
            expand=m.expand,
            pad_vocab_size_multiple=m.pad_vocab_size_multiple,
            tie_embeddings=m.tie_embeddings,
            document_isolation=m.document_isolation,
        )
    )


def _parallelism(cfg: TrainConfig, world_size: int) -> ParallelismConfig | None:
    """FSDP2 across all ranks; a single rank trains unwrapped (nothing to shard)."""
    if world_size == 1:
        return None
    return ParallelismConfig(
        fsdp2=FSDP2Config(
            activation_checkpointing=cfg.fsdp.activation_checkpointing,
            reshard_after_forward=cfg.fsdp.reshard_after_forward,
            state_dict_type=cfg.fsdp.state_dict_type,
        )
    )


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=gpu but CUDA is not available; use trainer.device=auto or cpu")
    return device


def _resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    if precision == "amp_bf16" and device == "cpu":
        raise ValueError("trainer.precision=amp_bf16 is not supported on CPU; use fp32 or auto")
    return precision


def _limit_cpu_threads() -> None:
    """Give each rank its share of the cores: ranks oversubscribing OpenMP threads run ~4x slower."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_ranks = dist.get_local_world_size()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
