"""How the model is spread over ranks: device, precision, FSDP units, sharding and checkpointing.

The config rules that need facts known only at training time (the world size, whether CUDA is
there) live here and raise mamba.config's ConfigError, like the loader's own rules:
`check_world_size`, `resolve_device`, `resolve_precision`, `build_parallelism`.

FSDP2 (torch's `fully_shard`, driven by Composer's `FSDP2Config`) is the default, on one rank too,
so every run writes sharded checkpoints that load on any number of ranks. Composer asks
the ComposerModel's child (the plain `MambaLMHeadModel`) two questions per submodule:
`fsdp_wrap_fn` (is it its own FSDP unit?) and `activation_checkpointing_fn` (is it recomputed in
backward?); `assign_units` answers them from the config.

The familiar FSDP1 sharding names map onto FSDP2 as in torch's FSDP2 design notes
(docs "torch.distributed.fsdp.fully_shard"):
  FULL_SHARD     1-D mesh over all ranks, reshard_after_forward=True (gather again in backward).
  SHARD_GRAD_OP  1-D mesh, reshard_after_forward=False (keep parameters gathered until backward).
  HYBRID_SHARD   2-D mesh (replicate, shard) = (world / shard_degree, shard_degree): parameters are
                 sharded inside a group (one node by default) and replicated across groups; gradients
                 are reduce-scattered in the group and all-reduced across groups.
  NO_SHARD       2-D mesh (world, 1): every rank holds everything, gradients all-reduced (DDP-like).

Gradient averaging on CPU: FSDP2 averages gradients with ReduceOp.AVG, which NCCL honours and gloo,
the CPU backend, honours only in newer torch (mamba.capabilities.gloo_averaging, tried at run time).
Where gloo's reduce-scatter silently SUMs (gradients world_size times too large, which would
silently change clipping and the update), `average_gloo_gradients` divides each reduce-scattered
gradient by the world size in FSDP2's post-reduce hook; where its all-reduce refuses AVG, gradients
cannot be averaged across replicas, so CPU runs keep to 1-D meshes (FULL_SHARD, SHARD_GRAD_OP).

Mixed precision (GPU, precision amp_bf16), fsdp.mixed_precision:
  DEFAULT  Composer's `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`
           (composer/distributed/fsdp2.py): the sharded parameters -- the optimizer's master
           weights -- stay fp32, each unit all-gathers them cast to bf16 for forward and backward,
           gradients are reduced in fp32. A_log, D and the dt bias are gathered in bf16 too (one
           policy per unit, and they share the block's unit); the mixer casts them to fp32 before
           the exp/softplus and the scan, and their fp32 masters receive fp32 gradients.
  FULL     no cast: units all-gather fp32, so A_log, D and dt bias are exact fp32 in the forward,
           as in mamba-ssm's own (autocast) training; twice the all-gather traffic.
Either way autocast (amp_bf16) runs the matmuls in bf16.
"""
from __future__ import annotations

from pathlib import Path

import torch
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig as ComposerFSDP1Config, ParallelismConfig
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from mamba.capabilities import gloo_averaging
from mamba.config.errors import ConfigError
from mamba.config.load import per_rank_batch
from mamba.config.schema import FSDPConfig, TrainConfig
from mamba.model.block import Block
from mamba.model.lm import MambaLMHeadModel


def check_world_size(cfg: TrainConfig, world_size: int) -> int:
    """Per-rank batch for `world_size` ranks; fails unless global = micro x accumulation x ranks
    and, under HYBRID_SHARD, the shard groups split the ranks evenly."""
    per_rank = per_rank_batch(cfg, world_size)
    if cfg.fsdp.sharding_strategy == "HYBRID_SHARD":
        shard_group_size(cfg.fsdp, world_size, dist.get_local_world_size())
    return per_rank


def shard_group_size(cfg: FSDPConfig, world_size: int, local_world_size: int) -> int:
    """HYBRID_SHARD's ranks per shard group: fsdp.shard_degree, -1 meaning one node's ranks.
    The groups must split the ranks evenly (the replicas are world_size / group size)."""
    shard = local_world_size if cfg.shard_degree == -1 else cfg.shard_degree
    if world_size % shard:
        named = f"-1 (the {shard} ranks of one node)" if cfg.shard_degree == -1 else f"{shard}"
        raise ConfigError(
            f"fsdp.shard_degree={named} must divide the {world_size} ranks (HYBRID_SHARD replicates "
            f"over world_size / shard_degree groups); pick a divisor, e.g. the GPUs per node"
        )
    return shard


def resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=gpu but CUDA is not available; use trainer.device=auto or cpu")
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    if precision == "amp_bf16" and device == "cpu":
        raise ConfigError("trainer.precision=amp_bf16 is not supported on CPU; use fp32 or auto")
    return precision


def assign_units(model: MambaLMHeadModel, cfg: FSDPConfig) -> None:
    """Each block its own FSDP unit; embedding and head their own unless tied.

    A tied embedding/head is one Parameter used by two modules; FSDP cannot shard it in two units
    (Composer refuses: fsdp2.py "Detected tied parameters"), so it stays in the root unit (the
    whole `MambaLMHeadModel`, with norm_f), gathered for the embedding lookup and again for the head.
    Activation checkpointing wraps blocks 0, k, 2k, ... (k = activation_checkpointing_every).
    """
    blocks = list(model.backbone.layers)
    assert all(isinstance(b, Block) for b in blocks)
    units: set[torch.nn.Module] = set(blocks)
    if not model.config.tie_embeddings:
        units |= {model.backbone.embedding, model.lm_head}
    checkpointed = set(blocks[:: cfg.activation_checkpointing_every]) if cfg.activation_checkpointing else set()
    model.fsdp_wrap_fn = lambda module: module in units
    model.activation_checkpointing_fn = lambda module: module in checkpointed


