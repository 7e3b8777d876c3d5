"""The Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", Sec. 3 and Fig. 3), with mamba-ssm 2.x's parameter names, shapes and initialisation
(`mamba_ssm/modules/mamba_simple.py`, class `Mamba`), computed by the pure-PyTorch ops.

Per token, with E = d_inner = expand * d_model, N = d_state, R = dt_rank:

    x, z   = in_proj(hidden)                      (E each; z is the gate)
    x      = silu(causal_conv1d(x))               depthwise, d_conv taps
    dt,B,C = x_proj(x)                            (R, N, N): the input-dependent "selection"
    dt     = dt_proj.weight @ dt                  (E); its bias is added inside the scan
    y      = selective_scan(x, dt, A = -exp(A_log), B, C, D, z,
                            delta_bias = dt_proj.bias, delta_softplus = True)
    out    = out_proj(y)

which is mamba-ssm's `Mamba.forward` slow path (the one without the fused CUDA kernel). The one
addition is `reset`: document starts inside a packed window, where the conv and the SSM state
restart from zero (document isolation). On CUDA with mamba-ssm importable the mixer runs on its
kernels (ops/kernels.py): the fused mamba_inner_fn when no document starts are given; with them
the conv and the scan separately (the scan's resets via ops.kernels.scan_with_resets).

`step` is the same mixer for one token with the conv and SSM states carried (mamba-ssm's
`Mamba.step`): recurrent inference in O(1) work per token (model/generation.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mamba.model.mixer_init import init_dt_bias, state_options
from mamba.model.ops import kernels
from mamba.model.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from mamba.model.ops.selective_scan import selective_scan


def resolve_dt_rank(d_model: int, dt_rank: int | str) -> int:
    """The rank R of the dt projection; "auto" is mamba-ssm's ceil(d_model / 16)."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


class Mamba(nn.Module):
    """Mamba-1 mixer: (batch, L, d_model) -> (batch, L, d_model).

    Parameters (mamba-ssm names): in_proj.weight (2E, d), conv1d.weight (E, 1, d_conv),
    conv1d.bias (E), x_proj.weight (R + 2N, E), dt_proj.weight (E, R), dt_proj.bias (E),
    A_log (E, N), D (E), out_proj.weight (d, E). A_log, D and dt_proj.bias are float32 and
    `_no_weight_decay`.

    Recurrent state (`allocate_inference_cache`, `step`): the conv state is the last d_conv
    inputs of x (batch, E, d_conv), the SSM state h (batch, E, N).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        kernels_mode: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = resolve_dt_rank(d_model, dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.kernels_mode = kernels_mode

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # Used only as the holder of the depthwise weight (E, 1, K) and bias, with nn.Conv1d's
        # default init as in mamba-ssm; causal_conv1d computes the convolution.
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
            bias=conv_bias, **factory,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # A_log and D stay float32 whatever the model dtype, as in mamba-ssm: A = -exp(A_log)
        # spans orders of magnitude, and the scan computes in float32 anyway.
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba-ssm's `Mamba.__init__` initialisation ("random" dt init, dt_scale = 1).

        Also safe after `to_empty()` from the meta device: it re-creates every value and the
        `_no_weight_decay` flags (which live on the Parameter objects that `to_empty` replaces).
        The LM's `init_weights` then applies mamba-ssm's `_init_weights` on top (out_proj rescale).
        """
        for linear in (self.in_proj, self.x_proj, self.out_proj):
            linear.reset_parameters()  # kaiming_uniform(a=sqrt(5)), nn.Linear's default
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)  # mamba-ssm `_init_weights`: Linear biases start at 0
        self.conv1d.reset_parameters()
        # dt_proj.weight ~ U(-R^-0.5, R^-0.5): keeps dt_proj's output O(1) at init.
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        init_dt_bias(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
        with torch.no_grad():
            # S4D-Real init: A[:, n] = -(n + 1) for every channel (Gu et al. 2022, "On the
            # Parameterization and Initialization of Diagonal State Space Models").
            n = torch.arange(1, self.d_state + 1, device=self.A_log.device, dtype=torch.float32)
            self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
            self.D.fill_(1.0)  # the skip connection starts as identity
        for p in (self.A_log, self.D, self.dt_proj.bias):
            p._no_weight_decay = True
        self.dt_proj.bias._no_reinit = True  # mamba-ssm's marker: `_init_weights` keeps this bias

    def forward(self, hidden_states: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (batch, L, d_model); reset (batch, L) bool, True at document starts."""
        xz = self.in_proj(hidden_states)  # (batch, L, 2E)
        A = -torch.exp(self.A_log.float())  # (E, N), negative: every decay exp(dt * A) <= 1
        use_cuda = kernels.use_cuda(self.kernels_mode, hidden_states, "selective scan")
        if use_cuda and reset is None:
            return kernels.mamba1_fused(
                xz.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A, self.D.float(),
                self.dt_proj.bias.float(),
            )
        # Keep time-major (batch, L, E) memory throughout; the ops take (batch, E, L) views of it,
        # the argument layout of mamba-ssm's kernels, without copying.
        x, z = xz.chunk(2, dim=-1)
        if use_cuda:
            seq_idx = kernels.seq_idx_from_reset(reset)
            x = kernels.conv1d_silu(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, seq_idx)
        else:
            x = F.silu(causal_conv1d(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, reset))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (batch, L, E); bias goes in as delta_bias
        args = (x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z.transpose(1, 2),
                self.dt_proj.bias.float())
        if use_cuda:
            y = kernels.selective_scan_with_resets(*args, reset)  # (batch, E, L)
        else:
            y = selective_scan(*args, delta_softplus=True, reset=reset)
        return self.out_proj(y.transpose(1, 2))

    def allocate_inference_cache(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (conv_state (batch, E, d_conv), ssm_state (batch, E, N)): an empty context, in at
        least float32 (mixer_init.state_options)."""
        options = state_options(self.in_proj.weight, device, dtype)
        return (torch.zeros(batch, self.d_inner, self.d_conv, **options),
                torch.zeros(batch, self.d_inner, self.d_state, **options))

    def step(self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model); updates both states in place.

        The per-token form of `forward` (the recurrence of ops/selective_scan.py), computed in the
        states' dtype; the projections run in the weights' dtype, as in `forward`.
        """
        dtype = conv_state.dtype
        x, z = self.in_proj(hidden).to(dtype).chunk(2, dim=-1)  # (batch, E) each
        x = F.silu(causal_conv1d_step(conv_state, x, self.conv1d.weight, self.conv1d.bias))
        x_dbl = self.x_proj(x.to(hidden.dtype)).to(dtype)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # A, D and the dt bias as the forward takes them: float32 (as mamba-ssm), then the state dtype.
        dt_bias = self.dt_proj.bias.float().to(dtype)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight.to(dtype), dt_bias))  # (batch, E)
        A = -torch.exp(self.A_log.float()).to(dtype)  # (E, N)
        # h = exp(dt A) h + dt B x;  y = <C, h> + D x;  y *= silu(z)
        ssm_state.mul_(torch.exp(dt[:, :, None] * A)).add_(dt[:, :, None] * x[:, :, None] * B[:, None, :])
        y = torch.einsum("ben,bn->be", ssm_state, C) + self.D.float().to(dtype) * x
        y = y * F.silu(z)
        return self.out_proj(y.to(hidden.dtype))
