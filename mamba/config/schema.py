"""The training config: one dataclass per YAML section, one docstring per field.

`config.yaml` at the repository root is the default cluster recipe written in this schema;
`mamba/config/load.py` turns YAML plus `key=value` overrides into a validated `TrainConfig`.
Durations are Composer time strings: "1000ba" (batches), "4e9tok" (tokens), "1ep", "1dur".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    """Architecture of the Mamba language model (mamba-ssm's names and defaults)."""

    d_model: int = 2688
    """Width of the residual stream."""
    n_layer: int = 28
    """Number of Mamba blocks."""
    vocab_size: int = 65024
    """Tokenizer vocabulary size; must cover every token id in the data (checked before training)."""
    ssm_layer: str = "mamba1"
    """Mixer type. Only "mamba1" is implemented so far."""
    d_state: int = 16
    """SSM state size N per channel."""
    d_conv: int = 4
    """Width of the causal depthwise convolution."""
    expand: int = 2
    """d_inner = expand * d_model."""
    pad_vocab_size_multiple: int = 8
    """Embedding and head rows are padded up to a multiple of this (tensor-core friendly)."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the LM head."""
    document_isolation: bool = True
    """Reset conv and SSM state at document starts inside a packed window."""


@dataclass
class DataConfig:
    """Where the packed tokens come from and how windows are cut."""

    train: str = "./data/packed"
    """Directory written by tools/pack.py (holds index.json and shard_*.npy)."""
    seq_len: int = 4096
    """Tokens per training window (the model sees seq_len inputs and seq_len targets)."""
    shuffle: bool = True
    """Shuffle windows each epoch (seeded, identical on every rank)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""


@dataclass
class OptimizerConfig:
    """AdamW with decoupled weight decay."""

    lr: float = 4.5e-4
    """Peak learning rate."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """Adam (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices and embeddings only (not A_log, D, biases, norms)."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule (stepped every batch)."""

    name: str = "cosine"
    """One of: cosine, linear, constant (each with linear warmup)."""
    t_warmup: str = "2000ba"
    """Warmup length."""
    alpha_f: float = 0.1
    """Final learning rate as a fraction of the peak (cosine, linear)."""
    t_max: str = "1dur"
    """Length of the schedule; "1dur" means the whole max_duration. Set it explicitly to stop
    a run early and continue it later on the same schedule."""


@dataclass
class FSDPConfig:
    """Fully Sharded Data Parallel (FSDP2, one unit per Mamba block)."""

    activation_checkpointing: bool = True
    """Recompute each block's activations in backward instead of storing them."""
    reshard_after_forward: bool = True
    """True is FULL_SHARD (parameters freed after forward); False is SHARD_GRAD_OP."""
    state_dict_type: str = "sharded"
    """Checkpoint format: "sharded" (each rank writes its shard) or "full" (rank 0 writes one file)."""


@dataclass
class TrainerConfig:
    """Batch sizes, duration, precision and checkpointing."""

    global_batch_size: int = 896
    """Windows per optimizer step, summed over all ranks."""
    micro_batch_size: int = 7
    """Windows per forward/backward on one device; gradient accumulation covers the rest."""
    max_duration: str = "100000ba"
    """Training length."""
    precision: str = "auto"
    """"auto" (amp_bf16 on GPU, fp32 on CPU), "fp32", or "amp_bf16"."""
    device: str = "auto"
    """"auto" (gpu when CUDA is available), "gpu" or "cpu"."""
    save_folder: str = "./runs/{run_name}/checkpoints"
    """Checkpoint directory; {run_name} is substituted."""
    save_interval: str = "1000ba"
    """Checkpoint every this often (and at the end)."""
    save_num_checkpoints_to_keep: int = 3
    """Older checkpoints are deleted; -1 keeps all."""
    autoresume: bool = True
    """Resume from the newest checkpoint in save_folder when one exists (needs a fixed run_name)."""
    log_interval: str = "10ba"
    """How often metrics are printed to the console."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class TrainConfig:
    """A whole training run."""

    run_name: str = "mamba-1.6b"
    """Names the run; checkpoints and logs go under runs/<run_name>/ by default."""
    seed: int = 17
    """Seeds model initialisation, data order and every RNG Composer controls."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics_file: Optional[str] = "./runs/{run_name}/metrics.jsonl"
    """Rank 0 appends one JSON line of metrics per logged batch here; null disables it."""
