"""The one place that decides between mamba-ssm's CUDA kernels and the pure-torch ops.

`model.kernels` (ModelConfig) picks the path:
  auto   the CUDA kernels when the tensors are on a GPU and mamba-ssm + causal-conv1d import;
         the torch ops otherwise;
  torch  always the torch ops (exact reference path, CPU or GPU);
  cuda   always the kernels; a clear error when they cannot be imported or the input is not on
         a GPU.
The imports are tried once, catching any exception (Triton raises RuntimeError, not ImportError,
on a machine without a driver), and the choice is logged once per path ("selective scan: ...").

Kernels used, with mamba-ssm 2.3.1 / causal-conv1d 1.5 signatures (the fused ones are what
mamba-ssm's own modules train with):
  mamba_inner_fn(xz (b, 2E, l), conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight,
      out_proj.weight, out_proj.bias, A, None, None, D, delta_bias=, delta_softplus=True)
      (Mamba-1, one autograd op from in_proj's output to out_proj's, recomputing the conv and
      delta in its backward): used when no document starts are given (document_isolation off, or
      no position_ids), since it has no reset.
  causal_conv1d_fn(x (b, d, l), weight (d, w), bias, seq_idx (b, l) int32, activation="silu") and
  selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus) (Mamba-1 with document
      starts): seq_idx resets the conv; it needs x channel-last (stride(1) == 1), i.e. a (b, d, l)
      view of (b, l, d)-contiguous memory, which is what the mixers hold. The scan has no reset
      and is called through `scan_with_resets` (below), which makes the decay into each
      document's first token exactly zero (a per-channel delta large enough that exp(delta * A)
      underflows, the input rescaled to match): exact isolation, at the cost of a few elementwise
      passes outside the fused kernel.
  mamba_split_conv1d_scan_combined(zxbcdt, conv1d.weight (d, w), conv1d.bias, dt_bias, A, D,
      chunk_size, seq_idx=, rmsnorm_weight=, rmsnorm_eps=, outproj_weight=, outproj_bias=,
      headdim=, ngroups=, norm_before_gate=False) (Mamba-2, in_proj's output to out_proj's in one
      op, mamba-ssm's "mem-efficient path"): state reset at seq_idx changes, exact isolation.
  rms_norm_fn(x, weight, None, residual=, prenorm=, residual_in_fp32=, eps=) (mamba_ssm.ops.triton.
      layer_norm): each block's residual add + RMSNorm, and the final one, in one kernel.
"""
from __future__ import annotations

import functools
import logging
from typing import get_args

import torch
import torch.nn.functional as F

