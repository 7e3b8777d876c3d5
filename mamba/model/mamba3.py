"""The Mamba-3 mixer, SISO and MIMO (Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using
State Space Principles", arXiv 2603.15569), with mamba-ssm 2.3.2's parameter names, shapes,
initialisation and defaults (`mamba_ssm/modules/mamba3.py`, class `Mamba3`).

Per token, with E = d_inner = expand * d_model, H = nheads = E / headdim, P = headdim,
G = ngroups (mamba-ssm's num_bc_heads), N = d_state, S = number of rotary angles, R = mimo_rank
(1 for SISO):

    z, x, B, C, dd_dt, dd_A, trap, angles = in_proj(u)   (E, E, RGN, RGN, H, H, H, S): one matmul
    A       = -max(softplus(dd_A), A_floor)            (H,) per token: a data-dependent decay rate
    dt      = softplus(dd_dt + dt_bias)                (H,)
    B, C    = RMSNorm(B), RMSNorm(C)                   each of the R x G groups over its N channels
    y       = mamba3_scan(C, B, x, A dt, dt, trap, angles, C_bias, B_bias, D, z[, mimo_x, mimo_z,
              mimo_o])                                 ops/mamba3_scan.py
    out     = out_proj(y)                              (is_outproj_norm: out_proj(rmsnorm(y) * silu(z)))

MIMO (the paper's "Multi-Input, Multi-Output" section) feeds the state R inputs per token, x scaled
per channel by mimo_x[r], with R pairs of B and C, and reads R outputs, each gated by silu(z *
mimo_z[r]) and summed with weights mimo_o[r]: R times the state FLOPs for the same state size,
which decoding (memory-bound) gets almost free. With is_outproj_norm the per-rank outputs are
normalised and gated here, then summed with mimo_o (mamba-ssm's order).

The scan (its module doc has every formula) is the paper's exponential-trapezoidal recurrence
("Exponential-Trapezoidal Discretization": h_t = alpha_t h_{t-1} + beta_t B_{t-1} x_{t-1}
+ gamma_t B_t x_t, lambda_t = sigmoid(trap_t) mixing the two ends of the interval) with the
complex-valued state of "Complex-Valued SSMs" written as a data-dependent rotary embedding of B and
C (angles accumulated as sum of pi tanh(angles) dt). The architecture changes of the paper's
"Mamba-3 Architecture" section are here too: B/C normalisation (B_norm, C_norm) and learned
per-head B/C biases (B_bias, C_bias, initialised to one), and no short causal convolution (the
trapezoid's two-token input term takes its place).

`reset` (batch, L) bool marks document starts: the state, the previous-token term and the rotary
angle restart there. On CUDA with mamba-ssm >= 2.3.2 importable the SISO scan runs on its Triton
kernel, MIMO on its TileLang kernel where tilelang is installed (ops/kernels.py), cut at the same
document starts. `step` is one token of the same recurrence with mamba-ssm's inference cache
(angle, SSM, B and x states), for generation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba.model.mixer_init import init_dt_bias, state_options
from mamba.model.ops import kernels
from mamba.model.ops.mamba3_scan import mamba3_scan_chunked, mamba3_step_update, zero_states
from mamba.model.ops.rms_norm import RMSNorm, RMSNormGated


def rope_angles(d_state: int, rope_fraction: float) -> int:
    """Number of rotary angles S (mamba-ssm's num_rope_angles): the first int(d_state *
    rope_fraction) channels, rounded down to even, form S rotated pairs."""
    rotated = int(d_state * rope_fraction)
    return (rotated - rotated % 2) // 2


class Mamba3(nn.Module):
    """Mamba-3 mixer: (batch, L, d_model) -> (batch, L, d_model).

    Parameters (mamba-ssm names): in_proj.weight (2E + 2RGN + 3H + S, d_model), dt_bias (H),
    B_bias (H, R, N), C_bias (H, R, N), B_norm.weight (N), C_norm.weight (N), D (H), with is_mimo
    mimo_x, mimo_z, mimo_o (H, R, P), norm.weight (E) with is_outproj_norm only, out_proj.weight
    (d_model, E); no biases on the projections. dt_bias, B_bias, C_bias, D and the mimo_* are
    float32 whatever the model dtype (as mamba-ssm creates them); dt_bias and D are
    `_no_weight_decay`. Inference state (`allocate_inference_cache`, `step`), mamba-ssm's order and
    shapes: angle_state (batch, H, S), ssm_state (batch, H, P, N), k_state (batch, R, H, N) (the
    previous token's rotated B), v_state (batch, H, P) (its x).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,
        is_outproj_norm: bool = False,
        is_mimo: bool = False,
        mimo_rank: int = 4,
        chunk_size: int = 64,
        kernels_mode: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if is_mimo and mimo_rank < 1:
            raise ValueError(f"Mamba3: mimo_rank={mimo_rank}: use a rank >= 1 (mamba-ssm's kernels are tested at 1, "
                             "2, 4 and 8)")
        if is_mimo and d_state % 2:
            raise ValueError(f"Mamba3: MIMO rotates channel i with i + d_state/2; d_state={d_state} must be even")
        self.is_mimo, self.mimo_rank = is_mimo, mimo_rank if is_mimo else 1
        self.d_model, self.d_state, self.expand = d_model, d_state, expand
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(
                f"Mamba3: d_inner = expand * d_model = {self.d_inner} must be a multiple of headdim={headdim}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Mamba3: nheads = {self.nheads} must be a multiple of ngroups={ngroups}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"Mamba3: rope_fraction={rope_fraction}: mamba-ssm allows 0.5 or 1.0")
        self.rope_fraction, self.num_rope_angles = rope_fraction, rope_angles(d_state, rope_fraction)
        if self.num_rope_angles < 1:
            raise ValueError(f"Mamba3: d_state={d_state} * rope_fraction={rope_fraction} leaves no rotary "
                             "angle; use d_state >= 4 (or >= 2 with rope_fraction 1.0)")
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_floor = dt_min, dt_max, dt_init_floor, A_floor
        self.is_outproj_norm, self.chunk_size = is_outproj_norm, chunk_size
        kernels.check_mode(kernels_mode)
        self.kernel_family = kernels.family_of("mamba3", is_mimo)
        if kernels_mode == "cuda":
            kernels.require_cuda_kernels(self.kernel_family)  # fail when the model is built, not at the first batch
        self.kernels_mode = kernels_mode

        H, N, G, R = self.nheads, d_state, ngroups, self.mimo_rank
        # in_proj output order [z, x, B, C, dd_dt, dd_A, trap, angles] (mamba-ssm).
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * R * G * N + 3 * H + self.num_rope_angles,
                                 bias=False, **factory)
        # float32 whatever the model dtype, as mamba-ssm creates them (the kernel reads them so).
        self.dt_bias = nn.Parameter(torch.empty(H, device=device))
        self.B_bias = nn.Parameter(torch.empty(H, R, N, device=device))
        self.C_bias = nn.Parameter(torch.empty(H, R, N, device=device))
        if is_mimo:  # x's per-rank input scaling, z's per-rank gate scaling, the outputs' weights
            self.mimo_x = nn.Parameter(torch.empty(H, R, headdim, device=device))
            self.mimo_z = nn.Parameter(torch.empty(H, R, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.empty(H, R, headdim, device=device))
        self.B_norm = RMSNorm(N, eps=1e-5, **factory)
        self.C_norm = RMSNorm(N, eps=1e-5, **factory)
        self.D = nn.Parameter(torch.empty(H, device=device))
        if is_outproj_norm:
            self.norm = RMSNormGated(self.d_inner, group_size=headdim, eps=1e-5, norm_before_gate=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba-ssm's `Mamba3.__init__` initialisation: nn.Linear's default for the projections,
        dt = exp(U(log dt_min, log dt_max)) floored and stored as softplus^-1(dt), B and C biases
        one, RMSNorm weights one, D one, mimo_x and mimo_o 1/R and mimo_z one (so that a fresh MIMO
        layer averages its R ranks). Safe after `to_empty()` from the meta device (re-creates
        every value and the `_no_weight_decay` flags). The LM's `init_weights` rescales out_proj."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        init_dt_bias(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)
        with torch.no_grad():
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
            self.D.fill_(1.0)
            if self.is_mimo:
                self.mimo_x.fill_(1.0 / self.mimo_rank)
                self.mimo_z.fill_(1.0)
                self.mimo_o.fill_(1.0 / self.mimo_rank)
        for norm in (self.B_norm, self.C_norm) + ((self.norm,) if self.is_outproj_norm else ()):
            norm.reset_parameters()
        for p in (self.dt_bias, self.D):
            p._no_weight_decay = True

    def _split(self, projected: torch.Tensor):
        """in_proj's output (..., 2E + 2RGN + 3H + S) -> z, x (.., H, P), B, C (.., G, N) (SISO) or
        (.., R, G, N) (MIMO: mamba-ssm's "(r g n)" order), dd_dt, dd_A, trap (.., H), angles (.., S)."""
        E, RGN, H = self.d_inner, self.mimo_rank * self.ngroups * self.d_state, self.nheads
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
            projected, [E, E, RGN, RGN, H, H, H, self.num_rope_angles], dim=-1)
        heads, groups = (H, self.headdim), (self.ngroups, self.d_state)
        if self.is_mimo:
            groups = (self.mimo_rank,) + groups
        return (z.unflatten(-1, heads), x.unflatten(-1, heads), B.unflatten(-1, groups), C.unflatten(-1, groups),
                dd_dt, dd_A, trap, angles)

    def _decay_and_step(self, dd_dt: torch.Tensor, dd_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A dt, dt), each (.., H), in at least float32: A = -max(softplus(dd_A), A_floor) < 0 is
        the data-dependent decay rate (mamba-ssm clamps A <= -A_floor so that some forgetting
        always remains), dt = softplus(dd_dt + dt_bias) the step (dt_bias float32, as mamba-ssm)."""
        A = torch.clamp(-F.softplus(dd_A.to(torch.promote_types(dd_A.dtype, torch.float32))), max=-self.A_floor)
        dt = F.softplus(dd_dt + self.dt_bias)
        return A * dt, dt

    def _scan_options(self) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
        """The scan's (C_bias, B_bias), (H, N) for SISO or (H, R, N), and its MIMO keywords: mimo_x,
        mimo_z (unused without z, handed over as mamba-ssm's Mamba3.forward does) and mimo_o, unless
        is_outproj_norm puts the norm between the ranks and their sum."""
        if not self.is_mimo:
            return (self.C_bias[:, 0], self.B_bias[:, 0]), {}
        return (self.C_bias, self.B_bias), {"mimo_x": self.mimo_x, "mimo_z": self.mimo_z,
                                            "mimo_o": None if self.is_outproj_norm else self.mimo_o}

    def _finish(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The scan's y (.., H, P) (or (.., R, H, P): MIMO with is_outproj_norm) -> (.., E), the
        input of out_proj: with is_outproj_norm, rmsnorm(y) * silu(z) per head, per rank for MIMO
        with z scaled by mimo_z[r], then the ranks summed with weights mimo_o[r]."""
        if not self.is_outproj_norm:
            return y.flatten(-2)
        if not self.is_mimo:
            return self.norm(y.flatten(-2), z.flatten(-2))
        gate = z.unsqueeze(-3) * self.mimo_z.transpose(0, 1)  # (.., R, H, P)
        y = self.norm(y.flatten(-2), gate.flatten(-2)).unflatten(-1, (self.nheads, self.headdim))
        return torch.einsum("...rhp,rhp->...hp", y, self.mimo_o.transpose(0, 1)).flatten(-2)

    def forward(self, hidden_states: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (batch, L, d_model); reset (batch, L) bool, True at document starts."""
        z, x, B, C, dd_dt, dd_A, trap, angles = self._split(self.in_proj(hidden_states))
        adt, dt = self._decay_and_step(dd_dt, dd_A)  # (batch, L, H)
        B, C = self.B_norm(B), self.C_norm(C)  # (batch, L, [R,] G, N), normalised over N
        biases, mimo = self._scan_options()
        gate = None if self.is_outproj_norm else z  # the scan gates y by silu(z) itself
        scan_args = (C, B, x, adt, dt, trap, angles, *biases, self.D, gate)
        if kernels.use_cuda(self.kernels_mode, hidden_states, f"{self.kernel_family} scan", self.kernel_family):
            kernel = kernels.mamba3_mimo if self.is_mimo else kernels.mamba3_siso
            y = kernel(*scan_args, chunk_size=self.chunk_size, reset=reset, **mimo)
        else:
            y = mamba3_scan_chunked(*scan_args, reset=reset, chunk_size=self.chunk_size, **mimo)
        return self.out_proj(self._finish(y, z).to(x.dtype))

    def allocate_inference_cache(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, ...]:
        """Zero (angle_state (batch, H, S), ssm_state (batch, H, P, N), k_state (batch, R, H, N),
        v_state (batch, H, P)): an empty context. All in at least float32 (mixer_init.state_options;
        mamba-ssm keeps k_state and v_state in the model dtype, which only rounds them)."""
        options = state_options(self.in_proj.weight, device, dtype)
        return zero_states(batch, self.nheads, self.headdim, self.d_state, self.num_rope_angles, self.mimo_rank,
                           **options)

    def step(self, hidden: torch.Tensor, angle_state: torch.Tensor, ssm_state: torch.Tensor,
             k_state: torch.Tensor, v_state: torch.Tensor) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model); updates the four states in place.

        The per-token form of `forward` (ops/mamba3_scan.py's mamba3_step_update), computed in the
        states' dtype; the projections, B/C norms and output norm run in the weights' dtype, as in
        `forward`.
        """
        dtype = ssm_state.dtype
        z, x, B, C, dd_dt, dd_A, trap, angles = self._split(self.in_proj(hidden))
        adt, dt = self._decay_and_step(dd_dt, dd_A)
        B, C = self.B_norm(B), self.C_norm(C)  # (batch, [R,] G, N)
        biases, mimo = self._scan_options()
        gate = None if self.is_outproj_norm else z
        states = (angle_state, ssm_state, k_state, v_state)
        y, new_states = mamba3_step_update(
            states, *(None if t is None else t.to(dtype) for t in (C, B, x, adt, dt, trap, angles, *biases, self.D,
                                                                   gate)),
            **{name: None if t is None else t.to(dtype) for name, t in mimo.items()})
        for state, new in zip(states, new_states):
            state.copy_(new)
        return self.out_proj(self._finish(y.to(hidden.dtype), z).to(hidden.dtype))
