"""CPU training throughput of our pure-torch Mamba-1 and hybrid vs HF transformers' pure-torch Mamba and Bamba.

Usage:  .venv/bin/python benchmarks/model_cpu.py [--seqs 512 2048] [--batch 4] [--repeats 3]
                                               [--workloads mixers model] [--threads 1]
                                               [--skip hf-slow hf-mambapy seq-ref]
Needs the `bench` extra (transformers, mambapy): pip install -e '.[bench]'

Measures forward + backward tokens/s (float32, train mode, best of --repeats after one warm-up)
for four workloads, each with identical weights in every implementation:
  mixers  a stack of 4 Mamba-1 mixers, d_model 256 (no norms, no residual): the scan's cost
  model   the whole LM (d_model 256, 4 layers, vocab 8192) + next-token loss (ours: the chunked
          cross-entropy of training; HF: full logits + F.cross_entropy)
  hybrid  a Mamba-2 + attention LM of the same width: 4 layers, layer 2 attention (1 in 4; 4 heads
          of 64, RoPE on 32 channels, no conv), a gated MLP of 512 after every mixer, Mamba-2 with
          d_state 64 and heads of 64: ours (packed windows of 4 documents, so attention takes its
          document mask; "ours-1doc": one document per row, plain causal attention) against
          transformers' BambaForCausalLM (torch path, one document per row) with the same weights
          (mamba.model.bamba). Jamba is not compared: its Mamba layers are
          Mamba-1 with extra dt/B/C norms and its MLPs mixtures of experts, no exact weight map.
  layers  ours only, the whole LM (d_model 256, 4 layers, vocab 8192) with each mixer at
          mamba-ssm's defaults: mamba1 (d_state 16), mamba2 (d_state 128, heads of 64, chunk 256),
          mamba3 (SISO: d_state 128, heads of 64, chunk 64), mamba3-mimo (the same with MIMO rank 4,
          chunk 16 = 64 / R as mamba-ssm advises), windows of 4 documents
and, for mixers and model, four implementations:
  ours       mamba.model (ops/selective_scan.py, chunked scan)
  hf-slow    transformers MambaForCausalLM / MambaMixer on CPU: its default slow_forward
             (a Python loop over time steps)
  hf-mambapy the same with config.use_mambapy=True (mambapy's parallel scan; train mode only)
  seq-ref    ours with the scan replaced by ops.selective_scan_ref (a loop over time steps),
             timed ONCE (no warm-up, one repeat) to keep the run affordable
Then the achieved GFLOP/s of ours (mamba/model/flops.py formula, training = 3x forward) over a
measured float32 matmul GFLOP/s of this machine (best of 1024^3 torch.mm).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

import mamba.model.mamba1 as mamba1_module
from mamba.model.flops import flops_per_token, mamba1_layer_flops
from mamba.model.bamba import bamba_config, bamba_state_dict
from mamba.model.hf import hf_config, hf_state_dict
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.model.ops.selective_scan import selective_scan_ref

D_MODEL, N_LAYER, VOCAB = 256, 4, 8192


def build(use_mambapy: bool | None):
    """(our LM, HF LM or None) with identical weights; use_mambapy None = ours only."""
    torch.manual_seed(0)
    ours = MambaLMHeadModel(MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB, kernels="torch"))
    if use_mambapy is None:
        return ours, None
    from transformers import MambaConfig as HFConfig, MambaForCausalLM

    hf = MambaForCausalLM(HFConfig(**hf_config(ours), use_mambapy=use_mambapy))
    missing, unexpected = hf.load_state_dict(hf_state_dict(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is re-tied by HF
        raise RuntimeError(f"HF weight mapping failed: missing {missing}, unexpected {unexpected}")
    return ours, hf


def build_layer(kind: str) -> MambaLMHeadModel:
    """Our LM of the benchmark's width with `kind` mixers at mamba-ssm's default shapes."""
    torch.manual_seed(0)
    shape = {"mamba1": dict(ssm_layer="mamba1"),
             "mamba2": dict(ssm_layer="mamba2", d_state=128, headdim=64, chunk_size=256),
             "mamba3": dict(ssm_layer="mamba3", d_state=128, headdim=64, chunk_size=64),
             "mamba3-mimo": dict(ssm_layer="mamba3", d_state=128, headdim=64, chunk_size=16, is_mimo=True,
                                 mimo_rank=4)}[kind]
    return MambaLMHeadModel(MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB, kernels="torch", **shape))


def build_hybrid():
    """(our Mamba-2 + attention LM, transformers' Bamba with the same weights)."""
    from transformers import BambaConfig, BambaForCausalLM

    torch.manual_seed(0)
    ours = MambaLMHeadModel(MambaConfig(
        d_model=D_MODEL, n_layer=N_LAYER, vocab_size=VOCAB, ssm_layer="mamba2", d_state=64, headdim=64,
        kernels="torch", attn_layer_idx=(2,), d_intermediate=512,
        attn_cfg=dict(num_heads=4, rotary_emb_dim=32, qkv_proj_bias=False, out_proj_bias=False)))
    hf = BambaForCausalLM(BambaConfig(**bamba_config(ours)))
    missing, unexpected = hf.load_state_dict(bamba_state_dict(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Bamba weight mapping failed: missing {missing}, unexpected {unexpected}")
    return ours, hf


class MixerStack(nn.Module):
    """The mixers of an LM applied one after another: (B, L, d) -> (B, L, d)."""

    def __init__(self, mixers):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)

    def forward(self, x):
        for m in self.mixers:
            x = m(x)
        return x


@contextlib.contextmanager
def sequential_scan():
    """Run our mixers with the per-time-step reference scan (mamba1.py looks the name up per call)."""
    fast = mamba1_module.selective_scan
    mamba1_module.selective_scan = lambda *a, chunk_size=None, **k: selective_scan_ref(*a, **k)
    try:
        yield
    finally:
        mamba1_module.selective_scan = fast


def time_step(fn, repeats: int, warmup: bool = True) -> float:
    """Best wall seconds of one forward+backward `fn()` call."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mixer_step(stack, x):
    def run():
        stack.zero_grad(set_to_none=True)
        stack(x).square().mean().backward()
    return run


def model_step(model, ids, ours: bool, position_ids=None):
    def run():
        model.zero_grad(set_to_none=True)
        if ours:
            loss = model(ids[:, :-1], position_ids=position_ids, labels=ids[:, 1:])  # chunked loss, real vocabulary
        else:
            logits = model(ids[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    return run


def matmul_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / time_step(lambda: torch.mm(a, b), repeats=20) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["mixers", "model", "hybrid", "layers"],
                        choices=["mixers", "model", "hybrid", "layers"])
    # One thread by default: on a shared machine, OpenMP threads that spin-wait for each other
    # slowed every implementation by 10-50x (measured on the 2-core dev box under load).
    parser.add_argument("--threads", type=int, default=1)
    # HF's slow path indexes one time step per iteration; each index's backward (select_backward)
    # writes a zero-filled (batch, E, L, N) tensor, so its backward is O(L^2): at L = 2048 one
    # step takes hours on one core. --skip hf-slow leaves it out.
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf-slow", "hf-mambapy", "seq-ref", "hf-bamba"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    mamba1 = {"mixers", "model"} & set(args.workloads)
    ours, hf_slow = build(use_mambapy=False if mamba1 else None)
    _, hf_py = build(use_mambapy=True) if mamba1 else (None, None)
    hybrid, bamba = build_hybrid() if "hybrid" in args.workloads else (None, None)
    layer_models = {f"ours-{k}": build_layer(k) for k in ("mamba1", "mamba2", "mamba3", "mamba3-mimo")} \
        if "layers" in args.workloads else {}
    for m in (ours, hf_slow, hf_py, hybrid, bamba, *layer_models.values()):
        if m is not None:
            m.train()  # HF takes the mambapy scan only in training mode
    stacks = {name: MixerStack([layer.mixer for layer in m.backbone.layers])
              for name, m in (("ours", ours), ("hf-slow", hf_slow), ("hf-mambapy", hf_py)) if m is not None}
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; "
          f"matmul 1024^3: {peak:.1f} GFLOP/s")
    mix_m, mix_o = mamba1_layer_flops(ours.config)
    header = f"{'workload':8} {'seq':>5} {'impl':18} {'tok/s':>9} {'ours/x':>7} {'GFLOP/s':>8} {'% matmul':>8}"
    print(header + "\n" + "-" * len(header))
    for seq in args.seqs:
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(args.batch, seq, D_MODEL, generator=g)
        ids = torch.randint(0, VOCAB, (args.batch, seq + 1), generator=g)
        tokens = args.batch * seq
        for workload in args.workloads:
            positions = (torch.arange(seq) % max(1, seq // 4)).repeat(args.batch, 1)  # 4 documents a window
            if workload == "layers":
                steps = {k: model_step(m, ids, True, positions) for k, m in layer_models.items()}
                seq_ref, flops = None, None
            elif workload == "hybrid":
                steps = {"ours": model_step(hybrid, ids, True, positions), "ours-1doc": model_step(hybrid, ids, True),
                         "hf-bamba": model_step(bamba, ids, False)}
                seq_ref = None
                flops = flops_per_token(hybrid.config, seq) * tokens
            elif workload == "mixers":
                steps = {k: mixer_step(s, x) for k, s in stacks.items()}
                seq_ref = mixer_step(stacks["ours"], x)
                flops = 3 * N_LAYER * (mix_m + mix_o) * tokens
            else:
                steps = {"ours": model_step(ours, ids, True), "hf-slow": model_step(hf_slow, ids, False),
                         "hf-mambapy": model_step(hf_py, ids, False)}
                seq_ref = model_step(ours, ids, True)
                flops = flops_per_token(ours.config) * tokens
            secs = {k: time_step(fn, args.repeats) for k, fn in steps.items() if k not in args.skip}
            if "seq-ref" not in args.skip and seq_ref is not None:
                with sequential_scan():
                    secs["seq-ref (1x)"] = time_step(seq_ref, 1, warmup=False)
            first = next(iter(secs))  # "ours", or ours-mamba1 in the layers workload
            for impl, s in secs.items():
                ratio = secs[impl] / secs[first]
                if workload == "layers":
                    flops = flops_per_token(layer_models[impl].config, seq) * tokens
                gf = flops / s / 1e9
                print(f"{workload:8} {seq:>5} {impl:18} {tokens / s:>9.0f} {ratio:>7.1f} {gf:>8.2f} {100 * gf / peak:>7.1f}%", flush=True)


if __name__ == "__main__":
    main()