from mamba.config.schema import KernelMode

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[dict | None, str]:
    """Import the kernels once: (dict of functions or None, reason when unavailable)."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
    except Exception as exc:  # noqa: BLE001 - Triton/driver problems raise more than ImportError
        return None, f"{type(exc).__name__}: {exc}"
    fns = {
        "causal_conv1d_fn": causal_conv1d_fn, "selective_scan_fn": selective_scan_fn,
        "mamba_inner_fn": mamba_inner_fn, "rms_norm_fn": rms_norm_fn,
        "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined,
    }
    return fns, ""


# The kernel families, each imported by its own probe: "mamba-ssm" (Mamba-1/2, any 2.x with
# causal-conv1d) and "mamba3" (mamba-ssm >= 2.3.2's Mamba-3 kernel, so that Mamba-1/2 keep their
# kernels with 2.3.1), "mamba3-mimo" (its MIMO kernel, which also needs tilelang). Per family: (probe name, what `kernels: cuda` needs, how to install it).
# The probe is looked up by name at call time, so tests can stand one in.
FAMILIES = {
    "mamba-ssm": ("_probe", "model.kernels='cuda' but mamba-ssm's CUDA kernels",
                  "Install mamba-ssm and causal-conv1d on a CUDA machine (pip install mamba-ssm causal-conv1d)"),
    "mamba3": ("_probe_mamba3", "model.kernels='cuda' with ssm_layer mamba3 needs mamba-ssm >= 2.3.2's Mamba-3 "
               "kernel, which", "Install it on a CUDA machine (pip install 'mamba-ssm>=2.3.2')"),
    "mamba3-mimo": ("_probe_mamba3_mimo", "model.kernels='cuda' with ssm_layer mamba3 and is_mimo needs mamba-ssm "
                    ">= 2.3.2's TileLang MIMO kernel, which",
                    "Install it on a CUDA machine (pip install 'mamba-ssm>=2.3.2' tilelang==0.1.8)"),
}


def family_of(ssm_layer: str, is_mimo: bool = False) -> str:
    """The kernel family (FAMILIES) a mixer of `ssm_layer` runs on."""
    if ssm_layer != "mamba3":
        return "mamba-ssm"
    return "mamba3-mimo" if is_mimo else "mamba3"


def cuda_kernels_available(family: str = "mamba-ssm") -> tuple[bool, str]:
    """(whether the kernels of `family` (FAMILIES) import, the reason if not)."""
    fns, reason = globals()[FAMILIES[family][0]]()
    return fns is not None, reason


def require_cuda_kernels(family: str = "mamba-ssm") -> None:
    """Raise a RuntimeError explaining how to fix it when `kernels: cuda` cannot work here."""
    ok, reason = cuda_kernels_available(family)
    if not ok:
        _, what, install = FAMILIES[family]
        raise RuntimeError(f"{what} cannot be imported ({reason}). {install}, or set model.kernels to "
                           "'auto' or 'torch'.")


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def check_mode(mode: str) -> None:
    """Raise a ValueError unless `mode` is one of KernelMode's values (mamba/config/schema.py)."""
    if mode not in get_args(KernelMode):
        raise ValueError(f"model.kernels={mode!r}: choose one of {get_args(KernelMode)}")


def use_cuda(mode: str, tensor: torch.Tensor, op: str, family: str = "mamba-ssm") -> bool:
    """Whether `op` ("selective scan", "ssd scan", "add+norm", "mamba3 scan", ...) runs on the kernels
    of `family` for this input; logs the choice once per op."""
    check_mode(mode)
    if mode == "cuda":
        require_cuda_kernels(family)
        if not tensor.is_cuda:
            raise RuntimeError(
                f"model.kernels='cuda' but the {op} input is on {tensor.device}: the kernels need "
                "CUDA tensors. Move the model to a GPU or set model.kernels to 'auto' or 'torch'."
            )
    use = mode != "torch" and tensor.is_cuda and cuda_kernels_available(family)[0]
    _log_once(f"{op}: {'mamba-ssm CUDA kernel' if use else 'torch'} (model.kernels={mode})")
    return use


def seq_idx_from_reset(reset: torch.Tensor) -> torch.Tensor:
    """(batch, L) bool document starts -> (batch, L) int32 document index, mamba-ssm's seq_idx."""
    return torch.cumsum(reset.to(torch.int32), dim=-1, dtype=torch.int32)


def conv1d_silu(x, weight, bias, seq_idx):
    """silu(causal depthwise conv) on the kernel. x (b, d, l) channel-last view; weight (d, 1, w)."""
    fn = _probe()[0]["causal_conv1d_fn"]
    if x.stride(1) != 1:  # seq_idx needs channel-last memory
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return fn(x, weight[:, 0, :], bias, seq_idx=seq_idx, activation="silu")


# exp(-RESET_DECAY_EXPONENT) underflows to exactly 0 in float32 (whose smallest subnormal is
# e^-103.3) with margin for a bf16-rounded delta; see scan_with_resets.
RESET_DECAY_EXPONENT = 200.0


