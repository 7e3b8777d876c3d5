"""The training config: one dataclass per YAML section, one docstring per field.

The defaults below ARE the default recipe, the 1.6b cluster run (mamba/config/presets.py derives
its "1.6b" entries from them); `config.yaml` at the repository root is its user-facing, commented
copy (tests/config/test_load.py checks the two are equal). `mamba/config/load.py` turns YAML (or
in-memory data) plus `key=value` overrides into a validated `TrainConfig`.
Durations are Composer time strings: "1000ba" (batches), "4e9tok" (tokens), "1ep", "1dur".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

# Allowed values of the keys that take one of a few names: the loader checks every Literal-typed
# field against its values (one generic rule), and the model, kernels, schedules and callbacks take
# their lists from here (typing.get_args) instead of keeping copies. A field typed
# Annotated[Literal[...], "text"] gives the loader's error that text in place of the bare list.
SsmLayer = Literal["mamba1", "mamba2", "mamba3"]
KernelMode = Literal["auto", "torch", "cuda"]
SchedulerName = Literal["cosine", "linear", "constant", "wsd"]
DecayShape = Literal["linear", "1-sqrt"]
FsdpVersion = Literal[1, 2]
ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"]
StateDictType = Literal["sharded", "full"]
FsdpMixedPrecision = Literal["DEFAULT", "FULL"]
Precision = Literal["auto", "fp32", "amp_bf16"]
Device = Literal["auto", "cpu", "gpu"]
NonFiniteAction = Literal["stop", "skip"]


@dataclass
class AttnConfig:
    """The attention layers of a hybrid model: mamba-ssm's `attn_cfg`, the arguments of its MHA."""

    num_heads: int = 0
    """Query heads; required (> 0) when model.attn_layer_idx names any layer."""
    num_heads_kv: Optional[int] = None
    """Key/value heads (grouped-query attention; 1 = multi-query); null: num_heads. Must divide num_heads."""
    head_dim: Optional[int] = None
    """Channels per head; null: d_model / num_heads."""
    rotary_emb_dim: int = 0
    """Leading channels of each query/key head rotated by RoPE (Su et al. 2021); even, <= head_dim;
    0: no positional encoding (the Mamba layers carry order). Positions restart at each document."""
    rotary_emb_base: float = 10000.0
    """RoPE base: channel pair i turns at rotary_emb_base^(-2i / rotary_emb_dim) radians per position."""
    rotary_emb_interleaved: bool = False
    """RoPE layout: false rotates the two halves of the rotary channels (GPT-NeoX), true adjacent pairs (GPT-J)."""
    qkv_proj_bias: bool = True
    """Bias on the q/k/v projection (mamba-ssm's default; its published hybrids use false)."""
    out_proj_bias: bool = True
    """Bias on the output projection (mamba-ssm's default; its published hybrids use false)."""
    d_conv: int = 0
    """Width of a causal depthwise convolution over q, k and v before attention; 0: none."""
    causal: bool = True
    """Causal attention. True for a language model (mamba-ssm's MHA defaults to false; its LM configs set true)."""
    softmax_scale: Optional[float] = None
    """Scale of the attention logits; null: 1 / sqrt(head_dim)."""


