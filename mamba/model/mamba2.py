"""The Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs", Sec. 7 and Fig. 6), with mamba-ssm
2.3.1's parameter names, shapes and initialisation (`mamba_ssm/modules/mamba2.py`, class `Mamba2`,
with d_ssm = d_inner, no MLP part, rmsnorm=True, norm_before_gate=False, D per head).

Per token, with E = d_inner = expand * d_model, H = nheads = E / headdim, G = ngroups, N = d_state:

    z, xBC, dt = in_proj(hidden)                  (E, E + 2 G N, H): all projections in one matmul
    xBC        = silu(causal_conv1d(xBC))         depthwise, d_conv taps, over x, B and C together
    x, B, C    = xBC                              x (H heads of headdim), B, C (G groups of N)
    y          = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, dt_softplus=True)   ops/ssd.py
    out        = out_proj(norm(y, z))             norm = rmsnorm(y * silu(z)) per group, * weight

`reset` (batch, L) bool marks document starts: conv and SSM state restart there. On CUDA with
mamba-ssm importable, the whole mixer after in_proj runs as its fused kernel (ops/kernels.py),
which restarts at the same document starts.

`step` is the same mixer for one token with the conv and SSM states carried (mamba-ssm's
`Mamba2.step`; the recurrence is Dao & Gu 2024, eq. (1) with a scalar A per head): recurrent
inference in O(1) work per token (model/generation.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba.model.mixer_init import init_dt_bias, state_options
from mamba.model.ops import kernels
from mamba.model.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from mamba.model.ops.rms_norm import RMSNormGated
from mamba.model.ops.ssd import ssd_chunked


class Mamba2(nn.Module):
    """Mamba-2 mixer: (batch, L, d_model) -> (batch, L, d_model).

    Parameters (mamba-ssm names): in_proj.weight (2E + 2GN + H, d_model), conv1d.weight
    (E + 2GN, 1, d_conv), conv1d.bias (E + 2GN), dt_bias (H), A_log (H), D (H), norm.weight (E),
    out_proj.weight (d_model, E). A_log, D and dt_bias are float32 and `_no_weight_decay`.

    in_proj output order [z, xBC, dt]; conv channels order [x, B, C]; head h uses group
    h // (nheads // ngroups). Recurrent state (`allocate_inference_cache`, `step`): the conv state
    is the last d_conv inputs of xBC (batch, E + 2GN, d_conv), the SSM state (batch, H, P, N).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
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
        if self.d_inner % headdim:
            raise ValueError(
                f"Mamba2: d_inner = expand * d_model = {self.d_inner} must be a multiple of headdim={headdim}"
            )
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: nheads = {self.nheads} must be a multiple of ngroups={ngroups}")
        self.chunk_size, self.A_init_range = chunk_size, tuple(A_init_range)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.kernels_mode = kernels_mode

        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        # float32 whatever the model dtype (mamba-ssm keeps them so too): exp(A_log) and
        # softplus(dt + dt_bias) span orders of magnitude that bf16 would round coarsely.
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, device=device))
        self.A_log = nn.Parameter(torch.empty(self.nheads, device=device))
        self.D = nn.Parameter(torch.empty(self.nheads, device=device))
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // ngroups, eps=norm_eps, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba-ssm's `Mamba2.__init__` initialisation (conv_init=None: nn.Conv1d's default).

        Safe after `to_empty()` from the meta device: re-creates every value and the
        `_no_weight_decay` flags. The LM's `init_weights` then rescales out_proj.
        """
        for linear in (self.in_proj, self.out_proj):
            linear.reset_parameters()
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)  # mamba-ssm `_init_weights`
        self.conv1d.reset_parameters()
        self.norm.reset_parameters()
        init_dt_bias(self.dt_bias, self.dt_min, self.dt_max, self.dt_init_floor)  # one dt per head
        with torch.no_grad():
            # One decay rate per head, A ~ U(A_init_range), stored as log A (A = -exp(A_log)).
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.A_init_range).log())
            self.D.fill_(1.0)
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True

    def forward(self, hidden_states: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (batch, L, d_model); reset (batch, L) bool, True at document starts."""
        zxbcdt = self.in_proj(hidden_states)  # (batch, L, 2E + 2GN + H)
        A = -torch.exp(self.A_log.float())  # (H,), negative
        D, dt_bias = self.D.float(), self.dt_bias.float()
        if kernels.use_cuda(self.kernels_mode, hidden_states, "ssd scan"):
            seq_idx = None if reset is None else kernels.seq_idx_from_reset(reset)
            return kernels.mamba2_fused(
                zxbcdt, self.conv1d.weight, self.conv1d.bias, dt_bias, A, D, self.chunk_size, seq_idx,
                self.norm.weight, self.norm.eps, self.out_proj.weight, self.out_proj.bias, self.headdim,
                self.ngroups,
            )
        gn = self.ngroups * self.d_state
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * gn, self.nheads], dim=-1)
        xBC = F.silu(causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, reset))
        xBC = xBC.transpose(1, 2)  # (batch, L, E + 2GN)
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))  # (batch, L, H, P)
        B = B.unflatten(-1, (self.ngroups, self.d_state))  # (batch, L, G, N)
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        y = ssd_chunked(x, dt, A, B, C, chunk_size=self.chunk_size, D=D, dt_bias=dt_bias,
                        dt_softplus=True, reset=reset)
        y = self.norm(y.flatten(2), z)  # (batch, L, E)
        return self.out_proj(y)

    def allocate_inference_cache(self, batch: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (conv_state (batch, E + 2GN, d_conv), ssm_state (batch, H, P, N)): an empty
        context, in at least float32 (mixer_init.state_options)."""
        options = state_options(self.in_proj.weight, device, dtype)
        return (torch.zeros(batch, self.conv1d.weight.shape[0], self.d_conv, **options),
                torch.zeros(batch, self.nheads, self.headdim, self.d_state, **options))

    def step(self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model); updates both states in place.

        The per-token form of `forward`, computed in the states' dtype; the projections and the
        gated norm run in the weights' dtype, as in `forward`. x is (H, P) per token, B and C
        (G, N), head h reading group h // (H / G).
        """
        dtype = conv_state.dtype
        batch = hidden.shape[0]
        H, P, N, G = self.nheads, self.headdim, self.d_state, self.ngroups
        zxbcdt = self.in_proj(hidden).to(dtype)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * G * N, H], dim=-1)
        xBC = F.silu(causal_conv1d_step(conv_state, xBC, self.conv1d.weight, self.conv1d.bias))
        x, B, C = torch.split(xBC, [self.d_inner, G * N, G * N], dim=-1)
        x = x.view(batch, H, P)
        B = B.view(batch, G, N).repeat_interleave(H // G, dim=1)  # (batch, H, N)
        C = C.view(batch, G, N).repeat_interleave(H // G, dim=1)
        # A, D and dt_bias as the forward takes them: float32 (as mamba-ssm), then the state dtype.
        dt = F.softplus(dt + self.dt_bias.float().to(dtype))  # (batch, H)
        A = -torch.exp(self.A_log.float()).to(dtype)  # (H,)
        # h = exp(dt A) h + dt x B^T per head;  y = h C + D x
        drive = (dt[:, :, None] * x)[:, :, :, None] * B[:, :, None, :]  # (batch, H, P, N)
        ssm_state.mul_(torch.exp(dt * A)[:, :, None, None]).add_(drive)
        y = torch.einsum("bhpn,bhn->bhp", ssm_state, C) + self.D.float().to(dtype)[:, None] * x
        y = self.norm(y.reshape(batch, self.d_inner).to(hidden.dtype), z.to(hidden.dtype))  # gated RMSNorm
        return self.out_proj(y)