def scan_with_resets(scan, u, delta, A, B, C, D, z, delta_bias, reset):
    """Exact document resets on a scan that has none (mamba-ssm's `selective_scan_fn`).

    `scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)` must have the semantics of
    ops/selective_scan.py's selective_scan_ref without `reset`. Arguments as selective_scan_ref with delta_softplus=True; reset
    (batch, L) bool. At a document start t the reset recurrence is h_t = delta_t B_t u_t (the old
    state dropped). The scan is given, at such t only,
        delta'_t = RESET_DECAY_EXPONENT / min_n |A[d, n]|   per channel d, so that every decay
                   exp(delta'_t A[d, n]) <= exp(-RESET_DECAY_EXPONENT) is exactly 0 in float32,
        u'_t     = u_t * delta_t / delta'_t               so that delta'_t B_t u'_t = delta_t B_t u_t,
    which is that recurrence. u enters the scan's output through D u too, so D and the z gate
    are applied here, outside the scan, with the true u. Gradients are exact as well: autograd
    carries u' and delta back to u and delta, the kernel's dA and ddelta terms at t multiply the
    zero decay (mamba-ssm's backward recomputes the decayed state as h_t - delta B u, exactly 0
    there), and its reverse scan stops at the zero decay. The cost is ~6 elementwise passes over
    (batch, D, L) outside the fused kernel. Tested against selective_scan_ref(reset=...).
    """
    cdtype = torch.float64 if u.dtype == torch.float64 else torch.float32  # the kernel computes in float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        delta = F.softplus(delta.to(cdtype) + delta_bias.to(cdtype)[:, None])  # (batch, D, L), as the kernel
        # (D,): the scale at which even the slowest decay of channel d vanishes. A constant for
        # autograd: the result does not depend on it, and its gradient would only add rounding.
        slowest = (-A.detach().to(cdtype)).amin(dim=1).clamp(min=1e-20)
        vanish = (RESET_DECAY_EXPONENT / slowest)[None, :, None]  # (1, D, 1)
        at_reset = reset[:, None, :]  # (batch, 1, L)
        scan_delta = torch.where(at_reset, vanish, delta).to(u.dtype)
        scan_u = torch.where(at_reset, u.to(cdtype) * (delta / vanish), u.to(cdtype)).to(u.dtype)
    y = scan(scan_u, scan_delta, A, B, C, None, None, None, False)  # (batch, D, L), no D, no gate
    with torch.autocast(device_type=u.device.type, enabled=False):
        y = y.to(cdtype)
        if D is not None:
            y = y + u.to(cdtype) * D.to(cdtype)[:, None]
        if z is not None:
            y = y * F.silu(z.to(cdtype))
    return y.to(u.dtype)


def selective_scan_with_resets(u, delta, A, B, C, D, z, delta_bias, reset):
    """mamba-ssm's selective scan (delta_softplus=True) with the state restarting from zero at
    reset (batch, L) bool document starts (module doc); shapes as ops.selective_scan."""
    return scan_with_resets(_probe()[0]["selective_scan_fn"], u, delta, A, B, C, D, z, delta_bias, reset)


def mamba1_fused(xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_weight, out_bias, A, D,
                 delta_bias):
    """Mamba-1 mixer from in_proj's output xz (b, 2E, l) to out_proj's output (b, l, d_model), one
    document per row (no reset). Weights as the Mamba module holds them; A (E, N) = -exp(A_log)."""
    return _probe()[0]["mamba_inner_fn"](
        xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_weight, out_bias, A, None, None, D,
        delta_bias=delta_bias, delta_softplus=True,
    )


def mamba2_fused(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, seq_idx, norm_weight, norm_eps,
                 out_weight, out_bias, headdim, ngroups):
    """Mamba-2 mixer from in_proj's output zxbcdt (b, l, 2E + 2GN + H) to out_proj's output
    (b, l, d_model): conv, SSD scan with resets at seq_idx changes, gated RMSNorm (gate after the
    norm's input, norm_before_gate=False), out_proj. D (H,), one skip weight per head."""
    return _probe()[0]["mamba_split_conv1d_scan_combined"](
        zxbcdt, conv_weight[:, 0, :], conv_bias, dt_bias, A, D, chunk_size, seq_idx=seq_idx,
        rmsnorm_weight=norm_weight, rmsnorm_eps=norm_eps, outproj_weight=out_weight, outproj_bias=out_bias,
        headdim=headdim, ngroups=ngroups, norm_before_gate=False,
    )


def add_rms_norm(hidden, residual, weight, eps, residual_in_fp32, prenorm=True):
    """residual' = hidden + residual (just hidden when residual is None), normed = RMSNorm(residual')
    in one kernel. Returns (normed, residual') with prenorm, else normed; residual' is float32 with
    residual_in_fp32. hidden, residual (batch, L, d_model)."""
    return _probe()[0]["rms_norm_fn"](
        hidden, weight, None, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32, eps=eps,
    )


