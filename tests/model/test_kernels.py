"""Kernel dispatch (ops/kernels.py): clear failure of `kernels: cuda` where the kernels cannot
run, torch fallback under `auto`, the CUDA dispatch on CPU through stand-ins of the kernels
(kernel_standins.py), and (on a CUDA machine with mamba-ssm) kernels vs torch on the same
weights, forward and gradients."""
import copy
import logging

import pytest
import torch

from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.model.ops import kernels
from kernel_standins import STANDINS

AVAILABLE, REASON = kernels.cuda_kernels_available()
ON_GPU = torch.cuda.is_available() and AVAILABLE
SKIP_GPU = f"needs a CUDA GPU and mamba-ssm/causal-conv1d (cuda available: {torch.cuda.is_available()}, kernels: {REASON or 'ok'})"


def set_kernels(model, mode):
    """Switch every module that dispatches (blocks, mixers, the final norm) to `mode`."""
    for module in model.modules():
        if hasattr(module, "kernels_mode"):
            module.kernels_mode = mode


def standin_equals_torch_path(ref, with_documents, perturb=0.0):
    """Logits and every gradient of `ref` (kernels torch, float64) and of its copy switched to
    kernels cuda, whose kernels the caller replaced by stand-ins, agree to 1e-10 on 2 rows of 40
    tokens (with documents: 17 + 23 per row). `perturb` moves the weights off the init first.
    Returns the torch path's logits."""
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(perturb * torch.randn_like(p))
    fast = copy.deepcopy(ref)
    set_kernels(fast, "cuda")
    ids = torch.randint(0, 100, (2, 40))
    positions = torch.cat([torch.arange(17), torch.arange(23)])[None].repeat(2, 1) if with_documents else None
    results = []
    for model in (ref, fast):
        logits = model(ids, positions)
        logits.square().mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-10, atol=1e-10, msg=name)
    if with_documents:  # the resets matter for these inputs
        assert (ref(ids) - results[0][0]).abs().max() > 1e-3
    return results[0][0]


def config(ssm_layer, mode, **kw):
    return MambaConfig(d_model=64, n_layer=2, vocab_size=100, ssm_layer=ssm_layer, d_state=16, headdim=32,
                       chunk_size=64, kernels=mode, **kw)


@pytest.mark.skipif(AVAILABLE, reason="mamba-ssm's kernels import here; this checks the error without them")
def test_kernels_cuda_fails_clearly_without_mamba_ssm():
    with pytest.raises(RuntimeError, match=r"model\.kernels='cuda'.*cannot be imported.*'auto' or 'torch'"):
        MambaLMHeadModel(config("mamba2", "cuda"))


@pytest.mark.skipif(not AVAILABLE, reason="needs mamba-ssm importable, to reach the device check")
def test_kernels_cuda_refuses_cpu_tensors():
    model = MambaLMHeadModel(config("mamba1", "cuda"))
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        model(torch.randint(0, 100, (1, 8)))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="kernels='triton'"):
        MambaLMHeadModel(config("mamba1", "triton"))


@pytest.mark.parametrize("ssm_layer,op", [("mamba1", "selective scan"), ("mamba2", "ssd scan"), ("mamba1", "add+norm")])
def test_auto_on_cpu_uses_torch_and_says_so_once(ssm_layer, op, caplog):
    kernels._log_once.cache_clear()
    torch.manual_seed(0)
    auto = MambaLMHeadModel(config(ssm_layer, "auto"))
    forced = copy.deepcopy(auto)
    set_kernels(forced, "torch")
    ids = torch.randint(0, 100, (2, 24))
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        out = auto(ids)
        auto(ids)
    assert torch.equal(out, forced(ids))  # the same torch computation
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith(op)]
    assert chosen == [f"{op}: torch (model.kernels=auto)"]  # logged once, not per layer/call


