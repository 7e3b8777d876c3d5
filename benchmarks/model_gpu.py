"""Training throughput on one GPU: this project's model vs mamba-ssm's own MambaLMHeadModel, same
shapes, same step (bf16 autocast over fp32 weights, fused AdamW), for the 130m and 370m shapes;
for Mamba-3, which mamba-ssm's LM does not build, our kernel path vs our torch path.
Prints a table; asserts nothing. No Composer (a GPU machine's torch need not fit Composer's pin):
a bare loop, which is also how mamba-ssm's users time their models.

    python benchmarks/model_gpu.py [--shapes 130m 370m] [--layers mamba1 mamba2 mamba3] [--seq 2048]
                                   [--micro-batch 8] [--steps 20] [--warmup 5] [--doc-len 1024]
                                   [--json FILE]   # also append each row as a JSON line (GPU proof)
    python benchmarks/model_gpu.py --smoke      # a tiny shape for 2 steps on any device (CPU too)

Rows per shape and mixer:
  ours, documents     position_ids of packed documents (exponential lengths, mean --doc-len):
                      document isolation on, as training runs (Mamba-1: conv + scan kernels with
                      resets; Mamba-2: the fused kernel with seq_idx; Mamba-3: mamba-ssm >= 2.3.2's
                      SISO Triton kernel with cu_seqlens); model.kernels=cuda where the mixer's
                      kernels import on a GPU, else auto (the torch ops, said so)
  ours, one document  no position_ids (Mamba-1: the fused mamba_inner_fn)
  ours, documents, torch path   Mamba-3 only: the same model with model.kernels=torch (the chunked
                      scan of mamba/model/ops/mamba3_scan.py), its last column against the kernel
                      row; skipped, with the reason, where there is no kernel row to compare with
  mamba-ssm           mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel with its defaults for
                      these checkpoints (rms_norm, residual_in_fp32, fused_add_norm), logits
                      then F.cross_entropy, no isolation; skipped with the reason when mamba-ssm
                      does not import, and for Mamba-3 (its create_block builds Mamba1/Mamba2 only)
tokens/s = micro_batch * seq * steps / seconds (synchronised), MFU = tokens/s * training FLOPs per
token (mamba/model/flops.py: forward + backward, the same formula for both) / the GPU's bf16 dense
peak (mamba/device_peaks.py), memory = torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mamba.model import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba.model.flops import flops_per_token  # noqa: E402
from mamba.model.ops.kernels import cuda_kernels_available, family_of  # noqa: E402
from mamba.device_peaks import gpu_peak_flops  # noqa: E402

VOCAB = 50277  # GPT-NeoX's tokenizer, the state-spaces checkpoints' (padded to 50280)
# (d_model, n_layer) of state-spaces/mamba-130m, -370m, -1.4b and mamba2-130m, -370m, -1.3b
# (their config.json).
SHAPES = {"130m": (768, 24), "370m": (1024, 48), "1.4b": (2048, 48), "smoke": (128, 2)}
# The mixers' own settings in those checkpoints: Mamba-1 d_state 16; Mamba-2 d_state 128, headdim 64.
# Mamba-3 has no checkpoints of these shapes: mamba-ssm 2.3.2's Mamba3 defaults (d_state 128,
# headdim 64, chunk 64, what it recommends for SISO) on the Mamba-2 rows' d_model x n_layer.
MIXER = {"mamba1": {"d_state": 16}, "mamba2": {"d_state": 128, "headdim": 64},
         "mamba3": {"d_state": 128, "headdim": 64, "chunk_size": 64}}


def packed_positions(batch: int, seq: int, mean_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq) in-document positions of documents with exponential lengths (mean mean_len),
    packed back to back: what the loader hands the model."""
    rows = []
    for _ in range(batch):
        pieces, total = [], 0
        while total < seq:
            length = max(1, int(torch.empty(1).exponential_(1 / mean_len, generator=generator)))
            pieces.append(torch.arange(length))
            total += length
        rows.append(torch.cat(pieces)[:seq])
    return torch.stack(rows)


def ours(d_model: int, n_layer: int, layer: str, kernels: str = "auto") -> MambaLMHeadModel:
    torch.manual_seed(0)  # the kernel and torch-path models of one mixer start from the same weights
    return MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_layer=layer,
                                        kernels=kernels, **MIXER[layer]))


def mamba_ssm_model(d_model: int, n_layer: int, layer: str):
    """mamba-ssm's LM with the state-spaces checkpoints' settings, or why there is none to time."""
    if layer == "mamba3":
        return "mamba-ssm's MambaLMHeadModel builds Mamba1 and Mamba2 layers only (2.3.2's create_block)"
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as SsmLM
    except Exception as exc:  # noqa: BLE001 - Triton raises RuntimeError without a driver
        return f"{type(exc).__name__}: {exc}"
    ssm_cfg = {"layer": "Mamba1" if layer == "mamba1" else "Mamba2", **MIXER[layer]}
    return SsmLM(SsmConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=ssm_cfg, rms_norm=True,
                           residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8))