@functools.lru_cache(maxsize=None)
def _probe_flash_attention():
    """flash-attn's varlen kernel, imported once (None when it cannot be: not installed, no driver)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - as _probe
        return None
    return flash_attn_varlen_func


def use_flash_attention(mode: str, q: torch.Tensor) -> bool:
    """Whether attention runs on flash-attn's varlen kernel: model.kernels auto or cuda, q on a GPU
    in fp16/bf16 (the dtypes the kernel has) and flash-attn importable. It is an optional extra
    beyond mamba-ssm, so `cuda` falls back to torch's SDPA (logged) rather than refusing."""
    check_mode(mode)
    use = (mode != "torch" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
           and _probe_flash_attention() is not None)
    _log_once(f"attention: {'flash-attn varlen kernel' if use else 'torch SDPA'} (model.kernels={mode})")
    return use


def cu_seqlens_from_reset(reset: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """The (batch, L) window as one row of batch * L tokens cut at every row start and document
    start (reset (batch, L) bool or None): int32 (n_pieces + 1,) offsets, varlen kernels' cu_seqlens."""
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if reset is not None:
        starts |= reset
    offsets = torch.nonzero(starts.flatten()).flatten()
    return torch.cat((offsets, offsets.new_tensor([batch * length]))).to(torch.int32)


def flash_attention_varlen(q, k, v, reset, scale):
    """Causal attention inside each document on flash-attn's varlen kernel: the (batch, L) window
    flattened to one sequence of batch * L tokens, cut at every document start and row start
    (cu_seqlens, int32 (n_docs + 1,) offsets). q (batch, L, h, D), k and v (batch, L, h_kv, D)."""
    batch, length = q.shape[:2]
    cu_seqlens = cu_seqlens_from_reset(reset, batch, length, q.device)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = _probe_flash_attention()(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens,
                                   max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    return out.unflatten(0, (batch, length))


# Mamba-3 (mamba-ssm >= 2.3.2). A probe of its own: Mamba-1/2 keep their kernels with mamba-ssm
# 2.3.1, which has no Mamba-3 module, and a Mamba-3 model with 2.3.1 falls back to torch under auto.
#   mamba3_siso_combined(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=, Z=, chunk_size=,
#       cu_seqlens=) (ops/triton/mamba3/mamba3_siso_combined.py): Q = C, K = B (b, l, G, N), V = x
#       (b, l, H, P), ADT = A dt, DT, Trap (pre-sigmoid) (b, H, l), Q_bias, K_bias (H, N), Angles
#       (b, l, H, S) (pre-tanh), D (H,), Z (b, l, H, P) gate; casts Q, K, V, Z to bf16 inside.
#       Document starts become cu_seqlens over the batch flattened to one row (batch must be 1
#       there), each document starting from zero states: exact isolation.


@functools.lru_cache(maxsize=None)
def _probe_mamba3() -> tuple[dict | None, str]:
    """Import mamba-ssm's Mamba-3 SISO kernel once: (dict of functions or None, reason when unavailable)."""
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
    except Exception as exc:  # noqa: BLE001 - as _probe
        return None, f"{type(exc).__name__}: {exc}"
    return {"mamba3_siso_combined": mamba3_siso_combined}, ""


def mamba3_siso(C, B, x, adt, dt, trap, angles, C_bias, B_bias, D, z, chunk_size, reset):
    """The Mamba-3 SISO scan on mamba-ssm's kernel; arguments and result as ops/mamba3_scan.py's
    mamba3_scan_chunked (C, B (b, L, G, N), x (b, L, H, P), adt, dt, trap (b, L, H), angles
    (b, L, S), biases (H, N), D (H,), z (b, L, H, P) or None, reset (b, L) bool or None)."""
    (C, B, xk, ADT, DT, Trap, Angles, Z), varlen = _kernel_inputs(C, B, x, adt, dt, trap, angles, z, reset)
    y = _probe_mamba3()[0]["mamba3_siso_combined"](C, B, xk, ADT, DT, Trap, C_bias, B_bias, Angles, D=D, Z=Z,
                                                   chunk_size=chunk_size, **varlen)
    return y.reshape(*x.shape[:2], *y.shape[2:])


def _kernel_inputs(C, B, x, adt, dt, trap, angles, z, reset):
    """What both Mamba-3 kernels take per token, from mamba3_scan_chunked's arguments: C, B, x, z as
    they are, ADT, DT, Trap as (b, H, L), angles per head in (at least) float32, as mamba-ssm's
    Mamba3.forward hands them over. With document starts all of them become one row of b * L
    tokens, cut by the cu_seqlens in the returned keywords (else none): (tensors, keywords)."""
    batch, length, nheads, headdim = x.shape
    _check_mamba3_shapes(B.shape[-1], headdim)
    angles = angles.unsqueeze(-2).expand(-1, -1, nheads, -1).to(torch.promote_types(angles.dtype, torch.float32))
    tensors, varlen = (C, B, x, adt, dt, trap, angles, z), {}
    if reset is not None:  # (b, L, ...) -> (1, b * L, ...)
        tensors = tuple(None if t is None else t.flatten(0, 1).unsqueeze(0) for t in tensors)
        varlen = {"cu_seqlens": cu_seqlens_from_reset(reset, batch, length, x.device)}
    C, B, x, adt, dt, trap, angles, z = tensors
    return (C, B, x, adt.transpose(1, 2), dt.transpose(1, 2), trap.transpose(1, 2), angles, z), varlen


def _check_mamba3_shapes(dstate: int, headdim: int) -> None:
    """Refuse, naming the key, what mamba-ssm's Mamba-3 kernels cannot tile."""
    for name, value in (("model.d_state", dstate), ("model.headdim", headdim)):
        if value & (value - 1):
            raise ValueError(f"{name}={value}: mamba-ssm's Mamba-3 kernels need powers of two (their tile "
                             "blocks); choose one, or set model.kernels='torch'")


# Mamba-3 MIMO (mamba-ssm >= 2.3.2 with tilelang):
#   mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
#       chunk_size, rotary_dim_divisor, dtype, cu_seqlens=) (ops/tilelang/mamba3/mamba3_mimo.py):
#       Q = C, K = B (b, l, R, G, N), V = x (b, l, H, P), biases (H, R, N), MIMO_* (H, R, P) (no
#       MIMO_Out: the R outputs come back, (b, l, R, H, P)); the others as the SISO kernel's.
#       rotary_dim_divisor = N / S (4 for rope_fraction 0.5, 2 for 1.0).


@functools.lru_cache(maxsize=None)
def _probe_mamba3_mimo() -> tuple[dict | None, str]:
    """Import mamba-ssm's Mamba-3 MIMO kernel once: (dict of functions or None, reason when unavailable)."""
    try:
        from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo import mamba3_mimo
    except Exception as exc:  # noqa: BLE001 - as _probe
        return None, f"{type(exc).__name__}: {exc}"
    return {"mamba3_mimo": mamba3_mimo}, ""


def mamba3_mimo(C, B, x, adt, dt, trap, angles, C_bias, B_bias, D, z, chunk_size, reset, mimo_x, mimo_z=None,
                mimo_o=None):
    """The Mamba-3 MIMO scan on mamba-ssm's kernel; arguments and result as ops/mamba3_scan.py's
    mamba3_scan_chunked with mimo_x (C, B (b, L, R, G, N), biases (H, R, N), mimo_* (H, R, P));
    document starts as for mamba3_siso."""
    divisor = B.shape[-1] // angles.shape[-1]
    (C, B, xk, ADT, DT, Trap, Angles, Z), varlen = _kernel_inputs(C, B, x, adt, dt, trap, angles, z, reset)
    y = _probe_mamba3_mimo()[0]["mamba3_mimo"](C, B, xk, ADT, DT, Trap, C_bias, B_bias, mimo_x, mimo_z, mimo_o,
                                               Angles, D, Z, chunk_size=chunk_size, rotary_dim_divisor=divisor,
                                               dtype=x.dtype, **varlen)
    return y.reshape(*x.shape[:2], *y.shape[2:])