def test_seq_idx_from_reset():
    reset = torch.tensor([[True, False, False, True, False], [False, False, True, True, False]])
    assert kernels.seq_idx_from_reset(reset).tolist() == [[1, 1, 1, 2, 2], [0, 0, 1, 2, 2]]
    assert kernels.seq_idx_from_reset(reset).dtype == torch.int32


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
@pytest.mark.parametrize("with_documents", [False, True])
def test_cuda_dispatch_through_kernel_standins_equals_the_torch_path(monkeypatch, ssm_layer, with_documents):
    """The kernel path, every kernel replaced by a float64 stand-in of its semantics, gives the
    torch path's logits and every gradient to 1e-10: the fused Mamba-1 inner fn (one document) or
    conv + scan_with_resets (documents), Mamba-2's fused conv-scan-norm-out_proj with seq_idx, and
    the fused add+norm of every block and the final norm."""
    monkeypatch.setattr(kernels, "_probe", lambda: (STANDINS, ""))
    monkeypatch.setattr(kernels, "use_cuda", lambda mode, tensor, op: mode == "cuda")
    called = {}
    for name, fn in STANDINS.items():
        def spy(*args, _fn=fn, _name=name, **kwargs):
            called[_name] = called.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setitem(STANDINS, name, spy)
    torch.manual_seed(0)
    standin_equals_torch_path(MambaLMHeadModel(config(ssm_layer, "torch", tie_embeddings=False)).double(),
                              with_documents)
    expected = {"rms_norm_fn": 3}  # two blocks and the final norm
    if ssm_layer == "mamba2":
        expected["mamba_split_conv1d_scan_combined"] = 2
    elif with_documents:
        expected.update(causal_conv1d_fn=2, selective_scan_fn=2)
    else:
        expected["mamba_inner_fn"] = 2
    assert called == expected


def compare_paths(torch_config, dtype, positions, rtol, atol):
    """Logits and every gradient of the model of `torch_config` (kernels torch) and of its copy
    switched to kernels cuda, on the same ids."""
    torch.manual_seed(0)
    ref = MambaLMHeadModel(torch_config).cuda()
    fast = copy.deepcopy(ref)
    set_kernels(fast, "cuda")
    ids = torch.randint(0, 100, (2, 256), device="cuda")
    results = []
    for model in (ref, fast):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids, positions)
        logits.float().square().mean().backward()
        results.append((logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=rtol, atol=atol)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=rtol, atol=atol, msg=name)


TOLS = [(torch.float32, 1e-3, 1e-3), (torch.bfloat16, 5e-2, 5e-2)]


@pytest.mark.skipif(not ON_GPU, reason=SKIP_GPU)
@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype,rtol,atol", TOLS)
def test_kernel_path_matches_torch_path_one_document(ssm_layer, dtype, rtol, atol):
    compare_paths(config(ssm_layer, "torch"), dtype, None, rtol, atol)


@pytest.mark.skipif(not ON_GPU, reason=SKIP_GPU)
@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype,rtol,atol", TOLS)
def test_kernel_path_matches_torch_path_with_document_resets(ssm_layer, dtype, rtol, atol):
    """Mamba-2's kernels reset at seq_idx; Mamba-1's scan through scan_with_resets."""
    positions = torch.cat([torch.arange(100), torch.arange(60), torch.arange(96)])[None].repeat(2, 1).cuda()
    compare_paths(config(ssm_layer, "torch"), dtype, positions, rtol, atol)


# Mamba-3: its own probe (mamba-ssm >= 2.3.2), so Mamba-1/2 keep their kernels with 2.3.1.
MAMBA3_AVAILABLE, MAMBA3_REASON = kernels.cuda_kernels_available("mamba3")
MAMBA3_ON_GPU = torch.cuda.is_available() and AVAILABLE and MAMBA3_AVAILABLE
SKIP_MAMBA3_GPU = (f"needs a CUDA GPU and mamba-ssm >= 2.3.2 (cuda available: {torch.cuda.is_available()}, "
                   f"kernels: {REASON or 'ok'}, mamba3 kernel: {MAMBA3_REASON or 'ok'})")


def mamba3_config(mode, **kw):
    # Powers of two for d_state and headdim: the kernel's TMA blocks need them.
    return MambaConfig(d_model=64, n_layer=2, vocab_size=100, ssm_layer="mamba3", d_state=32, headdim=32,
                       chunk_size=16, kernels=mode, **kw)


