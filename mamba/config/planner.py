"""From "N nodes of M GPUs (or CPU ranks) and T tokens" to batch sizes, durations and a summary.

The memory model (mamba/config/memory.py) sizes the micro batch: the largest divisor of the
per-rank batch whose estimate fits in the usable memory, with activation checkpointing only
where needed (`plan`); `describe` reads the plan a written config holds back from it, and
`summary` / `warnings` print it.

This module imports mamba.model through memory.py, so mamba/config/__init__.py does not import
it: mamba.model imports mamba.config.schema.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mamba.config.load import duration_in_batches, per_rank_batch
# The memory model's names, used here and by create_mamba_config.py and the tests as planner.*
from mamba.config.memory import (GIB, MemoryModel, ModelSize, activation_bytes_per_token,  # noqa: F401
                                 block_activation_bytes, fixed_bytes, kernel_path, measure_model,
                                 memory_bytes, memory_model, usable_bytes)
from mamba.device_peaks import gpu_peak_flops

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
    checkpointing_every: int = 1  # fsdp.activation_checkpointing_every (the planner's own plans: 1)


def micro_batch_fitting(size: ModelSize, mem: MemoryModel, seq_len: int, per_rank: int, shard_ranks: int,
                        budget: int, checkpointing: bool, every: int = 1) -> int:
    """Largest divisor of the per-rank batch whose memory estimate fits in `budget` (0: none)."""
    fits = [b for b in range(1, per_rank + 1) if per_rank % b == 0
            and memory_bytes(size, mem, b, seq_len, shard_ranks, checkpointing, every) <= budget]
    return max(fits, default=0)


def wall_hours(flops_per_token: int, tokens: int, ranks: int, peak_tflops: float | None, mfu: float) -> float | None:
    return flops_per_token * tokens / (ranks * peak_tflops * 1e12 * mfu) / 3600 if peak_tflops else None


def plan(size: ModelSize, mem: MemoryModel, *, ranks: int, seq_len: int, global_batch_tokens: int, tokens: int,
         memory_gb: float, gpu: bool, peak_tflops: float | None, mfu: float, flops_per_token: int,
         minutes_between_saves: float = 30.0) -> Plan:
    """Derive the batch layout and durations for the model `size` (measure_model) on ranks of
    `memory_gb` each: GPUs, or CPU ranks (`gpu=False`) with their share of the host's memory."""
    global_batch = max(1, round(global_batch_tokens / seq_len / ranks)) * ranks
    per_rank = global_batch // ranks
    p = size.params
    budget = usable_bytes(memory_gb)
    micro = micro_batch_fitting(size, mem, seq_len, per_rank, ranks, budget, checkpointing=False)
    # Recomputation costs a third more compute on a GPU (one more forward), and 37% of the
    # throughput of 2 CPU ranks (benchmarks/train_cpu.py, README's table): on a GPU worth it only
    # when without it fewer than 4 windows (or not the whole per-rank batch) fit at once; on CPU
    # ranks only when none fits.
    checkpointing = micro < min(4, per_rank) if gpu else micro == 0
    if checkpointing:
        micro = micro_batch_fitting(size, mem, seq_len, per_rank, ranks, budget, checkpointing=True)
    if micro == 0:
        need = memory_bytes(size, mem, 1, seq_len, ranks, checkpointing=True)
        rank = "GPU" if gpu else "CPU rank"
        raise PlanError(
            f"does not fit: {p / 1e9:.2f}B parameters at seq_len={seq_len} need about {need / 1e9:.1f} GB "
            f"per {rank} even with one window per micro batch and activation checkpointing "
            f"({fixed_bytes(size, mem, ranks) / 1e9:.1f} GB of sharded weights, grads and AdamW states over "
            f"{ranks} ranks; activations on {mem.path}), but {memory_gb:g} GB leaves {budget / 1e9:.1f} GB "
            f"usable; use more or larger {'GPUs' if gpu else 'machines'}, a shorter --seq-len, or a smaller model")
    steps = max(1, math.ceil(tokens / (global_batch * seq_len)))
    hours = wall_hours(flops_per_token, steps * global_batch * seq_len, ranks, peak_tflops, mfu)
    # Checkpoint about every `minutes_between_saves` of estimated wall time (at most what a
    # preemption loses), at least every 1000 steps when the speed is unknown (CPU).
    steps_per_save = steps * minutes_between_saves / 60 / hours if hours else 1000
    save_every = int(min(steps, max(1, round(steps_per_save))))
    return Plan(
        ranks=ranks, global_batch=global_batch, micro_batch=micro, grad_accum=per_rank // micro,
        checkpointing=checkpointing, steps=steps, warmup=min(2000, max(1, math.ceil(0.02 * steps))),
        save_every=save_every, tokens=steps * global_batch * seq_len,
        memory_per_gpu=memory_bytes(size, mem, micro, seq_len, ranks, checkpointing),
        params=p, flops_per_token=flops_per_token, hours=hours,
    )


