"""The planner's memory model: bytes per rank of a training run, from the model built on the
meta device (mamba/config/planner.py turns it into a plan).

Every size below is read off the model itself, built on the meta device (shapes, no memory):
`measure_model` counts its parameters and its largest FSDP unit and reads the mixer's widths, so
the planner keeps no parameter formulas (and no dt_rank rule) of its own.

Memory model, bytes per rank (P = parameters, S = ranks the parameters are sharded over, B = micro
batch in windows, L = seq_len, l = n_layer, d = d_model, E = d_inner, V = padded vocab,
W = the per-token width of the scan's inputs dt, B and C: Mamba-1's x_proj output R + 2N with
R = dt_rank and N = d_state; Mamba-2's in_proj outputs beyond x and z, H + 2GN; Mamba-3's,
2GN + 3H + S (B, C, dt, A, trap and S rotary angles; with MIMO 2 mimo_rank GN for its B's and C's);
c = bytes of the compute dtype: 2 under amp_bf16, 4 in fp32; g = bytes of a gathered parameter: 2 with bf16
all-gathers (amp_bf16 and fsdp.mixed_precision=DEFAULT), else 4):

    states       16 P / S     fp32 parameters (they are AdamW's master weights: Composer's
                              amp_bf16 autocasts, it does not keep a second copy) 4 P, fp32 grads
                              4 P, AdamW's two fp32 moments 8 P; all sharded by FSDP
                              (Rajbhandari et al. 2020, ZeRO, Sec. 3: "16 Psi" for mixed-precision Adam)
    gathered     (2g + 4) P_u the largest FSDP unit (a block, or the embedding/head) unsharded
                              while it computes: its gathered copy for this and the prefetched unit
                              plus its unsharded fp32 grads before reduce-scatter
    activations  B L a        a = bytes kept per token for backward, below
    loss         B L ((4 + c) d + 13) + (8 + c) K V + 4 V d
                              the chunked cross-entropy (model/loss.py, K = its chunk of
                              min(loss_chunk_size, B L) rows): per token the final norm's fp32
                              input, the normed hidden state, the fp32 logsumexp, the int64 label
                              and the bool mask; in backward one chunk's fp32 logits, its fp32
                              softmax gradient and that gradient in the compute dtype, and the
                              head's fp32 gradient
    reserve      2 GiB + 10%  CUDA context, NCCL buffers and allocator fragmentation (on a CPU
                              rank: the process itself); the plan uses at most 90% of the memory
                              after the fixed 2 GiB

`block` = bytes one block keeps per token for its backward, on the path the run will take:

  mamba-ssm's fused kernels (counted, amp_bf16), which recompute the (E, N) scan states in
  backward instead of storing them (Gu & Dao 2023, Sec. 3.3.2):

    block = 4d (fp32 residual) + 2d (normed input) + 2*2E (in_proj: x, z) + 2E (conv out)
            + 2E (silu) + 2W (x_proj: dt, B, C) + 4E (dt, fp32) + 2E (scan out y) + 2E (gated)

    Mamba-2 blocks are counted with the same terms (their (H, N) chunk states are likewise
    recomputed).

    A Mamba-3 block (mamba3.py on mamba-ssm 2.3.2's SISO Triton kernel, ops/kernels.py) is counted
    tensor by tensor: what `_Mamba3Function.forward` (ops/triton/mamba3/mamba3_siso_combined.py)
    passes to save_for_backward, with the shapes and dtypes mamba3_siso_fwd and angle_dt_fwd give
    them, plus what autograd saves for the torch ops around it in mamba3.py. H heads of P
    channels, G groups, N = d_state, S rotary angles, Q = chunk_size, W3 = 2E + 2GN + 3H + S the
    in_proj width:

    block = 4d + 2d + 2 W3        fp32 residual, normed input; in_proj's output, kept whole since
                                  x, z and trap reach the kernel as views of it
            + 2 * (4GN + 4G + 4GN + 2GN)   B_norm, C_norm (torch RMSNorm): fp32 input, rstd,
                                  normed product, and the bf16 result the kernel keeps as K, Q
            + 6 * 4H              fp32 dd_A, -softplus(dd_A), A, dd_dt + dt_bias, dt, A dt
            + 2 * 4HS             the angles per head and their cumulative sum, fp32 (mamba3.py
                                  and mamba-ssm's Mamba3.forward hand the kernel fp32 angles;
                                  angle_dt_fwd's sum is empty_like them)
            + 2 * 2E              the kernel's output (out_proj's input) and its pre-gate output
            + 2 * 2HN + 4 * 4H    rotated C and scaled B per head (bf16); fp32 cumulative decay,
                                  qk dot, scale and gamma per head
            + (2EN + 4H) / Q      one bf16 (H, P, N) state and one fp32 decay sum per chunk
            [+ 22E + 4H, with is_outproj_norm: the torch RMSNormGated's fp32 copies of y, z,
                                  silu(z), the normed and weighted y, rstd per head, and its
                                  bf16 result]

    dt is counted in fp32, as mamba-ssm keeps dt_bias; with bf16 all-gathers (dt_bias bf16)
    dd_dt + dt_bias and dt are bf16, 4H fewer bytes. Document starts add one chunk state per
    document (cu_seqlens), not counted.

    A Mamba-3 MIMO block (is_mimo, rank R) on mamba-ssm 2.3.2's TileLang kernel (kernel family
    "mamba3-mimo": where tilelang imports) is counted the same way: `_Mamba3Function.forward`
    (ops/tilelang/mamba3/mamba3_mimo.py) makes every input contiguous and saves Q, K, V, ADT, DT,
    Trap, Angles and its Angles_Cumsum (angle_dt_fwd), D, Z and the parameters; its forward kernel
    (mamba_mimo_forward) keeps nothing else: backward recomputes the decay sums and chunk states.
    Only B and C carry the rank (per token (R, G, N)); x, z and the decays are per head:

    block = 4d + 2d               fp32 residual, normed input (in_proj's output is not kept: the
                                  kernel saves its own copies of the views x, z and trap)
            + 2R * (4GN + 4G + 4GN + 2GN)   B_norm, C_norm as above, for each of the R ranks
            + 7 * 4H + 2H         fp32 dd_A, -softplus(dd_A), A, dd_dt + dt_bias, dt, and the
                                  kernel's contiguous (b, H, L) copies of A dt and dt; of trap (bf16)
            + 2 * 4HS             the fp32 angles per head and their cumulative sum
            + 3 * 2E              the kernel's copies of x (V) and z (Z), and its output
                                  (out_proj's input)
            [with is_outproj_norm: + 2 W3 - 2E + R (22E + 4H): z reaches the kernel no more (-2E)
                                  but the torch gate z * mimo_z keeps in_proj's whole output
                                  (W3 = 2E + 2RGN + 3H + S), and the RMSNormGated terms above run
                                  on each rank's output, the fp32 gate z * mimo_z in place of z's copy]

    Checked (tests/launch/test_create_config_mimo.py) against the tensors autograd saves for a
    mixer whose kernel is a stand-in saving exactly what `_Mamba3Function.forward` saves.
    An attention block of a hybrid (flash-attn's kernel, which keeps one fp32
    log-sum-exp per query and head and recomputes the scores; h heads, h_kv KV heads, D head_dim,
    Q = (h + 2 h_kv) D):

    block = 4d + 2d + 2Q (in_proj: q, k, v) [+ 2Q (conv out), with attn_cfg.d_conv]
            [+ 2 (h + h_kv) D (q, k after RoPE), with rotary] + 2 h D (attention out) + 4h

    and a block with an MLP (d_intermediate, I its width) keeps 4d + 2d + 2*2I + 2I more (fp32
    residual, normed input, fc1 out, gated product).

  the pure-PyTorch ops (measured): CPU ranks, model.kernels=torch, or mamba-ssm not importable
  where the plan is made. They keep much more (Mamba-1's scan stores every state h_t, E x N fp32
  per token, ops/selective_scan.py; Mamba-2's chunked SSD its (Q x Q) blocks per head,
  ops/ssd.py), so this count is not written out by hand: one block of the run's shape runs its
  forward on fake tensors (torch's FakeTensorMode: shapes and dtypes, no memory, no arithmetic)
  under the run's precision, and the tensors autograd saves are added up, once per storage.

Without activation checkpointing a = the sum of every layer's block (a hybrid's attention and
Mamba blocks differ). With it (every k-th block, k = fsdp.activation_checkpointing_every), a
checkpointed block keeps only its input ((4 + c) d: the fp32 residual and the hidden state) and
one block at a time is recomputed: a = sum over blocks i of ((4 + c) d if i % k == 0 else block_i)
+ the largest block.

This module imports mamba.model (to build the model), so mamba/config/__init__.py does not import
it: mamba.model imports mamba.config.schema.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mamba.model.factory import build_model
from mamba.model.ops.kernels import cuda_kernels_available, family_of

GIB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    """What the memory model needs to know of a model (module docstring's letters)."""

    params: int          # P: all parameters, a tied head counted once
    largest_unit: int    # parameters of the largest FSDP unit: a block, or the embedding/head
    n_layer: int         # l
    d_model: int         # d
    d_inner: int         # E (of the Mamba layers; 0 in an attention-only model)
    scan_inputs: int     # W: per-token width of dt, B and C
    padded_vocab: int    # V
    loss_chunk: int      # rows per chunk of the chunked cross-entropy
    layer_kinds: tuple = ()  # per layer: "mamba" or "attention"
    ssm_layer: str = "mamba1"  # the Mamba layers' kind; below, the Mamba-3 mixer's sizes (0 otherwise)
    ssm_heads: int = 0   # H
    state_size: int = 0  # N
    bc_groups: int = 0   # G
    rope_angles: int = 0  # S
    chunk: int = 0       # Q
    outproj_norm: bool = False
    mimo_rank: int = 0   # R of a Mamba-3 MIMO mixer (is_mimo; 0: SISO)
    attn_qkv: int = 0    # Q = (h + 2 h_kv) D, the attention layers' in_proj width
    attn_qk: int = 0     # (h + h_kv) D: q and k, rotated by RoPE
    attn_heads: int = 0  # h
    attn_out: int = 0    # h D
    attn_conv: bool = False
    attn_rotary: bool = False
    mlp_width: int = 0   # I: the MLP's hidden width (0: no MLPs)


def measure_model(model_cfg) -> ModelSize:
    """Build the model of `model_cfg` (the `model:` section) on the meta device and read its sizes
    (built with the torch ops: the shapes are the same, and kernels=cuda would need mamba-ssm here)."""
    model = build_model(dataclasses.replace(model_cfg, kernels="torch"), device="meta")
    layers = model.backbone.layers
    kinds = tuple("attention" if i in model_cfg.attn_layer_idx else "mamba" for i in range(len(layers)))
    mamba = next((layer.mixer for layer, kind in zip(layers, kinds) if kind == "mamba"), None)
    attn = next((layer.mixer for layer, kind in zip(layers, kinds) if kind == "attention"), None)
    d_inner = scan_inputs = 0
    mamba3 = {}
    if mamba is not None:
        d_inner = mamba.d_inner
        if model_cfg.ssm_layer == "mamba1":  # x_proj(x) = [dt (R), B (N), C (N)]
            scan_inputs = mamba.x_proj.out_features
        else:  # in_proj(u) = [z (E), x (E), B (GN), C (GN), dt (H)], Mamba-3 + [A (H), trap (H), angles (S)]
            scan_inputs = mamba.in_proj.out_features - 2 * d_inner
        if model_cfg.ssm_layer == "mamba3":
            mamba3 = dict(ssm_heads=mamba.nheads, state_size=mamba.d_state, bc_groups=mamba.ngroups,
                          rope_angles=mamba.num_rope_angles, chunk=mamba.chunk_size,
                          outproj_norm=mamba.is_outproj_norm, mimo_rank=mamba.mimo_rank if mamba.is_mimo else 0)
    attn_dims = {}
    if attn is not None:
        attn_dims = dict(attn_qkv=attn.in_proj.out_features, attn_qk=attn.q_dim + attn.kv_dim,
                         attn_heads=attn.num_heads, attn_out=attn.q_dim, attn_conv=attn.d_conv > 0,
                         attn_rotary=attn.rotary_emb_dim > 0)
    embedding = model.backbone.embedding.weight  # (V, d); an untied head has the same shape
    return ModelSize(
        params=model.num_parameters(),
        largest_unit=max(max(sum(p.numel() for p in layer.parameters()) for layer in layers), embedding.numel()),
        n_layer=len(layers), d_model=embedding.shape[1], d_inner=d_inner,
        scan_inputs=scan_inputs, padded_vocab=embedding.shape[0], loss_chunk=model.lm_head.loss_chunk_size,
        layer_kinds=kinds, mlp_width=layers[0].mlp.hidden if layers[0].mlp is not None else 0, **attn_dims,
        ssm_layer=model_cfg.ssm_layer, **mamba3,
    )


def block_activation_bytes(size: ModelSize, kind: str = "mamba") -> int:
    """Bytes kept per token by one block of `kind` ("mamba", "attention") for its backward on the
    fused kernels, its MLP included (module docstring)."""
    d, e = size.d_model, size.d_inner
    if kind == "mamba" and size.ssm_layer == "mamba3":
        mixer = mamba3_mimo_block_bytes(size) if size.mimo_rank else mamba3_block_bytes(size)
    elif kind == "mamba":
        mixer = 4 * d + 2 * d + 2 * 2 * e + 2 * e + 2 * e + 2 * size.scan_inputs + 4 * e + 2 * e + 2 * e
    else:
        q = size.attn_qkv
        mixer = (4 * d + 2 * d + 2 * q + (2 * q if size.attn_conv else 0)
                 + (2 * size.attn_qk if size.attn_rotary else 0) + 2 * size.attn_out + 4 * size.attn_heads)
    i = size.mlp_width
    return mixer + (4 * d + 2 * d + 2 * 2 * i + 2 * i if i else 0)


def mamba3_block_bytes(size: ModelSize) -> int:
    """A Mamba-3 block's bytes per token on mamba-ssm's kernel, without MLP (module docstring)."""
    d, e, h, n, g, s = size.d_model, size.d_inner, size.ssm_heads, size.state_size, size.bc_groups, size.rope_angles
    in_proj = 2 * e + size.scan_inputs  # W3
    total = (4 * d + 2 * d + 2 * in_proj + 2 * (4 * g * n + 4 * g + 4 * g * n + 2 * g * n) + 6 * 4 * h
             + 2 * 4 * h * s + 2 * 2 * e + 2 * 2 * h * n + 4 * 4 * h + -(-(2 * e * n + 4 * h) // size.chunk))
    return total + (22 * e + 4 * h if size.outproj_norm else 0)


def mamba3_mimo_block_bytes(size: ModelSize) -> int:
    """A Mamba-3 MIMO block's bytes per token on mamba-ssm's TileLang kernel, without MLP (module
    docstring): what its autograd Function saves, plus autograd's saves for the torch ops around it."""
    d, e, h, n, g, s = size.d_model, size.d_inner, size.ssm_heads, size.state_size, size.bc_groups, size.rope_angles
    r = size.mimo_rank
    total = (4 * d + 2 * d + 2 * r * (4 * g * n + 4 * g + 4 * g * n + 2 * g * n) + 7 * 4 * h + 2 * h
             + 2 * 4 * h * s + 3 * 2 * e)
    in_proj = 2 * e + size.scan_inputs  # W3, with R B's and C's
    return total + (2 * in_proj - 2 * e + r * (22 * e + 4 * h) if size.outproj_norm else 0)


def torch_block_bytes(model_cfg, seq_len: int, amp: bool, gathered: int, kind: str = "mamba") -> int:
    """Bytes one block of `kind` keeps per token for its backward on the pure-PyTorch ops, measured
    on fake tensors (module docstring). Windows of 1 and 2 sequences: the difference is one
    window's worth, so what does not grow with the tokens (weights cast by autocast) cancels."""
    one_layer = dataclasses.replace(model_cfg, n_layer=1, init_from=None, kernels="torch",
                                    attn_layer_idx=[0] if kind == "attention" else [])
    default = torch.get_default_dtype()
    # Parameters as FSDP hands them to the block, created so: newer torch cannot .to() a module
    # of fake tensors (it swaps the tensors, which fake ones refuse).
    torch.set_default_dtype(torch.bfloat16 if gathered == 2 else torch.float32)
    try:
        with FakeTensorMode():
            block = build_model(one_layer, device="cpu").backbone.layers[0]
            one, two = (_saved_bytes(block, batch, seq_len, amp) for batch in (1, 2))
    finally:
        torch.set_default_dtype(default)
    return (two - one) // seq_len


def _saved_bytes(block, batch: int, seq_len: int, amp: bool) -> int:
    """Bytes of the storages autograd saves in one forward of `block` (a block past the first:
    an fp32 residual stream comes in beside the previous block's output)."""
    params = {p.untyped_storage()._cdata for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()  # views of one buffer (x and z of in_proj) count once
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    hidden = torch.empty(batch, seq_len, block.d_model, dtype=torch.bfloat16 if amp else torch.float32,
                         requires_grad=True)
    residual = torch.empty(batch, seq_len, block.d_model, requires_grad=True)
    reset = torch.zeros(batch, seq_len, dtype=torch.bool)  # documents: attention keeps its (L, L) mask
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # CPU's autocast: fake tensors are CPU ones
        block(hidden, residual, reset=reset)
    return sum(saved.values())


@dataclass(frozen=True)
class MemoryModel:
    """The per-run terms of the memory model (module docstring's letters)."""

    blocks: dict         # kind ("mamba", "attention") -> bytes one such block keeps per token for its backward
    compute: int         # c
    gathered: int        # g
    path: str            # which count `block` is and why: printed with the plan


def kernel_path(kernels: str, device: str, ssm_layer: str = "mamba1", mimo: bool = False) -> tuple[bool, str]:
    """(whether the run will take mamba-ssm's fused kernels, why), as ops/kernels.py decides it:
    Mamba-3 by its own probe (mamba-ssm >= 2.3.2's Triton kernel, kernel family "mamba3"), Mamba-3
    MIMO by its TileLang kernel's (family "mamba3-mimo", which also needs tilelang)."""
    if device == "cpu":
        return False, "CPU ranks"
    if kernels != "auto":
        return kernels == "cuda", f"model.kernels={kernels}"
    family = family_of(ssm_layer, mimo)
    present, missing, kernel = _PLAN_KERNELS[family]
    if cuda_kernels_available(family)[0]:
        return True, f"model.kernels=auto and {present} imports here"
    needs = " (it needs tilelang)" if family == "mamba3-mimo" else ""
    return False, (f"model.kernels=auto and {missing} does not import here{needs}; for the fused {kernel} smaller "
                   "count plan where it does, or override model.kernels=cuda")


# How the plan names each kernel family (ops/kernels.py FAMILIES): where it imports, where it does
# not, and its kernels in the possessive.
_PLAN_KERNELS = {"mamba-ssm": ("mamba-ssm", "mamba-ssm", "kernels'"),
                 "mamba3": ("mamba-ssm's Mamba-3 kernel", "mamba-ssm >= 2.3.2's Mamba-3 kernel", "kernel's"),
                 "mamba3-mimo": ("mamba-ssm's Mamba-3 MIMO kernel (TileLang)", "mamba-ssm >= 2.3.2's Mamba-3 MIMO kernel",
                                 "kernel's")}


def memory_model(cfg, size: ModelSize, device: str) -> MemoryModel:
    """The terms for the validated config `cfg` run on `device` ("cpu" or "gpu")."""
    precision = cfg.trainer.precision
    amp = precision == "amp_bf16" or (precision == "auto" and device == "gpu")
    gathered = 2 if amp and cfg.fsdp.mixed_precision == "DEFAULT" else 4
    fused, why = kernel_path(cfg.model.kernels, device, cfg.model.ssm_layer, size.mimo_rank > 0)
    kinds = sorted(set(size.layer_kinds))
    # A MIMO plan names its form: its count (fused) or measurement (torch) is the MIMO mixer's.
    mimo = f" for Mamba-3 MIMO of rank {size.mimo_rank}" if size.mimo_rank else ""
    if fused:
        blocks = {kind: block_activation_bytes(size, kind) for kind in kinds}
        path = f"mamba-ssm's fused kernels{mimo}, counted ({why})"
    else:  # cfg.model carries is_mimo and mimo_rank: the measured block is the MIMO one
        blocks = {kind: torch_block_bytes(cfg.model, cfg.data.seq_len, amp, gathered, kind) for kind in kinds}
        path = f"the pure-PyTorch ops{mimo}, measured ({why})"
    return MemoryModel(blocks=blocks, compute=2 if amp else 4, gathered=gathered, path=path)


def activation_bytes_per_token(size: ModelSize, mem: MemoryModel, checkpointing: bool, every: int = 1) -> int:
    per_layer = [mem.blocks[kind] for kind in size.layer_kinds]
    if not checkpointing:
        return sum(per_layer)
    # Blocks 0, k, 2k, ... keep only their input; one block at a time is recomputed.
    return sum((4 + mem.compute) * size.d_model if i % every == 0 else b for i, b in enumerate(per_layer)) \
        + max(per_layer)


def fixed_bytes(size: ModelSize, mem: MemoryModel, shard_ranks: int) -> int:
    """Sharded states + one gathered unit + what the loss holds whatever the batch."""
    return (16 * size.params // shard_ranks + (2 * mem.gathered + 4) * size.largest_unit
            + 4 * size.padded_vocab * size.d_model)


def memory_bytes(size: ModelSize, mem: MemoryModel, micro_batch: int, seq_len: int, shard_ranks: int,
                 checkpointing: bool, every: int = 1) -> int:
    tokens = micro_batch * seq_len
    loss = tokens * ((4 + mem.compute) * size.d_model + 13) \
        + (8 + mem.compute) * min(size.loss_chunk, tokens) * size.padded_vocab
    return (fixed_bytes(size, mem, shard_ranks) + tokens * activation_bytes_per_token(size, mem, checkpointing, every)
            + loss)


def usable_bytes(memory_gb: float) -> int:
    """The share of a GPU (or a CPU rank's share of the host) the plan may fill: 90% of what is
    left after 2 GiB (docstring)."""
    return int(0.9 * (memory_gb * 1e9 - 2 * GIB))