def time_training(model, loss_of, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak GiB) of loss_of(model), backward and a (fused on GPU) AdamW step,
    under bf16 autocast on GPU (fp32 on CPU, where autocast would only slow the smoke run)."""
    model.to(device).train()
    on_gpu = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan")
    model.to("cpu")
    del opt
    if on_gpu:
        torch.cuda.empty_cache()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["130m", "370m"], choices=sorted(SHAPES))
    parser.add_argument("--layers", nargs="+", default=["mamba1", "mamba2", "mamba3"], choices=sorted(MIXER))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--doc-len", type=int, default=1024, help="mean document length of the packed rows")
    parser.add_argument("--smoke", action="store_true", help="shape 'smoke', seq 256, batch 2, 2 steps")
    parser.add_argument("--json", type=Path, help="append each row to this file as a JSON line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # ops/kernels.py says which path runs
    if args.smoke:
        args.shapes, args.seq, args.micro_batch, args.steps, args.warmup = ["smoke"], 256, 2, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = gpu_peak_flops(name, "amp_bf16") if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.micro_batch, args.seq + 1), generator=generator).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    positions = packed_positions(args.micro_batch, args.seq, args.doc_len, generator).to(device)
    print(f"device: {name}; bf16 peak {peak / 1e12:.1f} TFLOP/s" if peak else f"device: {name}; no peak known")
    kernel_path = {}  # per mixer: (whether ours runs on its kernels, why not)
    for layer in args.layers:
        ok, why = cuda_kernels_available(family_of(layer))  # Mamba-3: mamba-ssm >= 2.3.2
        kernel_path[layer] = (ok and device.type == "cuda", why or "no GPU")
        print(f"ours, {layer}: " + ("mamba-ssm's kernels (model.kernels=cuda)" if kernel_path[layer][0]
                                    else f"the torch ops ({kernel_path[layer][1]})"))
    print(f"seq {args.seq}, micro batch {args.micro_batch}, {args.steps} timed steps after {args.warmup}; "
          f"{int((positions == 0).sum())} document starts in the documents rows\n")

    def emit(**row):  # the same row for benchmarks/gpu/prove.sh, written as soon as it is measured
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"seq": args.seq, "micro_batch": args.micro_batch, "device": name, **row}) + "\n")

    print("| shape | mixer | impl | tokens/s | MFU | peak GiB | vs |")
    print("|---|---|---|---|---|---|---|")
    torch_path = "ours, documents, torch path"
    for shape in args.shapes:
        d_model, n_layer = SHAPES[shape]
        for layer in args.layers:
            on_kernels, why_not = kernel_path[layer]
            model = ours(d_model, n_layer, layer, "cuda" if on_kernels else "auto")
            per_token = flops_per_token(model.config, args.seq)

            def documents(m):
                return m(inputs, positions, labels)

            rows = [  # (impl, model or why not, loss, the row its last column compares with), references first
                ("mamba-ssm", mamba_ssm_model(d_model, n_layer, layer),
                 lambda m: F.cross_entropy(m(inputs).logits.flatten(0, 1).float(), labels.flatten()), None),
                ("ours, documents", model, documents, "mamba-ssm"),
                ("ours, one document", model, lambda m: m(inputs, labels=labels), "mamba-ssm"),
            ]
            if layer == "mamba3":  # the kernel rows' weights (ours seeds) on the torch ops, where there are such rows
                rows.append((torch_path, ours(d_model, n_layer, layer, "torch") if on_kernels
                             else f"no kernel row to compare with: {why_not}", documents, "ours, documents"))
            results = {}
            for impl, candidate, loss_of, reference in rows:
                if isinstance(candidate, str):
                    print(f"| {shape} | {layer} | {impl} | skipped: {candidate} | | | |")
                    emit(shape=shape, mixer=layer, impl=impl, skipped=candidate)
                    continue
                error = None
                try:
                    seconds, mem = time_training(candidate, loss_of, args.steps, args.warmup, device)
                except Exception as exc:  # noqa: BLE001 - one row's failure (OOM, Triton), not the table's
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                if error:  # out of the except block, so the traceback no longer holds the GPU's tensors
                    print(f"| {shape} | {layer} | {impl} | failed: {error} | | | |", flush=True)
                    emit(shape=shape, mixer=layer, impl=impl, skipped=f"failed: {error}")
                    candidate.to("cpu")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                results[impl] = tokens = args.micro_batch * args.seq / seconds
                mfu = f"{tokens * per_token / peak:.1%}" if peak else "-"
                vs = tokens / results[reference] if reference in results else None
                ratio = f"{vs:.2f}x {'kernels' if impl == torch_path else reference}" if vs else "-"
                print(f"| {shape} | {layer} | {impl} | {tokens:,.0f} | {mfu} | {mem:.1f} | {ratio} |", flush=True)
                emit(shape=shape, mixer=layer, impl=impl, tokens_per_s=tokens,
                     kernels=on_kernels and impl != torch_path,
                     mfu=tokens * per_token / peak if peak else None, peak_gib=mem if mem == mem else None,
                     **{"vs_kernels" if impl == torch_path else "vs_mamba_ssm": vs})


if __name__ == "__main__":
    main()
