"""The run's callbacks and loggers: what is measured each batch, and where it is written.

build_callbacks(cfg)  throughput + MFU, lr, peak memory, time remaining, gradient norm and
                      clipping with the NaN/Inf guard, SIGTERM checkpointing
build_loggers(cfg)    JSON lines file, TensorBoard, W&B (each only when configured)

Metric names (as they appear in metrics.jsonl / TensorBoard / W&B):
  loss/train/total                train loss (Composer, averaged over ranks)
  lr-AdamW/group0                 learning rate (LRMonitor)
  train/grad_norm                 global L2 norm of the gradient before clipping
  train/skipped_steps             steps dropped by on_nonfinite_loss=skip, since the run began
  throughput/device/tokens_per_sec, throughput/device/mfu   (SpeedMonitor, over a 5-batch window)
  memory/max_allocated_gib (GPU) or memory/peak_rss_gib (CPU)
  time/remaining_estimate         seconds to the end of max_duration (RuntimeEstimator)
  metrics/eval/LanguageCrossEntropy, metrics/eval/LanguagePerplexity   at each eval
"""
from __future__ import annotations

import importlib.util
import logging
import resource
from typing import get_args

import torch
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, RuntimeEstimator, SpeedMonitor
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.tensor import DTensor

from mamba.config.schema import NonFiniteAction, TrainConfig
from mamba.device_peaks import peak_flops_per_device
from mamba.training.console_lines import ConsoleLines, use_progress_bar
from mamba.training.metrics_file import JSONLinesLogger
from mamba.training.signals import SigtermCheckpoint

log = logging.getLogger(__name__)


