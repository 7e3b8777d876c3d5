"""Pure-torch stand-ins for the mamba-ssm / causal-conv1d kernels that ops/kernels.py calls, with
the kernels' signatures and semantics (mamba-ssm 2.3.1's `*_ref` functions: selective_scan_ref,
mamba_inner_ref, mamba_split_conv1d_scan_ref, rms_norm_ref), built on this project's slow exact
references. They let a CPU run the model's CUDA dispatch end to end (which arguments go where, in
which layout, which parameters) and compare it with the torch path in float64. What they cannot
check, the real kernels' numerics and memory-layout demands, is tests/model/test_kernels.py's on a
GPU.
"""
import torch
import torch.nn.functional as F

from mamba.model.ops.causal_conv1d import causal_conv1d_ref
from mamba.model.ops.selective_scan import selective_scan_ref
from mamba.model.ops.ssd import ssd_ref


def reset_from_seq_idx(seq_idx):
    """(b, l) int32 document index -> (b, l) bool, True where the index changes (a document start)."""
    if seq_idx is None:
        return None
    return F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, activation=None):
    """x (b, d, l), weight (d, w): depthwise causal conv, restarting where seq_idx changes."""
    out = causal_conv1d_ref(x, weight[:, None, :], bias, reset_from_seq_idx(seq_idx))
    return F.silu(out) if activation in ("silu", "swish") else out


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's selective scan: no reset."""
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True):
    """Mamba-1 from xz (b, 2E, l) to (b, l, d_model), B and C from x_proj (passed as None)."""
    assert B is None and C is None, "the model lets x_proj make B and C"
    rank, nstate = delta_proj_weight.shape[1], A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_fn(x, conv1d_weight[:, 0, :], conv1d_bias, activation="silu")  # weight (d, 1, w)
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (b, l, R + 2N)
    delta = F.linear(x_dbl[..., :rank], delta_proj_weight).transpose(1, 2)  # (b, E, l)
    B, C = x_dbl[..., rank:rank + nstate].transpose(1, 2), x_dbl[..., rank + nstate:].transpose(1, 2)
    y = selective_scan_fn(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx=None,
                                     rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                                     outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
    """Mamba-2 from zxbcdt (b, l, 2E + 2GN + H) to (b, l, d_model); D (H,) with headdim given."""
    assert D.dim() == 1 and headdim is not None and not norm_before_gate
    nheads = D.shape[0]
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx, "silu").transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y = ssd_ref(x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                C.unflatten(-1, (ngroups, dstate)), D, dt_bias, dt_softplus=True,
                reset=reset_from_seq_idx(seq_idx)).flatten(2)  # (b, l, E)
    groups = (y * F.silu(z)).unflatten(-1, (ngroups, -1))
    y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + rmsnorm_eps)).flatten(2) * rmsnorm_weight
    return F.linear(y, outproj_weight, outproj_bias)


def rms_norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    """RMSNorm(x + residual) * weight; with prenorm also the sum (at least float32 with residual_in_fp32)."""
    assert bias is None
    total = x if residual is None else x + residual
    if residual_in_fp32:
        total = total.to(torch.promote_types(total.dtype, torch.float32))
    out = (total * torch.rsqrt(total.square().mean(-1, keepdim=True) + eps) * weight).to(x.dtype)
    return (out, total) if prenorm else out


STANDINS = {
    "causal_conv1d_fn": causal_conv1d_fn, "selective_scan_fn": selective_scan_fn, "mamba_inner_fn": mamba_inner_fn,
    "mamba_split_conv1d_scan_combined": mamba_split_conv1d_scan_combined, "rms_norm_fn": rms_norm_fn,
}


def reset_from_cu_seqlens(cu_seqlens, Q):
    """Varlen kernels' cu_seqlens (the sequences' offsets in one row of Q) -> (1, l) document
    starts, or None without it."""
    if cu_seqlens is None:
        return None
    assert Q.shape[0] == 1, "varlen mode takes one row"
    reset = torch.zeros(1, Q.shape[1], dtype=torch.bool, device=Q.device)
    reset[0, cu_seqlens[:-1].long()] = True
    return reset


def mamba3_siso_combined(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                         chunk_size=64, return_final_states=False, cu_seqlens=None):
    """mamba-ssm 2.3.2's Mamba-3 SISO scan (ops/triton/mamba3/mamba3_siso_combined.py): Q = C, K = B
    (b, l, G, N), V = x (b, l, H, P), ADT, DT, Trap (b, H, l), Angles (b, l, H, S); with cu_seqlens
    (batch 1) each sequence starts from zero states. Here: the float64 sequential reference."""
    from mamba.model.ops.mamba3_scan import mamba3_scan_ref

    assert Input_States is None and not return_final_states, "the model passes neither"
    reset = reset_from_cu_seqlens(cu_seqlens, Q)
    return mamba3_scan_ref(Q, K, V, ADT.transpose(1, 2), DT.transpose(1, 2), Trap.transpose(1, 2), Angles,
                           Q_bias, K_bias, D, Z, reset)


MAMBA3_STANDINS = {"mamba3_siso_combined": mamba3_siso_combined}


def mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
                rotary_dim_divisor, dtype, return_state=False, cu_seqlens=None):
    """mamba-ssm 2.3.2's Mamba-3 MIMO scan (ops/tilelang/mamba3/mamba3_mimo.py): Q = C, K = B
    (b, l, R, G, N), V = x (b, l, H, P), ADT, DT, Trap (b, H, l), biases (H, R, N), MIMO_* (H, R, P),
    Angles (b, l, H, N / rotary_dim_divisor); no MIMO_Out: (b, l, R, H, P). With cu_seqlens (batch
    1) each sequence starts from zero states. Here: the float64 sequential reference."""
    from mamba.model.ops.mamba3_scan import mamba3_scan_ref

    assert not return_state, "the model does not ask for the final states"
    assert Angles.shape[-1] * rotary_dim_divisor == Q.shape[-1] and rotary_dim_divisor in (2, 4)
    assert dtype == V.dtype and chunk_size >= 8
    reset = reset_from_cu_seqlens(cu_seqlens, Q)
    return mamba3_scan_ref(Q, K, V, ADT.transpose(1, 2), DT.transpose(1, 2), Trap.transpose(1, 2), Angles,
                           Q_bias, K_bias, D, Z, reset, MIMO_V, MIMO_Z if Z is not None else None, MIMO_Out)


MAMBA3_MIMO_STANDINS = {"mamba3_mimo": mamba3_mimo}
