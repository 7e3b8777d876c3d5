"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), as Mamba uses it.

    y = x / sqrt(mean(x^2 over the last axis) + eps) * weight

Matches mamba-ssm's `RMSNorm` (ops/triton/layer_norm.py, `rms_norm_ref` with upcast): the
statistics and the product with the weight are computed in at least float32, and the result
is cast back to the input's dtype. No bias; the weight starts at one.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises the last axis of (..., hidden_size) inputs; learnable per-channel `weight`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics even under bf16 (sums of squares lose precision in 8 mantissa bits);
        # float64 inputs stay float64 so the tests can compare at float64 precision.
        compute = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(compute)
        rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return (xf * rstd * self.weight.to(compute)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """The gated, grouped RMSNorm of mamba-ssm (`ops/triton/layernorm_gated.py`, `RMSNormGated`,
    `rms_norm_ref`), statistics taken over each group of `group_size` channels; x, z (..., hidden_size):
        norm_before_gate=False (Mamba-2):                y = rmsnorm(x * silu(z)) * weight
        norm_before_gate=True  (Mamba-3 is_outproj_norm): y = rmsnorm(x) * weight * silu(z)

    The group is what makes the norm independent of tensor-parallel sharding in mamba-ssm
    (group_size = d_inner / ngroups); float32 statistics as in RMSNorm above.
    """

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if hidden_size % group_size:
            raise ValueError(f"RMSNormGated: group_size {group_size} must divide hidden_size {hidden_size}")
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        gate = torch.nn.functional.silu(z.to(compute))
        xf = x.to(compute) if self.norm_before_gate else x.to(compute) * gate
        groups = xf.unflatten(-1, (-1, self.group_size))  # (..., hidden / group_size, group_size)
        rstd = torch.rsqrt(groups.square().mean(dim=-1, keepdim=True) + self.eps)
        y = (groups * rstd).flatten(-2) * self.weight.to(compute)
        return (y * gate if self.norm_before_gate else y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, group_size={self.group_size}, eps={self.eps}"
