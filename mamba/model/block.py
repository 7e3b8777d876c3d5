"""One residual layer of the Mamba LM: add the residual, normalise, mix (then, in hybrids with an
MLP, add, normalise, MLP).

This is mamba-ssm's `Block` (`mamba_ssm/modules/block.py`). On CUDA with mamba-ssm importable, each
add and norm runs as its fused kernel (ops/kernels.py); otherwise as written here:

    residual = hidden + residual          (just hidden in the first layer)
    hidden   = mixer(norm(residual))
    with an MLP (d_intermediate > 0):
    residual = hidden + residual
    hidden   = mlp(norm2(residual))

The "prenorm residual" form hands (hidden, residual) from block to block instead of adding the
branch's output back at the end of each block; the final `norm_f(hidden + residual)` of the
backbone closes the stream. Mathematically it equals the usual x + mixer(norm(x)) per layer; it
exists so that the add and the next norm can be fused into one kernel (mamba-ssm) and, here, so
that the residual stream can be kept in float32 while the blocks compute in a lower precision.

`step` is the same block for one token (hidden (batch, d_model)), through the mixer's `step` and
the torch add + norm (`add_norm`, shared with `forward`), for recurrent inference.
"""
from __future__ import annotations

import torch
from torch import nn

from mamba.model.ops import kernels


class Block(nn.Module):
    """forward(hidden_states, residual=None, reset=None) -> (hidden_states, residual).

    hidden_states, residual: (batch, L, d_model); reset: (batch, L) bool document starts, handed
    to the mixer. `residual_in_fp32` keeps the residual stream in (at least) float32 under bf16
    training, as mamba-ssm's default LMs do: the sum over many layers would otherwise round away
    the small updates of each one. `norm` is an RMSNorm (the fused kernel's norm).
    """

    def __init__(self, d_model: int, mixer: nn.Module, norm: nn.Module, residual_in_fp32: bool = True,
                 kernels_mode: str = "auto", mlp: nn.Module | None = None, norm2: nn.Module | None = None):
        super().__init__()
        if (mlp is None) != (norm2 is None):
            raise ValueError("Block: an MLP needs its own norm (norm2), and norm2 exists only with an MLP")
        self.d_model = d_model
        self.residual_in_fp32 = residual_in_fp32
        self.kernels_mode = kernels_mode
        self.norm = norm
        self.mixer = mixer
        self.norm2 = norm2
        self.mlp = mlp

    def add_norm(self, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                 norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch prenorm residual: (norm(hidden + residual), hidden + residual), any leading
        shape; `norm` defaults to the mixer's (self.norm)."""
        norm = self.norm if norm is None else norm
        residual = hidden_states if residual is None else hidden_states + residual
        normed = norm(residual.to(dtype=norm.weight.dtype))
        if self.residual_in_fp32:
            # mamba-ssm casts to float32; "at least" float32 also lets float64 tests stay exact.
            residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
        return normed, residual

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual = self._add_norm(hidden_states, residual, self.norm)
        if residual is hidden_states:
            # First layer, fp32 input: the stream would leave as the block's own input, which FSDP2
            # hands the block as a view (its post-backward hook is an autograd Function returning
            # its inputs). An in-place op on a unit's view output skips the unit's pre-backward
            # hook, and newer torch warns of it at every such unit; a copy (one (batch, L, d_model)
            # tensor per forward) makes the residual the block's own.
            residual = residual.clone()
        hidden_states = self.mixer(normed, reset=reset)
        if self.mlp is None:
            return hidden_states, residual
        normed, residual = self._add_norm(hidden_states, residual, self.norm2)
        return self.mlp(normed), residual

    def _add_norm(self, hidden_states, residual, norm):
        """add_norm, as mamba-ssm's fused kernel when it applies."""
        if kernels.use_cuda(self.kernels_mode, hidden_states, "add+norm"):
            return kernels.add_rms_norm(hidden_states, residual, norm.weight, norm.eps, self.residual_in_fp32)
        return self.add_norm(hidden_states, residual, norm)

    def step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None,
             cache: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: hidden_states, residual (batch, d_model); cache the mixer's state tuple from
        its `allocate_inference_cache`, updated in place. Always the torch add + norm."""
        normed, residual = self.add_norm(hidden_states, residual)
        hidden_states = self.mixer.step(normed, *cache)
        if self.mlp is None:
            return hidden_states, residual
        normed, residual = self.add_norm(hidden_states, residual, self.norm2)
        return self.mlp(normed), residual