@dataclass
class ModelConfig:
    """Architecture of the Mamba language model (mamba-ssm's names and defaults)."""

    d_model: int = 2688
    """Width of the residual stream."""
    n_layer: int = 28
    """Number of Mamba blocks."""
    vocab_size: int = 65024
    """Tokenizer vocabulary size; must cover every token id in the data (checked before training)."""
    ssm_layer: SsmLayer = "mamba1"
    """Mixer type: "mamba1" (selective scan, Gu & Dao 2023), "mamba2" (SSD, Dao & Gu 2024) or "mamba3"
    (SISO, Lahoti et al. 2026; no conv, so d_conv is unused; headdim, ngroups and chunk_size apply
    as for mamba2, mamba-ssm's Mamba-3 defaults being d_state 128 and chunk_size 64)."""
    d_state: int = 16
    """SSM state size N per channel (mamba-ssm's Mamba-2 models use 128)."""
    d_conv: int = 4
    """Width of the causal depthwise convolution."""
    expand: int = 2
    """d_inner = expand * d_model."""
    headdim: int = 64
    """Mamba-2 only: channels per head; expand * d_model must be a multiple of it."""
    ngroups: int = 1
    """Mamba-2 only: groups of heads sharing B and C; must divide the number of heads."""
    chunk_size: int = 256
    """Mamba-2 only: chunk length of the SSD scan (speed/memory trade-off; same result)."""
    A_init_range: list = field(default_factory=lambda: [1.0, 16.0])
    """Mamba-2 only: [low, high], A ~ U(low, high) per head at init (A_log = log A), 0 < low <= high."""
    rope_fraction: float = 0.5
    """Mamba-3 only: fraction of the d_state channels of B and C rotated by the data-dependent
    rotary angles (the complex-valued state), 0.5 or 1.0 (mamba-ssm's choices)."""
    A_floor: float = 1e-4
    """Mamba-3 only: the data-dependent decay rate is clamped to A <= -A_floor (< 0), so a state
    always forgets a little."""
    is_outproj_norm: bool = False
    """Mamba-3 only: a per-head RMSNorm of the scan output before the silu(z) gate and out_proj
    (mamba-ssm's is_outproj_norm; adds norm.weight); false: the gate alone."""
    is_mimo: bool = False
    """Mamba-3 only: the multi-input, multi-output form: mimo_rank inputs and outputs per token
    through the same state (R times the scan FLOPs, same state size; adds mimo_x, mimo_z, mimo_o).
    mamba-ssm recommends chunk_size 64 / mimo_rank with it."""
    mimo_rank: int = 4
    """Mamba-3 with is_mimo only: the rank R (mamba-ssm's kernels are tested at 1, 2, 4 and 8)."""
    dt_min: float = 0.001
    """Smallest initial step size dt (log-uniform in [dt_min, dt_max])."""
    dt_max: float = 0.1
    """Largest initial step size dt."""
    kernels: KernelMode = "auto"
    """"auto": mamba-ssm's CUDA kernels on GPU when they import, else pure torch; "torch": always
    torch; "cuda": the kernels or a clear error."""
    pad_vocab_size_multiple: int = 8
    """Embedding and head rows are padded up to a multiple of this (tensor-core friendly)."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the LM head."""
    document_isolation: bool = True
    """Reset conv and SSM state at document starts inside a packed window."""
    attn_layer_idx: list = field(default_factory=list)
    """Hybrid models: indices (0-based) of the layers that are attention instead of ssm_layer,
    as mamba-ssm's attn_layer_idx (e.g. [9, 18, 27, 36, 45, 56] in state-spaces' mamba2attn-2.7b).
    Empty: a pure Mamba model."""
    attn_cfg: AttnConfig = field(default_factory=AttnConfig)
    """The attention layers' shape (used only when attn_layer_idx is not empty)."""
    d_intermediate: int = 0
    """Hidden width of a gated SiLU MLP after every mixer (mamba-ssm's GatedMLP, rounded up to a
    multiple of 128), each with its own norm; 0: no MLPs (the Mamba-1/2 LMs)."""
    init_from: Optional[str] = None
    """Start from pretrained weights: a mamba-ssm checkpoint directory (config.json +
    pytorch_model.bin, as state-spaces publishes) or a HF transformers Mamba/Mamba2 directory.
    The architecture keys above must match it (vocab padding may differ). null: random init."""


@dataclass
class DataConfig:
    """Where the packed tokens come from, how they are mixed and how windows are cut."""

    sources: list = field(default_factory=lambda: [{"path": "./data/packed", "weight": 1.0}])
    """Training data: a list of {path, weight}; path is a directory written by tools/pack.py,
    weight (> 0, default 1) its share of the training tokens relative to the other sources, exact
    over every schedule period (weights 3 and 1 give exactly 3 of every 4 windows to the first)."""
    eval_sources: list = field(default_factory=list)
    """Evaluation data, same form; read in order, mixed by weight, until one source runs out. Empty: no eval."""
    seq_len: int = 4096
    """Tokens per training window (the model sees seq_len inputs and seq_len targets)."""
    shuffle: bool = True
    """Shuffle each source's windows, with a new seeded order each time the source starts an epoch."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""
    fim_rate: float = 0.0
    """Fill-in-the-middle: probability that a document (fragment) in a training window is reordered
    prefix/suffix/middle with the tokenizer's FIM sentinels (Bavarian et al. 2022); 0 disables."""
    fim_spm_rate: float = 0.5
    """Of the FIM documents, the fraction in SPM order (suffix first) rather than PSM."""
    verify: bool = False
    """Re-hash every shard against index.json's sha256 before training (reads all the data once)."""


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
    no_decay: list = field(default_factory=lambda: ["A_log", "D", "dt_bias", "bias", "norm", "norm2", "norm_f",
                                                    "B_bias", "C_bias", "B_norm", "C_norm", "mimo_x", "mimo_z",
                                                    "mimo_o"])
    """Parameter-name parts exempt from weight decay (mamba-ssm's groups): a parameter is exempt when
    a dotted part of its name equals one of these (e.g. "norm" matches layers.0.norm.weight)."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule (stepped every batch); see mamba/training/schedules.py."""

    name: SchedulerName = "cosine"
    """One of: cosine, linear, constant, wsd (warmup-stable-decay); each starts with linear warmup."""
    t_warmup: str = "2000ba"
    """Warmup length; the same unit as t_max (batches, tokens or samples), or a fraction "Xdur"."""
    alpha_f: float = 0.1
    """Final learning rate as a fraction of the peak, reached exactly at t_max (cosine, linear, wsd)."""
    t_max: str = "1dur"
    """Length of the schedule; "1dur" means the whole max_duration. Set it explicitly to stop
    a run early and continue it later on the same schedule."""
    decay_shape: DecayShape = "1-sqrt"
    """wsd only: "linear" or "1-sqrt" decay from the peak to alpha_f."""
    decay_fraction: float = 0.2
    """wsd only: decay length as a fraction of t_max (used when t_decay is null)."""
    t_decay: Optional[str] = None
    """wsd only: decay length as a duration in t_max's unit (e.g. "2000ba"); overrides decay_fraction."""