@pytest.mark.skipif(MAMBA3_AVAILABLE, reason="mamba-ssm's Mamba-3 kernel imports here; this checks the error "
                    "without it")
def test_mamba3_kernels_cuda_fails_clearly_without_the_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_probe", lambda: (STANDINS, ""))  # the Mamba-1/2 kernels "present"
    with pytest.raises(RuntimeError, match=r"ssm_layer mamba3 needs mamba-ssm >= 2.3.2.*'auto' or 'torch'"):
        MambaLMHeadModel(mamba3_config("cuda"))


def test_mamba3_auto_on_cpu_uses_torch_and_says_so_once(caplog):
    kernels._log_once.cache_clear()
    torch.manual_seed(0)
    auto = MambaLMHeadModel(mamba3_config("auto"))
    forced = copy.deepcopy(auto)
    set_kernels(forced, "torch")
    ids = torch.randint(0, 100, (2, 24))
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        out = auto(ids)
        auto(ids)
    assert torch.equal(out, forced(ids))
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mamba3 scan")]
    assert chosen == ["mamba3 scan: torch (model.kernels=auto)"]


@pytest.mark.parametrize("outproj_norm", [False, True])
@pytest.mark.parametrize("with_documents", [False, True])
def test_mamba3_cuda_dispatch_through_kernel_standins_equals_the_torch_path(monkeypatch, with_documents, outproj_norm):
    """The kernel path with mamba-ssm's Mamba-3 SISO kernel replaced by a float64 stand-in of its
    semantics (kernel_standins.mamba3_siso_combined: transposed ADT/DT/Trap, per-head angles, the z
    gate inside unless is_outproj_norm, documents as cu_seqlens over one flattened row) gives the
    torch path's logits and every gradient to 1e-10."""
    from kernel_standins import MAMBA3_STANDINS

    monkeypatch.setattr(kernels, "_probe", lambda: (STANDINS, ""))
    monkeypatch.setattr(kernels, "use_cuda", lambda mode, tensor, op, family="mamba-ssm": mode == "cuda")
    monkeypatch.setattr(kernels, "_probe_mamba3", lambda: (MAMBA3_STANDINS, ""))
    calls = []
    standin = MAMBA3_STANDINS["mamba3_siso_combined"]
    monkeypatch.setitem(MAMBA3_STANDINS, "mamba3_siso_combined",
                        lambda *a, **k: calls.append(k.get("cu_seqlens")) or standin(*a, **k))
    torch.manual_seed(0)
    ref = MambaLMHeadModel(mamba3_config("torch", tie_embeddings=False, is_outproj_norm=outproj_norm)).double()
    standin_equals_torch_path(ref, with_documents, perturb=0.05)  # off the init (B/C biases, norms)
    assert len(calls) == 2  # one kernel call per layer
    if with_documents:  # rows and documents cut into one flattened row of 80 tokens
        assert all(c.tolist() == [0, 17, 40, 57, 80] for c in calls)
    else:
        assert calls == [None, None]


# The Mamba-3 kernel computes Q, K, V and the gate in bf16 whatever the input dtype
# (mamba3_siso_combined casts them), so even float32 runs compare at bf16 tolerances.
MAMBA3_TOLS = [(torch.float32, 5e-2, 5e-2), (torch.bfloat16, 5e-2, 5e-2)]


@pytest.mark.skipif(not MAMBA3_ON_GPU, reason=SKIP_MAMBA3_GPU)
@pytest.mark.parametrize("dtype,rtol,atol", MAMBA3_TOLS)
@pytest.mark.parametrize("with_documents", [False, True])
def test_mamba3_kernel_path_matches_torch_path(dtype, rtol, atol, with_documents):
    positions = None
    if with_documents:
        positions = torch.cat([torch.arange(100), torch.arange(60), torch.arange(96)])[None].repeat(2, 1).cuda()
    compare_paths(mamba3_config("torch"), dtype, positions, rtol, atol)
