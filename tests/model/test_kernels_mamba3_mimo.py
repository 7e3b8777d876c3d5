"""Mamba-3 MIMO's kernel dispatch (ops/kernels.py, family "mamba3-mimo": mamba-ssm >= 2.3.2's
TileLang kernel, which needs tilelang): the clear failure of `kernels: cuda` without it, the
torch fallback under `auto`, the CUDA dispatch on CPU through a float64 stand-in of the kernel's
semantics, and (on a GPU with mamba-ssm and tilelang) kernel vs torch path, forward and gradients."""
import pytest
import torch

from kernel_standins import MAMBA3_MIMO_STANDINS, STANDINS
from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.model.ops import kernels
from test_kernels import AVAILABLE, REASON, compare_paths, standin_equals_torch_path

MIMO_AVAILABLE, MIMO_REASON = kernels.cuda_kernels_available("mamba3-mimo")
MIMO_ON_GPU = torch.cuda.is_available() and AVAILABLE and MIMO_AVAILABLE
SKIP_MIMO_GPU = (f"needs a CUDA GPU, mamba-ssm >= 2.3.2 and tilelang (cuda available: {torch.cuda.is_available()}, "
                 f"kernels: {REASON or 'ok'}, mamba3 MIMO kernel: {MIMO_REASON or 'ok'})")


def mimo_config(mode, **kw):
    # Powers of two for d_state and headdim (the kernel's tiles); chunk 16 = 64 / R, mamba-ssm's advice.
    return MambaConfig(**{**dict(d_model=64, n_layer=2, vocab_size=100, ssm_layer="mamba3", d_state=32, headdim=32,
                                 chunk_size=16, kernels=mode, is_mimo=True, mimo_rank=4), **kw})


@pytest.mark.skipif(MIMO_AVAILABLE, reason="the MIMO kernel imports here; this checks the error without it")
def test_kernels_cuda_fails_clearly_without_the_mimo_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_probe", lambda: (STANDINS, ""))  # the Mamba-1/2 kernels "present"
    with pytest.raises(RuntimeError, match=r"ssm_layer mamba3 and is_mimo needs .*tilelang.*'auto' or 'torch'"):
        MambaLMHeadModel(mimo_config("cuda"))


@pytest.mark.parametrize("outproj_norm", [False, True])
@pytest.mark.parametrize("with_documents", [False, True])
def test_cuda_dispatch_through_the_mimo_standin_equals_the_torch_path(monkeypatch, with_documents, outproj_norm):
    """The kernel path with mamba-ssm's MIMO kernel replaced by a float64 stand-in of its semantics
    (kernel_standins.mamba3_mimo: transposed ADT/DT/Trap, per-head angles, rotary_dim_divisor,
    MIMO_Out and Z left out under is_outproj_norm, documents as cu_seqlens over one flattened row)
    gives the torch path's logits and every gradient to 1e-10."""
    monkeypatch.setattr(kernels, "_probe", lambda: (STANDINS, ""))
    monkeypatch.setattr(kernels, "use_cuda", lambda mode, tensor, op, family="mamba-ssm": mode == "cuda")
    monkeypatch.setattr(kernels, "_probe_mamba3_mimo", lambda: (MAMBA3_MIMO_STANDINS, ""))
    calls = []
    standin = MAMBA3_MIMO_STANDINS["mamba3_mimo"]
    monkeypatch.setitem(MAMBA3_MIMO_STANDINS, "mamba3_mimo",
                        lambda *a, **k: calls.append((k.get("cu_seqlens"), k["rotary_dim_divisor"], a[10] is None))
                        or standin(*a, **k))
    torch.manual_seed(0)
    ref = MambaLMHeadModel(mimo_config("torch", tie_embeddings=False, is_outproj_norm=outproj_norm)).double()
    standin_equals_torch_path(ref, with_documents, perturb=0.05)  # off the init (biases, mimo_*, norms)
    assert len(calls) == 2 and all(divisor == 4 and no_out == outproj_norm for _, divisor, no_out in calls)
    if with_documents:  # rows and documents cut into one flattened row of 80 tokens
        assert all(c.tolist() == [0, 17, 40, 57, 80] for c, _, _ in calls)
    else:
        assert all(c is None for c, _, _ in calls)


# TileLang computes in bf16 whatever the input dtype (dtype=x.dtype only sets the output's), so
# float32 compares at bf16 tolerances, as the SISO kernel test does.
MIMO_TOLS = [(torch.float32, 5e-2, 5e-2), (torch.bfloat16, 5e-2, 5e-2)]


@pytest.mark.skipif(not MIMO_ON_GPU, reason=SKIP_MIMO_GPU)
@pytest.mark.parametrize("dtype,rtol,atol", MIMO_TOLS)
@pytest.mark.parametrize("with_documents", [False, True])
def test_mimo_kernel_path_matches_torch_path(dtype, rtol, atol, with_documents):
    positions = None
    if with_documents:
        positions = torch.cat([torch.arange(100), torch.arange(60), torch.arange(96)])[None].repeat(2, 1).cuda()
    compare_paths(mimo_config("torch"), dtype, positions, rtol, atol)