@dataclass
class FSDPConfig:
    """Fully Sharded Data Parallel: one unit per Mamba block; see mamba/training/parallel.py."""

    version: Annotated[FsdpVersion, "2 (FSDP2, default) or 1 (FSDP1, GPU only)"] = 2
    """2: FSDP2 (per-parameter DTensor sharding, the default); 1: FSDP1 (GPU only)."""
    sharding_strategy: ShardingStrategy = "FULL_SHARD"
    """FULL_SHARD, SHARD_GRAD_OP (keep gathered parameters from forward to backward), HYBRID_SHARD
    (shard within groups of shard_degree ranks, replicate across groups) or NO_SHARD (replicate)."""
    shard_degree: int = -1
    """HYBRID_SHARD: ranks per shard group; -1 means the ranks of one node (LOCAL_WORLD_SIZE)."""
    activation_checkpointing: bool = True
    """Recompute block activations in backward instead of storing them."""
    activation_checkpointing_every: int = 1
    """Checkpoint every k-th block (blocks 0, k, 2k, ...); 1 checkpoints all of them."""
    state_dict_type: StateDictType = "sharded"
    """Checkpoint format: "sharded" (each rank writes its shard) or "full" (rank 0 writes one file)."""
    mixed_precision: Annotated[FsdpMixedPrecision,
                               "DEFAULT (bf16 all-gathers) or FULL (fp32 all-gathers)"] = "DEFAULT"
    """Under amp_bf16: "DEFAULT" all-gathers parameters in bf16 (half the traffic; A_log, D and dt
    bias reach the mixer bf16-rounded), "FULL" in fp32 (every parameter exact, as in mamba-ssm's own
    autocast training; matmuls still bf16; twice the all-gather traffic and gathered memory)."""


@dataclass
class TrainerConfig:
    """Batch sizes, duration, precision and checkpointing."""

    global_batch_size: int = 896
    """Windows per optimizer step, summed over all ranks."""
    micro_batch_size: int = 7
    """Windows per forward/backward on one device; gradient accumulation covers the rest."""
    max_duration: str = "100000ba"
    """Training length."""
    precision: Precision = "auto"
    """"auto" (amp_bf16 on GPU, fp32 on CPU), "fp32", or "amp_bf16"."""
    device: Device = "auto"
    """"auto" (gpu when CUDA is available), "gpu" or "cpu"."""
    eval_interval: str = "1000ba"
    """Evaluate on data.eval_sources this often (and at the end); ignored when there are none."""
    eval_subset_num_batches: int = 100
    """Batches per evaluation (per rank), from the start of the eval pass each time; -1: the whole pass."""
    save_folder: str = "./runs/{run_name}/checkpoints"
    """Checkpoint directory; {run_name} is substituted."""
    save_interval: str = "1000ba"
    """Checkpoint every this often (and at the end)."""
    save_num_checkpoints_to_keep: int = 3
    """Complete checkpoints kept (older ones are deleted after each save); -1 keeps all; 0 keeps
    the newest one (the last intact checkpoint is never deleted)."""
    autoresume: bool = True
    """Resume from the newest intact checkpoint in save_folder (torn ones are moved to torn/ with a
    warning; none intact: refuse). Needs a fixed run_name."""
    start_over: bool = False
    """Move save_folder's checkpoints into save_folder/previous-<time>/ and train from batch 0. Give it
    on the command line of one launch only (a requeued job repeating it would start over again).
    Without it a launch over existing checkpoints resumes (autoresume) or refuses."""
    export_hf: bool = False
    """At the end of training rank 0 writes the final model as a transformers directory to <save_folder>/hf."""
    on_nonfinite_loss: NonFiniteAction = "stop"
    """A NaN/Inf loss or gradient norm: "stop" (raise before the optimizer update; the last
    checkpoint stays intact) or "skip" (drop that step's update and count it as train/skipped_steps)."""


@dataclass
class LoggingConfig:
    """Where metrics go (console, JSON lines, TensorBoard, W&B) and what MFU is measured against."""

    log_interval: str = "10ba"
    """How often rank 0 prints a progress line (loss, lr, tokens/s, time left) where there is no bar."""
    progress_bar: bool = True
    """A live progress bar on rank 0 when stderr is a terminal; elsewhere (a log file) plain lines."""
    metrics_file: Optional[str] = "./runs/{run_name}/metrics.jsonl"
    """Rank 0 appends one JSON line of metrics per batch here ({run_name} substituted); null disables it."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard event directory ({run_name} substituted); needs `pip install tensorboard`. null: off."""
    wandb_project: Optional[str] = None
    """Weights & Biases project to log to; needs `pip install wandb` and a login. null: off."""
    peak_flops_per_device: Optional[float] = None
    """Peak FLOP/s of one device, the MFU denominator; null: looked up from the device name
    (mamba/device_peaks.py), or on CPU measured with a float32 matmul at start-up."""


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
