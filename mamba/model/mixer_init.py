"""Initialisation shared by the Mamba-1 and Mamba-2 mixers (mamba1.py, mamba2.py): of their
parameters, and of their recurrent state for inference.

Both mixers draw their dt bias the same way (mamba-ssm 2.x, `Mamba.__init__` and
`Mamba2.__init__`), Mamba-1 with one value per channel, Mamba-2 with one per head; the rest of
each mixer's init is its own.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """Fill a dt bias (one value per channel or head) as mamba-ssm does for Mamba-1 and Mamba-2:
    dt = exp(U(log dt_min, log dt_max)), floored, stored as softplus^-1(dt) so that
    softplus(dt_input + bias) starts near dt (Gu & Dao 2023, Sec. 3.6 / App. E.2)."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    u = torch.rand(bias.shape, device=bias.device, dtype=torch.float32)
    dt = torch.exp(u * (hi - lo) + lo).clamp(min=floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


def state_options(weight: torch.Tensor, device=None, dtype=None) -> dict:
    """device and dtype for a mixer's zero inference state (`allocate_inference_cache`): by default
    the weights'. The states accumulate over the whole context, so the dtype is at least float32
    (promote_types(dtype, float32)): a bf16 model still steps with float32 states."""
    dtype = weight.dtype if dtype is None else dtype
    return {"device": weight.device if device is None else device,
            "dtype": torch.promote_types(dtype, torch.float32)}
