"""train(cfg): a validated config in, a trained and checkpointed model out. Reads top-down."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from composer import Evaluator, Trainer
from composer.utils import dist, reproducibility
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mamba.config.schema import FSDPConfig, TrainConfig
from mamba.data.loader import batch_shape, build_eval_dataloader, build_train_dataloader
from mamba.model.composer_model import ComposerMambaLM
from mamba.model.factory import build_model
from mamba.runs.export import export_final_weights
from mamba.runs.run_config import write_run_config
from mamba.training.callbacks import build_callbacks, build_loggers
from mamba.training.console_lines import use_progress_bar
from mamba.training.optim import build_optimizer
from mamba.training.parallel import (assign_units, average_gloo_gradients, build_parallelism, check_world_size,
                                     resolve_device, resolve_precision)
from mamba.training.rank_process import share_rank_errors
from mamba.training.resume import ManifestCheckpointSaver, check_model_shapes, prepare_save_folder
from mamba.training.run_lock import lock_save_folder
from mamba.training.schedules import build_scheduler
from mamba.training.signals import sigterm_received

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> Trainer:
    device = resolve_device(cfg.trainer.device)
    dist.initialize_dist(device)  # before the sampler, which needs the world size and rank
    if device == "cpu":
        _limit_cpu_threads()
    precision = resolve_precision(cfg.trainer.precision, device)
    world_size = dist.get_world_size()
    per_rank_batch = check_world_size(cfg, world_size)
    save_folder = cfg.trainer.save_folder.format(run_name=cfg.run_name)
    # Before anything is written there: one live run per save folder (run_lock.py).
    lock = lock_save_folder(save_folder, cfg.run_name)
    share_rank_errors(Path(save_folder))  # every node sees the save folder: errors relay across nodes
    # Never a silent start from batch 0 over the run's checkpoints: resume from the newest intact
    # one (torn ones moved aside, loudly), refuse, or start over only if trainer.start_over says so.
    resume_from = prepare_save_folder(save_folder, cfg.trainer.autoresume, cfg.trainer.start_over)
    check_model_shapes(resume_from, cfg.model)  # before config.yaml below is replaced by this config
    if dist.get_global_rank() == 0:
        write_run_config(cfg, Path(save_folder))  # tools/export_hf.py rebuilds the model from it

    t = cfg.trainer
    # Rank 0 builds and initialises the model exactly as one process would (same seed, same weights);
    # under FSDP2 the other ranks build it on the meta device (see model_build_device).
    reproducibility.seed_all(cfg.seed)
    model = ComposerMambaLM(build_model(cfg.model, device=model_build_device(cfg.fsdp, world_size)),
                            batch_shape=batch_shape)
    assign_units(model.model, cfg.fsdp)
    log.info("model: %s parameters", f"{model.model.num_parameters():,}")

    train_loader = build_train_dataloader(cfg.data, per_rank_batch, cfg.model.vocab_size, cfg.seed)
    eval_loader = build_eval_dataloader(cfg.data, t.micro_batch_size, cfg.model.vocab_size)
    trainer = Trainer(
        run_name=cfg.run_name,
        seed=cfg.seed,
        model=model,
        train_dataloader=train_loader,
        # Eval loss and perplexity (Composer's metrics on ComposerMambaLM.eval_forward's logits).
        **({} if eval_loader is None else dict(eval_dataloader=Evaluator(label="eval", dataloader=eval_loader,
                                                                  device_eval_microbatch_size=t.micro_batch_size),
                                                eval_interval=t.eval_interval,
                                                eval_subset_num_batches=t.eval_subset_num_batches)),
        optimizers=build_optimizer(model, cfg.optimizer, device),
        schedulers=build_scheduler(cfg.scheduler),
        step_schedulers_every_batch=True,
        max_duration=t.max_duration,
        device=device,
        precision=precision,
        # Composer splits each rank's per_rank_batch into micro batches of this size and sums their
        # gradients before one optimizer step, each micro batch's mean loss scaled by its share of
        # the step's loss-bearing tokens (over all ranks): the step's loss is the exact mean over
        # its counted tokens however loss masks fall (mamba.data.loader.count_tokens).
        device_train_microbatch_size=t.micro_batch_size,
        accumulate_train_batch_on_tokens=True,
        # FSDP2 on every world size (one rank too): checkpoints reshard to another number of ranks.
        parallelism_config=build_parallelism(cfg.fsdp, device, world_size, resume_from),
        # gradient clipping, the grad-norm log and the NaN/Inf guard are one callback (callbacks.py)
        # The saver writes each checkpoint's manifest and does the keep-N rotation (resume.py).
        callbacks=[*build_callbacks(cfg, device, precision, save_folder),
                   ManifestCheckpointSaver(save_folder, t.save_interval, t.save_num_checkpoints_to_keep),
                   lock],  # released by trainer.close()
        loggers=build_loggers(cfg),
        # A live bar on a terminal; else build_loggers added one plain line per log interval
        # (console_lines.py): Composer's own console logger prints a line per metric.
        progress_bar=use_progress_bar(cfg.logging.progress_bar),
        log_to_console=False,
        save_folder=save_folder,
        autoresume=t.autoresume,
    )
    average_gloo_gradients(trainer.state.model.model)
    export_dir = Path(save_folder) / "hf"
    # A job requeued after its final checkpoint (preempted while exiting) resumes a finished run:
    # Composer's fit() would refuse it ("No training would occur"); there is nothing left but the
    # export, if the first job did not get to it (it appears whole, by rename, or not at all).
    finished = trainer.state.timestamp.get(trainer.state.max_duration.unit) >= trainer.state.max_duration
    if finished:
        log.info("run %s already reached max_duration %s (checkpoints in %s): nothing to train",
                 cfg.run_name, t.max_duration, save_folder)
    else:
        trainer.fit()
    if t.export_hf and not sigterm_received() and not (finished and export_dir.exists()):
        export_final_model(trainer, cfg, export_dir)  # after SIGTERM the job must exit, not export
    return trainer


def model_build_device(fsdp: FSDPConfig, world_size: int) -> str | None:
    """Where this rank builds the model: "meta" (shapes only, no memory) on ranks > 0 under FSDP2,
    else None (the default device, with mamba-ssm's init and any `init_from` weights).

    Composer sees rank 0 with real weights and the others on meta, turns on FSDP2's
    sync_module_states, shards, and broadcasts rank 0's weights into every rank's shards
    (composer/distributed/prepare_distributed.py). So no rank but 0 ever holds the full fp32 model
    (6.4 GB for 1.6B parameters, per rank, in host memory), and every rank starts from the weights
    a single process would have. FSDP1 (GPU only) keeps the full build on every rank: Composer's
    FSDP1 would need a per-module init function for meta modules.
    """
    if world_size > 1 and fsdp.version == 2 and dist.get_global_rank() > 0:
        return "meta"
    return None


def export_final_model(trainer: Trainer, cfg: TrainConfig, out_dir: Path) -> None:
    """Gather the full (unsharded) weights on every rank's CPU, then rank 0 writes the HF directory."""
    # A collective under FSDP2 (all ranks must call it); a plain state dict without FSDP.
    state = get_model_state_dict(trainer.state.model.model,
                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_global_rank() == 0:
        export_final_weights(cfg, state, out_dir)
    dist.barrier()


def _limit_cpu_threads() -> None:
    """Give each rank its share of the cores: ranks oversubscribing OpenMP threads run ~4x slower."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_ranks = dist.get_local_world_size()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
