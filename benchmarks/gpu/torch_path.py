"""The pure-PyTorch path on a GPU, eager and under torch.compile, against mamba-ssm's kernels:
the same training step as benchmarks/model_gpu.py (bf16 autocast over fp32 weights, fused
AdamW), the same shapes and packed-document rows, with `model.kernels` set per row.

    python benchmarks/gpu/torch_path.py [--shape 130m] [--layers mamba1 mamba2]
                                        [--modes eager compile kernels] [--micro-batch 8] [--seq 2048]
                                        [--steps 10] [--warmup 3] [--backend inductor] [--json FILE]
    python benchmarks/gpu/torch_path.py --smoke --backend aot_eager    # any device, CPU too

Rows (per mixer):
  eager     model.kernels=torch: the chunked selective scan / chunked SSD of mamba/model/ops
  compile   the same model wrapped in torch.compile (whole module, default mode); compile_s is the
            first step's time (tracing, Inductor and Triton compilation for forward and backward),
            left out of tokens/s like the other warm-up steps
  kernels   model.kernels=cuda: mamba-ssm's kernels; skipped, with the reason, where they do not
            import (the proof runs this script while they are still compiling, and compares with
            model_gpu.py's "ours, documents" row of the same micro batch instead)
Prints a table; asserts nothing; a row that raises (out of memory, a compile error) is printed
and written with its error, and the next row runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: model_gpu
import model_gpu  # noqa: E402  (it puts the repository root on sys.path)
from mamba.device_peaks import gpu_peak_flops  # noqa: E402
from mamba.model import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba.model.flops import flops_per_token  # noqa: E402
from mamba.model.ops.kernels import cuda_kernels_available, family_of  # noqa: E402


def build(shape: str, layer: str, mode: str) -> MambaLMHeadModel:
    d_model, n_layer = model_gpu.SHAPES[shape]
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=model_gpu.VOCAB,
                                        ssm_layer=layer, kernels="cuda" if mode == "kernels" else "torch",
                                        **model_gpu.MIXER[layer]))


def time_rows(model, step_fn, steps: int, warmup: int, device: torch.device) -> dict:
    """First step's seconds, then seconds per step over `steps` after `warmup` (the first step
    included), and the peak memory: model_gpu.time_training with the first step kept apart."""
    on_gpu = device.type == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step_fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        step_fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    return {"first_step_s": first, "seconds_per_step": seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="130m", choices=sorted(model_gpu.SHAPES))
    parser.add_argument("--layers", nargs="+", default=["mamba1", "mamba2"], choices=sorted(model_gpu.MIXER))
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "kernels"],
                        choices=["eager", "compile", "kernels"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--doc-len", type=int, default=1024)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--json", type=Path, help="append each row to this file as a JSON line")
    parser.add_argument("--smoke", action="store_true", help="shape 'smoke', seq 256, batch 2, 2 steps")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.seq, args.micro_batch, args.steps, args.warmup = "smoke", 256, 2, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = gpu_peak_flops(name, "amp_bf16") if on_gpu else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_gpu.VOCAB, (args.micro_batch, args.seq + 1), generator=generator).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    positions = model_gpu.packed_positions(args.micro_batch, args.seq, args.doc_len, generator).to(device)
    print(f"device: {name}; torch {torch.__version__}; {args.shape}, seq {args.seq}, micro batch {args.micro_batch}, "
          f"{args.steps} timed steps after {args.warmup}; packed documents (mean {args.doc_len} tokens)")
    print("| mixer | impl | tokens/s | MFU | peak GiB | first step s |")
    print("|---|---|---|---|---|---|")

    def emit(**row):
        row = {"shape": args.shape, "seq": args.seq, "micro_batch": args.micro_batch, "device": name, **row}
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    for layer in args.layers:
        for mode in args.modes:
            kernels_ok, why = cuda_kernels_available(family_of(layer))  # Mamba-3: mamba-ssm >= 2.3.2
            if mode == "kernels" and not (kernels_ok and on_gpu):
                reason = why or "no GPU"
                print(f"| {layer} | kernels | skipped: {reason} | | | |", flush=True)
                emit(mixer=layer, impl=mode, skipped=reason)
                continue
            try:
                model = build(args.shape, layer, mode).to(device).train()
                per_token = flops_per_token(model.config, args.seq)
                forward = torch.compile(model, backend=args.backend) if mode == "compile" else model
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)

                def step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                        loss = forward(inputs, positions, labels)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                timed = time_rows(model, step, args.steps, args.warmup, device)
            except Exception as exc:  # noqa: BLE001 - one row's failure is a result, not the end
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                print(f"| {layer} | {mode} | failed: {error} | | | |", flush=True)
                emit(mixer=layer, impl=mode, skipped=f"failed: {error}")
                continue
            finally:
                model = forward = opt = None  # noqa: F841 - free the GPU before the next row
                if mode == "compile":
                    torch._dynamo.reset()  # its caches hold the compiled model's tensors
                if on_gpu:
                    torch.cuda.empty_cache()
            tokens = args.micro_batch * args.seq / timed["seconds_per_step"]
            mfu = tokens * per_token / peak if peak else None
            mem = f"{timed['peak_gib']:.1f}" if timed["peak_gib"] is not None else "-"
            print(f"| {layer} | {mode} | {tokens:,.0f} | {f'{mfu:.1%}' if mfu else '-'} | {mem} | "
                  f"{timed['first_step_s']:.1f} |", flush=True)
            emit(mixer=layer, impl=mode, tokens_per_s=tokens, mfu=mfu, peak_gib=timed["peak_gib"],
                 first_step_s=timed["first_step_s"],
                 compile_s=timed["first_step_s"] - timed["seconds_per_step"] if mode == "compile" else None)


if __name__ == "__main__":
    main()
