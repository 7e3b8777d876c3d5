"""The gated MLP of hybrid models: mamba-ssm's `GatedMLP` (`mamba_ssm/modules/mlp.py`), the
SwiGLU feed-forward of Shazeer 2020 ("GLU Variants Improve Transformer", eq. (6)) without biases.

    value, gate = fc1(x)                (batch, L, 2I): one matmul, value first
    out         = fc2(value * silu(gate))

I = d_intermediate rounded up to a multiple of MLP_MULTIPLE, as mamba-ssm rounds it (so a
mamba-ssm config with d_intermediate = 1000 gets the same 1024-wide layers here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MLP_MULTIPLE = 128  # mamba-ssm GatedMLP's multiple_of default


def mlp_width(d_intermediate: int) -> int:
    """The hidden width I that a d_intermediate asks for (rounded up to MLP_MULTIPLE)."""
    return -(-d_intermediate // MLP_MULTIPLE) * MLP_MULTIPLE


class GatedMLP(nn.Module):
    """(batch, L, d_model) -> (batch, L, d_model). Parameters (mamba-ssm names): fc1.weight
    (2I, d_model), rows [value; gate]; fc2.weight (d_model, I)."""

    def __init__(self, d_model: int, d_intermediate: int, device=None, dtype=None):
        super().__init__()
        self.hidden = mlp_width(d_intermediate)
        self.fc1 = nn.Linear(d_model, 2 * self.hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(self.hidden, d_model, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """nn.Linear's default (kaiming_uniform(a=sqrt(5))), as mamba-ssm; the LM rescales fc2."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))
