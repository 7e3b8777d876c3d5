"""The one place that decides between mamba-ssm's CUDA kernels and the pure-torch ops.

`model.kernels` (ModelConfig) picks the path:
  auto   the CUDA kernels when the tensors are on a GPU and mamba-ssm + causal-conv1d import;
         the torch ops otherwise;
  torch  always the torch ops (exact reference path, CPU or GPU);
  cuda   always the kernels; a clear error when they cannot be imported or the input is not on
         a GPU.
The imports are tried once, catching any exception (Triton raises RuntimeError, not ImportError,
on a machine without a driver), and the choice is logged once per path ("selective scan: ...").

Kernels used, with mamba-ssm 2.3.1 / causal-conv1d 1.5 signatures:
  causal_conv1d_fn(x (b, d, l), weight (d, w), bias, seq_idx (b, l) int32, activation="silu"):
      seq_idx resets the conv at document starts; it needs x channel-last (stride(1) == 1), i.e.
      a (b, d, l) view of (b, l, d)-contiguous memory, which is what the mixers hold.
  selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus) (Mamba-1): it has no
      state reset. With document starts it is called through ops.selective_scan.scan_with_resets,
      which makes the decay into each document's first token exactly zero (a per-channel delta
      large enough that exp(delta * A) underflows, the input rescaled to match): exact isolation,
      at the cost of a few elementwise passes outside the fused kernel.
  mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, dt_bias=, dt_softplus=, seq_idx=)
      (Mamba-2): state reset at seq_idx changes, exact isolation.
  rmsnorm_fn(x, weight, None, z=, eps=, group_size=, norm_before_gate=False) (Mamba-2 gated norm).
"""
from __future__ import annotations

import functools
import logging

import torch

from mamba.model.ops.selective_scan import scan_with_resets

log = logging.getLogger(__name__)

KERNEL_MODES = ("auto", "torch", "cuda")


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[dict | None, str]:
    """Import the kernels once: (dict of functions or None, reason when unavailable)."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:  # noqa: BLE001 - Triton/driver problems raise more than ImportError
        return None, f"{type(exc).__name__}: {exc}"
    fns = {
        "causal_conv1d_fn": causal_conv1d_fn, "selective_scan_fn": selective_scan_fn,
        "rmsnorm_fn": rmsnorm_fn, "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
    }
    return fns, ""


def cuda_kernels_available() -> tuple[bool, str]:
    """(whether mamba-ssm's and causal-conv1d's kernels import, the reason if not)."""
    fns, reason = _probe()
    return fns is not None, reason


def require_cuda_kernels() -> None:
    """Raise a RuntimeError explaining how to fix it when `kernels: cuda` cannot work here."""
    ok, reason = cuda_kernels_available()
    if not ok:
        raise RuntimeError(
            f"model.kernels='cuda' but mamba-ssm's CUDA kernels cannot be imported ({reason}). "
            "Install mamba-ssm and causal-conv1d on a CUDA machine (pip install mamba-ssm "
            "causal-conv1d), or set model.kernels to 'auto' or 'torch'."
        )


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.info(message)


def use_cuda(mode: str, tensor: torch.Tensor, op: str) -> bool:
    """Whether `op` ("selective scan", "ssd scan") runs on the kernels for this input; logs once."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"model.kernels={mode!r}: choose one of {KERNEL_MODES}")
    if mode == "cuda":
        require_cuda_kernels()
        if not tensor.is_cuda:
            raise RuntimeError(
                f"model.kernels='cuda' but the {op} input is on {tensor.device}: the kernels need "
                "CUDA tensors. Move the model to a GPU or set model.kernels to 'auto' or 'torch'."
            )
    use = mode != "torch" and tensor.is_cuda and cuda_kernels_available()[0]
    _log_once(f"{op}: {'mamba-ssm CUDA kernel' if use else 'torch chunked'} (model.kernels={mode})")
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


def selective_scan(u, delta, A, B, C, D, z, delta_bias, reset=None):
    """mamba-ssm's selective scan (delta_softplus=True); shapes as ops.selective_scan. reset
    (batch, L) bool document starts, where the state restarts from zero (module doc)."""
    fn = _probe()[0]["selective_scan_fn"]
    if reset is None:
        return fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True)
    return scan_with_resets(fn, u, delta, A, B, C, D, z, delta_bias, reset)


def ssd_scan(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx):
    """mamba-ssm's chunked SSD scan (dt_softplus=True); shapes as ops.ssd.ssd_chunked."""
    return _probe()[0]["mamba_chunk_scan_combined"](
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx,
    )


def rms_norm_gated(x, z, weight, eps, group_size):
    """mamba-ssm's fused rmsnorm(x * silu(z)) * weight over groups (norm_before_gate=False)."""
    return _probe()[0]["rmsnorm_fn"](
        x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False,
    )