class MemoryMonitor(Callback):
    """Logs this rank's peak memory after every batch, in GiB.

    GPU: torch.cuda.max_memory_allocated (tensors only, not the caching allocator's reserve).
    CPU: the process's peak resident set size (ru_maxrss, in KiB on Linux).
    """

    def batch_end(self, state: State, logger: Logger) -> None:
        if torch.cuda.is_available() and state.device.name == "gpu":
            logger.log_metrics({"memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30})
        else:
            logger.log_metrics({"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/Inf loss or gradient and trainer.on_nonfinite_loss is "stop"."""


class GradientGuard(Callback):
    """Global gradient norm, clipping, and the NaN/Inf guard, between backward and optimizer.step.

    Runs at AFTER_TRAIN_BATCH, when every microbatch's gradient has been accumulated (and, under
    FSDP2, reduce-scattered into this rank's shard) and the optimizer has not stepped yet. The norm
    is the whole model's: each gradient shard's norm is a DTensor whose full_tensor() all-reduces
    the partial sums of squares over the mesh, so every rank gets the same value. The loss flag is
    all-reduced too, so all ranks take the same decision (a rank raising alone would hang the rest).

    stop: raise NonFiniteLossError before optimizer.step; nothing is saved, so the newest checkpoint
          on disk is the last one written before the bad batch.
    skip: drop every gradient (grad = None: torch's AdamW then leaves parameters, moments and step
          counts untouched, unlike zero gradients, which still move Adam's moments and decay
          weights), count the step and go on; the lr schedule still advances.
    """

    def __init__(self, clip_norm: float, on_nonfinite: str, save_folder: str):
        if on_nonfinite not in get_args(NonFiniteAction):
            raise ValueError(f"trainer.on_nonfinite_loss={on_nonfinite!r}: choose one of {get_args(NonFiniteAction)}")
        self.clip_norm = clip_norm
        self.on_nonfinite = on_nonfinite
        self.save_folder = save_folder
        self.skipped_steps = 0
        self._loss_bad: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state["skipped_steps"]

    def init(self, state: State, logger: Logger) -> None:
        # Clipping here, after the norm is read, is what makes train/grad_norm the pre-clip norm;
        # Composer's GradientClipping would run first (algorithms precede callbacks) and clip twice.
        if any(isinstance(a, GradientClipping) for a in state.algorithms):
            raise ValueError("GradientGuard clips gradients itself (optimizer.grad_clip_norm); "
                             "remove Composer's GradientClipping algorithm from the Trainer")

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._loss_bad = state.device.tensor_to_device(torch.zeros((), dtype=torch.int32))

    def after_loss(self, state: State, logger: Logger) -> None:
        losses = state.loss.values() if isinstance(state.loss, dict) else [state.loss]
        for loss in losses:  # one microbatch's loss; kept on device (no sync per microbatch)
            self._loss_bad |= (~torch.isfinite(loss.detach())).any().int()

    def after_train_batch(self, state: State, logger: Logger) -> None:
        params = [p for p in state.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        bad = self._loss_bad | (~torch.isfinite(norm)).int()
        dist.all_reduce(bad, reduce_operation="MAX")
        norm_value = norm.item()
        logger.log_metrics({"train/grad_norm": norm_value})
        if bad.item():
            self._nonfinite(state, logger, params, norm_value)
        elif self.clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, norm)
        logger.log_metrics({"train/skipped_steps": self.skipped_steps})

    def _nonfinite(self, state: State, logger: Logger, params: list, norm: float) -> None:
        batch = int(state.timestamp.batch) + 1  # the batch being trained; timestamp counts finished ones
        what = f"non-finite loss or gradient (grad norm {norm}) in batch {batch}"
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"{what}: stopped before its optimizer step, so no weights were changed and no checkpoint "
                f"was written after batch {int(state.timestamp.batch)}; the newest checkpoint in "
                f"{self.save_folder} is intact. Lower optimizer.lr or raise the warmup, then relaunch "
                f"(autoresume starts from that checkpoint), or set trainer.on_nonfinite_loss=skip.")
        log.warning("%s: skipping its optimizer step (trainer.on_nonfinite_loss=skip)", what)
        for p in params:
            p.grad = None
        self.skipped_steps += 1


def build_callbacks(cfg: TrainConfig, device: str, precision: str, save_folder: str) -> list[Callback]:
    """Every callback of a run. `device`/`precision` are the resolved ones ("gpu"/"cpu",
    "amp_bf16"/"fp32"), save_folder the run's checkpoint folder ({run_name} substituted)."""
    peak = peak_flops_per_device(cfg.logging.peak_flops_per_device, device, precision)
    return [
        SpeedMonitor(window_size=5, gpu_flops_available=peak),
        LRMonitor(),
        MemoryMonitor(),
        RuntimeEstimator(time_unit="seconds"),
        GradientGuard(cfg.optimizer.grad_clip_norm, cfg.trainer.on_nonfinite_loss, save_folder),
        SigtermCheckpoint(),
    ]


def build_loggers(cfg: TrainConfig) -> list:
    """Progress lines where there is no live bar (console_lines.py), JSON lines (logging.metrics_file), TensorBoard (logging.tensorboard_dir), W&B (logging.wandb_project)."""
    lg, loggers = cfg.logging, []
    if not use_progress_bar(lg.progress_bar):  # a console that is a file, or no bar wanted
        loggers.append(ConsoleLines(lg.log_interval))
    if lg.metrics_file:
        loggers.append(JSONLinesLogger(lg.metrics_file.format(run_name=cfg.run_name)))
    if lg.tensorboard_dir:
        _require_package("tensorboard", "logging.tensorboard_dir")
        from composer.loggers import TensorboardLogger
        loggers.append(TensorboardLogger(log_dir=lg.tensorboard_dir.format(run_name=cfg.run_name),
                                         flush_interval=1))
    if lg.wandb_project:
        _require_package("wandb", "logging.wandb_project")
        from composer.loggers import WandBLogger
        loggers.append(WandBLogger(project=lg.wandb_project, name=cfg.run_name))
    return loggers


def _require_package(package: str, key: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise RuntimeError(f"{key} is set but the {package!r} package is not installed: "
                           f"`pip install {package}` (or `pip install -e .[monitor]`), or set {key}=null")