def describe(cfg, size: ModelSize, mem: MemoryModel, *, ranks: int, peak_tflops: float | None, mfu: float,
             flops_per_token: int) -> Plan:
    """The plan a validated config (overrides and all) actually holds, read back from it."""
    t, f = cfg.trainer, cfg.fsdp
    per_rank_batch(cfg, ranks)  # the rule training checks
    steps = duration_in_batches(t.max_duration, cfg)
    tokens = steps * t.global_batch_size * cfg.data.seq_len
    return Plan(
        ranks=ranks, global_batch=t.global_batch_size, micro_batch=t.micro_batch_size,
        grad_accum=t.global_batch_size // (t.micro_batch_size * ranks), checkpointing=f.activation_checkpointing,
        checkpointing_every=f.activation_checkpointing_every, steps=steps,
        warmup=duration_in_batches(cfg.scheduler.t_warmup, cfg), save_every=duration_in_batches(t.save_interval, cfg),
        tokens=tokens, params=size.params, flops_per_token=flops_per_token,
        memory_per_gpu=memory_bytes(size, mem, t.micro_batch_size, cfg.data.seq_len, ranks,
                                    f.activation_checkpointing, f.activation_checkpointing_every),
        hours=wall_hours(flops_per_token, tokens, ranks, peak_tflops, mfu),
    )


# More epochs than this over the training data is worth a warning: repeated tokens soon stop
# adding anything (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models": their
# value decays to almost nothing after ~16 repetitions), so such a budget is usually a mistake.
MAX_EPOCHS = 100


def gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def summary(pl: Plan, cfg, mem: MemoryModel, *, rank_label: str, budget: int, data_tokens: int | None,
            mfu: float) -> str:
    """The human-readable plan printed by create_mamba_config.py, `pl` read back from the written
    config (describe)."""
    m, seq_len = cfg.model, cfg.data.seq_len
    checkpointing = "off" if not pl.checkpointing else (
        "on" if pl.checkpointing_every == 1 else f"on every {pl.checkpointing_every} blocks")
    mimo = f" MIMO rank {m.mimo_rank}" if m.ssm_layer == "mamba3" and m.is_mimo else ""
    lines = [
        f"model        {m.ssm_layer}{mimo} d_model={m.d_model} n_layer={m.n_layer} "
        f"vocab={m.vocab_size}: {pl.params:,} parameters ({pl.params / 1e6:.1f}M)",
        *([f"hybrid       attention at layers {list(m.attn_layer_idx)} ({m.attn_cfg.num_heads} heads"
           f"{f', {m.attn_cfg.num_heads_kv} KV heads' if m.attn_cfg.num_heads_kv else ''}); "
           f"MLP width {m.d_intermediate or 'none'}"] if m.attn_layer_idx else []),
        f"compute      {pl.flops_per_token / 1e9:.3g} GFLOPs per token (forward + backward)",
        f"batch        {pl.global_batch} windows x {seq_len} tokens = {pl.global_batch * seq_len:,} tokens per step; "
        f"{pl.ranks} ranks x micro batch {pl.micro_batch} x {pl.grad_accum} accumulation",
        f"memory       {gb(pl.memory_per_gpu)} of {gb(budget)} usable per {rank_label}; activation "
        f"checkpointing {checkpointing}",
        f"activations  estimated for {mem.path}",
        f"device       {cfg.trainer.device}, precision {cfg.trainer.precision}",
        f"duration     {pl.steps:,} steps = {pl.tokens:,} tokens ({pl.tokens / pl.params:.1f} per parameter); "
        f"warmup {pl.warmup} steps, checkpoint every {pl.save_every} steps",
    ]
    if pl.hours is not None:
        lines.append(f"wall time    ~{pl.hours:.1f} h at {mfu:.0%} MFU ({pl.hours * pl.ranks:,.0f} GPU-hours)")
    if data_tokens:
        lines.append(f"data         {data_tokens:,} tokens: {pl.tokens / data_tokens:.2f} epochs")
    return "\n".join(lines)


def warnings(pl: Plan, cfg, size: ModelSize, mem: MemoryModel, *, rank_label: str, budget: int,
             data_tokens: int | None) -> list[str]:
    """What in the written plan is likely a mistake, with the numbers and the fix."""
    found = []
    if pl.memory_per_gpu > budget:
        per_rank = pl.global_batch // pl.ranks
        fits = micro_batch_fitting(size, mem, cfg.data.seq_len, per_rank, pl.ranks, budget,
                                   pl.checkpointing, pl.checkpointing_every)
        fix = (f"trainer.micro_batch_size={fits} fits" if fits else
               "nothing fits without activation checkpointing: fsdp.activation_checkpointing=true" if not pl.checkpointing
               else "no micro batch fits: a shorter seq_len, more ranks or a smaller model")
        found.append(f"the memory estimate, {gb(pl.memory_per_gpu)} per {rank_label}, exceeds the {gb(budget)} "
                     f"a plan may use (90% after 2 GiB) at micro batch {pl.micro_batch} with activation "
                     f"checkpointing {'on' if pl.checkpointing else 'off'}; {fix}")
    if data_tokens and pl.tokens > MAX_EPOCHS * data_tokens:
        found.append(f"{pl.tokens / data_tokens:,.0f} epochs: the token budget of {pl.tokens:,} tokens repeats the "
                     f"{data_tokens:,} tokens of --data more than {MAX_EPOCHS} times; give more data or a smaller "
                     f"--tokens")
    return found
