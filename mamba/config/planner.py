"""From "N nodes of M GPUs and T tokens" to batch sizes, durations and a summary.

Every size below is read off the model itself, built on the meta device (shapes, no memory):
`measure_model` counts its parameters and its largest FSDP unit and reads the mixer's widths, so
the planner keeps no parameter formulas (and no dt_rank rule) of its own.

Memory model, bytes per GPU (P = parameters, S = ranks the parameters are sharded over, B = micro
batch in windows, L = seq_len, l = n_layer, d = d_model, E = d_inner, V = padded vocab,
W = the per-token width of the scan's inputs dt, B and C: Mamba-1's x_proj output R + 2N with
R = dt_rank and N = d_state; Mamba-2's in_proj outputs beyond x and z, H + 2GN):

    states       16 P / S     fp32 parameters (they are AdamW's master weights: Composer's
                              amp_bf16 autocasts, it does not keep a second copy) 4 P, fp32 grads
                              4 P, AdamW's two fp32 moments 8 P; all sharded by FSDP
                              (Rajbhandari et al. 2020, ZeRO, Sec. 3: "16 Psi" for mixed-precision Adam)
    gathered     8 P_unit     the largest FSDP unit (a block, or the embedding/head) unsharded
                              while it computes: its bf16 copy for this and the prefetched unit
                              (2 x 2 bytes) plus its unsharded fp32 grads before reduce-scatter (4);
                              the plan assumes fsdp.mixed_precision=DEFAULT (FULL gathers fp32: 12)
    activations  B L a        a = bytes kept per token for backward, below
    logits       6 B L V      bf16 logits plus the fp32 cross-entropy gradient (the loss is not
                              chunked over the vocabulary)
    reserve      2 GiB + 10%  CUDA context, NCCL buffers and allocator fragmentation; the plan
                              uses at most 90% of the GPU after the fixed 2 GiB

Activations kept per token per Mamba-1 block (bf16 = 2 bytes unless said), assuming the fused
mamba-ssm kernels, which recompute the (E, N) scan states in backward instead of storing them
(Gu & Dao 2023, Sec. 3.3.2):

    block_act = 4d (fp32 residual) + 2d (normed input) + 2*2E (in_proj: x, z) + 2E (conv out)
                + 2E (silu) + 2W (x_proj: dt, B, C) + 4E (dt, fp32) + 2E (scan out y) + 2E (gated)

Without activation checkpointing a = l * block_act. With it, each block keeps only its input
(4d + 2d) and one block at a time is recomputed: a = l * 6d + block_act. Mamba-2 blocks are
counted with the same terms (their (H, N) chunk states are likewise recomputed).

This module imports mamba.model (to build the model), so mamba/config/__init__.py does not import
it: mamba.model imports mamba.config.schema.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mamba.device_peaks import gpu_peak_flops
from mamba.model.factory import build_model

GIB = 1024**3

# name: memory in GB as sold (the vendors' data sheets: NVIDIA H100 SXM, H200 SXM, B200, A100,
# L40S, L4, A10; AMD MI250X, MI300X).
GPU_MEMORY_GB: dict[str, float] = {
    "H100-80GB": 80, "H200-141GB": 141, "B200-180GB": 180, "A100-40GB": 40, "A100-80GB": 80,
    "L40S-48GB": 48, "A10-24GB": 24, "L4-24GB": 24, "MI250X-128GB": 128, "MI300X-192GB": 192,
}
# name: (memory in GB, dense bf16 peak TFLOP/s from the one peak table, mamba/device_peaks.py).
GPUS: dict[str, tuple[float, float]] = {
    name: (gb, gpu_peak_flops(name, "amp_bf16") / 1e12) for name, gb in GPU_MEMORY_GB.items()
}


class PlanError(ValueError):
    """A request that cannot be trained as asked; the message says why and what to change."""


@dataclass(frozen=True)
class ModelSize:
    """What the memory model needs to know of a model (module docstring's letters)."""

    params: int          # P: all parameters, a tied head counted once
    largest_unit: int    # parameters of the largest FSDP unit: a block, or the embedding/head
    n_layer: int         # l
    d_model: int         # d
    d_inner: int         # E
    scan_inputs: int     # W: per-token width of dt, B and C
    padded_vocab: int    # V


def measure_model(model_cfg) -> ModelSize:
    """Build the model of `model_cfg` (the `model:` section) on the meta device and read its sizes."""
    model = build_model(model_cfg, device="meta")
    block = model.backbone.layers[0]
    mixer = block.mixer
    if model_cfg.ssm_layer == "mamba1":  # x_proj(x) = [dt (R), B (N), C (N)]
        scan_inputs = mixer.x_proj.out_features
    else:  # mamba2: in_proj(u) = [z (E), x (E), B (GN), C (GN), dt (H)]
        scan_inputs = mixer.in_proj.out_features - 2 * mixer.d_inner
    embedding = model.backbone.embedding.weight  # (V, d); an untied head has the same shape
    return ModelSize(
        params=model.num_parameters(),
        largest_unit=max(sum(p.numel() for p in block.parameters()), embedding.numel()),
        n_layer=len(model.backbone.layers), d_model=embedding.shape[1], d_inner=mixer.d_inner,
        scan_inputs=scan_inputs, padded_vocab=embedding.shape[0],
    )


def block_activation_bytes(size: ModelSize) -> int:
    """Bytes kept per token by one block for its backward (module docstring)."""
    d, e = size.d_model, size.d_inner
    return 4 * d + 2 * d + 2 * 2 * e + 2 * e + 2 * e + 2 * size.scan_inputs + 4 * e + 2 * e + 2 * e


def activation_bytes_per_token(size: ModelSize, checkpointing: bool) -> int:
    block = block_activation_bytes(size)
    if checkpointing:
        return size.n_layer * 6 * size.d_model + block
    return size.n_layer * block


def fixed_bytes(size: ModelSize, shard_ranks: int) -> int:
    """Everything but the activations and logits: sharded states + one gathered unit."""
    return 16 * size.params // shard_ranks + 8 * size.largest_unit


def memory_bytes(size: ModelSize, micro_batch: int, seq_len: int, shard_ranks: int, checkpointing: bool) -> int:
    tokens = micro_batch * seq_len
    return (fixed_bytes(size, shard_ranks) + tokens * activation_bytes_per_token(size, checkpointing)
            + 6 * tokens * size.padded_vocab)


def usable_bytes(gpu_gb: float) -> int:
    """The share of a GPU the plan may fill: 90% of what is left after 2 GiB (docstring)."""
    return int(0.9 * (gpu_gb * 1e9 - 2 * GIB))


@dataclass
class Plan:
    ranks: int
    global_batch: int          # windows per optimizer step
    micro_batch: int           # windows per forward/backward per rank
    grad_accum: int
    checkpointing: bool
    steps: int                 # optimizer steps = max_duration in batches
    warmup: int
    save_every: int
    tokens: int                # tokens actually trained (steps x global batch x seq_len)
    memory_per_gpu: int        # bytes, the memory model's estimate
    params: int
    flops_per_token: int
    hours: float | None        # estimated wall time at the assumed MFU (None: unknown peak)


def micro_batch_fitting(size: ModelSize, seq_len: int, per_rank: int, shard_ranks: int, budget: int,
                        checkpointing: bool) -> int:
    """Largest divisor of the per-rank batch whose memory estimate fits in `budget` (0: none)."""
    fits = [b for b in range(1, per_rank + 1)
            if per_rank % b == 0 and memory_bytes(size, b, seq_len, shard_ranks, checkpointing) <= budget]
    return max(fits, default=0)


def plan(size: ModelSize, *, ranks: int, seq_len: int, global_batch_tokens: int, tokens: int,
         gpu_gb: float | None, peak_tflops: float | None, mfu: float, flops_per_token: int,
         minutes_between_saves: float = 30.0) -> Plan:
    """Derive the batch layout and durations for the model `size` (measure_model); `gpu_gb=None`
    means CPU ranks (no memory limit)."""
    global_batch = max(1, round(global_batch_tokens / seq_len / ranks)) * ranks
    per_rank = global_batch // ranks
    p = size.params
    if gpu_gb is None:
        micro, checkpointing = per_rank, False
    else:
        budget = usable_bytes(gpu_gb)
        # Recomputation costs about a third more compute (one more forward); worth it only when
        # without it fewer than 4 windows (or not the whole per-rank batch) fit at once.
        micro = micro_batch_fitting(size, seq_len, per_rank, ranks, budget, checkpointing=False)
        checkpointing = micro < min(4, per_rank)
        if checkpointing:
            micro = micro_batch_fitting(size, seq_len, per_rank, ranks, budget, checkpointing=True)
        if micro == 0:
            need = memory_bytes(size, 1, seq_len, ranks, checkpointing=True)
            raise PlanError(
                f"does not fit: {p / 1e9:.2f}B parameters at seq_len={seq_len} need about {need / 1e9:.1f} GB "
                f"per GPU even with one window per micro batch and activation checkpointing "
                f"({fixed_bytes(size, ranks) / 1e9:.1f} GB of sharded weights, grads and AdamW states over "
                f"{ranks} GPUs), but a {gpu_gb:g} GB GPU leaves {budget / 1e9:.1f} GB usable; use more or larger "
                f"GPUs, a shorter --seq-len, or a smaller model")
    steps = max(1, math.ceil(tokens / (global_batch * seq_len)))
    hours = None
    if peak_tflops:
        hours = flops_per_token * steps * global_batch * seq_len / (ranks * peak_tflops * 1e12 * mfu) / 3600
    # Checkpoint about every `minutes_between_saves` of estimated wall time (at most what a
    # preemption loses), at least every 1000 steps when the speed is unknown (CPU).
    steps_per_save = steps * minutes_between_saves / 60 / hours if hours else 1000
    save_every = int(min(steps, max(1, round(steps_per_save))))
    return Plan(
        ranks=ranks, global_batch=global_batch, micro_batch=micro, grad_accum=per_rank // micro,
        checkpointing=checkpointing, steps=steps, warmup=min(2000, max(1, math.ceil(0.02 * steps))),
        save_every=save_every, tokens=steps * global_batch * seq_len,
        memory_per_gpu=memory_bytes(size, micro, seq_len, ranks, checkpointing),
        params=p, flops_per_token=flops_per_token, hours=hours,
    )


def summary(pl: Plan, model, seq_len: int, data_tokens: int | None, gpu: str, mfu: float) -> str:
    """The human-readable plan printed by create_mamba_config.py."""
    lines = [
        f"model        {model.ssm_layer} d_model={model.d_model} n_layer={model.n_layer} "
        f"vocab={model.vocab_size}: {pl.params:,} parameters ({pl.params / 1e6:.1f}M)",
        f"compute      {pl.flops_per_token / 1e9:.3g} GFLOPs per token (forward + backward)",
        f"batch        {pl.global_batch} windows x {seq_len} tokens = {pl.global_batch * seq_len:,} tokens per step; "
        f"{pl.ranks} ranks x micro batch {pl.micro_batch} x {pl.grad_accum} accumulation",
        f"memory       {pl.memory_per_gpu / 1e9:.1f} GB per {gpu} (estimate; activation checkpointing "
        f"{'on' if pl.checkpointing else 'off'})",
        f"duration     {pl.steps:,} steps = {pl.tokens / 1e9:.3f}B tokens ({pl.tokens / pl.params:.1f} per parameter); "
        f"warmup {pl.warmup} steps, checkpoint every {pl.save_every} steps",
    ]
    if pl.hours is not None:
        lines.append(f"wall time    ~{pl.hours:.1f} h at {mfu:.0%} MFU ({pl.hours * pl.ranks:,.0f} GPU-hours)")
    if data_tokens:
        lines.append(f"data         {data_tokens:,} tokens: {pl.tokens / data_tokens:.2f} epochs")
    return "\n".join(lines)