def checkpointed_blocks(model: MambaLMHeadModel) -> list[int]:
    """Indices of the blocks that `activation_checkpointing_fn` selects (for logs and tests)."""
    return [i for i, b in enumerate(model.backbone.layers) if model.activation_checkpointing_fn(b)]


def mesh_shape(cfg: FSDPConfig, world_size: int, local_world_size: int) -> tuple[int, int] | None:
    """(replicate, shard) for the strategies that need a 2-D mesh; None for a 1-D mesh over all ranks."""
    if cfg.sharding_strategy == "NO_SHARD":
        return (world_size, 1)
    if cfg.sharding_strategy == "HYBRID_SHARD":
        shard = shard_group_size(cfg, world_size, local_world_size)
        return (world_size // shard, shard)
    return None


def average_gloo_gradients(model: torch.nn.Module) -> None:
    """On a gloo backend that sums where asked to average, make FSDP2's reduce-scatter a mean
    (module doc); else nothing."""
    if not dist.is_initialized() or torch.distributed.get_backend() != "gloo" or gloo_averaging().reduce_scatter:
        return
    world_size = dist.get_world_size()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Runs on each unit's reduce-scatter output (its gradient shard, summed over ranks).
            module.set_all_reduce_hook(lambda grad_shard: grad_shard.div_(world_size))


def build_parallelism(cfg: FSDPConfig, device: str, world_size: int,
                      resume_from: Path | None = None) -> ParallelismConfig | None:
    """Composer's parallelism config for `world_size` ranks, resuming from checkpoint `resume_from`.

    FSDP2 runs on one rank too (a 1-rank mesh): every run then writes sharded DCP checkpoints, which
    torch.distributed.checkpoint reshards on load for another number of ranks (model and optimizer
    state are DTensors in them), so a run may resume on any number of ranks. A full one-file
    checkpoint (`ep*-ba*-rank0.pt`, single-process runs of older versions) loads only without FSDP
    (Composer's sharded load refuses files): one process resumes it unwrapped, as it was written,
    and that run goes on writing full files.
    FSDP1 (GPU only) keeps a single rank unwrapped.
    """
    if resume_from is not None and resume_from.is_file() and cfg.state_dict_type == "sharded":
        if world_size > 1:
            raise ConfigError(
                f"{resume_from} is a full one-file checkpoint (a single-process run of an older version wrote it); "
                f"{world_size} ranks load only sharded checkpoint directories. Resume it on one process "
                f"(`python mamba/train.py CONFIG ...`, not `composer -n {world_size}`), or set "
                f"trainer.start_over=true to move the run's checkpoints aside and train from batch 0")
        return None
    if world_size == 1 and cfg.version == 1:
        return None
    if cfg.version == 1:
        if device != "gpu":
            raise ConfigError("fsdp.version=1 (FSDP1) runs on GPUs only (Composer refuses it on CPU); "
                              "use fsdp.version=2 on CPU")
        return ParallelismConfig(fsdp=_fsdp1(cfg, world_size))
    shape = mesh_shape(cfg, world_size, dist.get_local_world_size())
    if shape is not None and shape[0] == 1:
        shape = None  # one replica: the 2-D mesh is the 1-D FULL_SHARD mesh
    if shape is not None and device == "cpu" and not gloo_averaging().all_reduce:
        raise ConfigError(f"fsdp.sharding_strategy={cfg.sharding_strategy} with {shape[0]} replicas needs GPUs "
                          "(NCCL) or a torch whose gloo backend averages (the current stack, README \"Stacks\"): "
                          "this torch's gloo cannot average gradients across replicas; "
                          "use FULL_SHARD or SHARD_GRAD_OP on CPU")
    mesh = None
    if shape is not None:
        mesh = init_device_mesh("cuda" if device == "gpu" else "cpu", shape,
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    return ParallelismConfig(
        fsdp2=FSDP2Config(
            device_mesh=mesh,
            reshard_after_forward=cfg.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD"),
            activation_checkpointing=cfg.activation_checkpointing,
            state_dict_type=cfg.state_dict_type,
            mixed_precision=cfg.mixed_precision,
        )
    )


def _fsdp1(cfg: FSDPConfig, world_size: int) -> ComposerFSDP1Config:
    """FSDP1 takes the strategy names directly; HYBRID's group size is its shard degree."""
    groups = {}
    if cfg.sharding_strategy == "HYBRID_SHARD":
        shard = shard_group_size(cfg, world_size, dist.get_local_world_size())
        groups = {"data_parallel_shard_degree": shard, "data_parallel_replicate_degree": world_size // shard}
    return ComposerFSDP1Config(
        sharding_strategy=cfg.sharding_strategy,
        activation_checkpointing=cfg.activation_checkpointing,
        activation_checkpointing_reentrant=False,
        mixed_precision=cfg.mixed_precision,
        state_dict_type=cfg.state_dict_type,
        use_orig_params=True,
        **groups,
    )
