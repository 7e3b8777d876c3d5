"""Attention and hybrid models (mamba/model/attention.py, ops/attention.py, mlp.py): the torch path
against a float64 softmax(QK^T)V reference with explicit masks, RoPE against its complex-number
form, document isolation in hybrids, step == forward, mamba-ssm's parameter names."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba.model import MambaConfig, MambaLMHeadModel
from mamba.model.attention import MHA
from mamba.model.mlp import GatedMLP
from mamba.model.ops.attention import (apply_rotary, attention_ref, document_attention, positions_from_reset,
                                       rotary_ref)

DOCS = (13, 21, 30)  # three documents packed into one 64-token window


def random_reset(batch, length, generator, p=0.08):
    reset = torch.rand(batch, length, generator=generator) < p
    reset[:, 0] = True
    return reset


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]


@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 2), (6, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_document_attention_equals_float64_reference(heads, heads_kv, dtype, tol):
    g = torch.Generator().manual_seed(heads * 10 + heads_kv)
    batch, length, dim = 3, 70, 16
    q = torch.randn(batch, length, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, length, heads_kv, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, length, heads_kv, dim, generator=g, dtype=torch.float64)
    for reset, scale in ((random_reset(batch, length, g), None), (None, 0.3)):
        ref = attention_ref(q, k, v, reset, scale)
        out = document_attention(q.to(dtype), k.to(dtype), v.to(dtype), reset, scale)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_equals_complex_multiplication_and_keeps_the_other_channels(interleaved):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 3, 16, generator=g, dtype=torch.float64)
    positions = positions_from_reset(random_reset(2, 40, g, p=0.2), 2, 40, "cpu")
    out = apply_rotary(x, positions, 8, 500.0, interleaved)
    torch.testing.assert_close(out, rotary_ref(x, positions, 8, 500.0, interleaved), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[..., 8:], x[..., 8:])
    # Rotation keeps norms and makes q . k depend on the position difference only.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    q, k = x[:1, :1], x[:1, 1:2]
    dots = [(apply_rotary(q, torch.tensor([[p + 5]]), 16, 500.0, interleaved)
             * apply_rotary(k, torch.tensor([[p]]), 16, 500.0, interleaved)).sum() for p in (0, 37)]
    torch.testing.assert_close(dots[0], dots[1])


def test_positions_restart_at_each_document():
    reset = torch.tensor([[True, False, False, True, False, True], [False, False, True, False, False, False]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    assert torch.equal(positions_from_reset(reset, 2, 6, "cpu"), expected)


def mha_reference(mha, x, reset):
    """MHA's forward spelled out in float64 from its parameters: projections, conv per document
    (F.conv1d on each piece), RoPE as complex multiplication, attention_ref."""
    w = {name: p.double() for name, p in mha.named_parameters()}
    qkv = x.double() @ w["in_proj.weight"].T + w.get("in_proj.bias", 0)
    batch, length, _ = x.shape
    if mha.d_conv:
        rows = []
        for b in range(batch):
            starts = [0] + [t for t in range(1, length) if reset[b, t]] + [length]
            rows.append(torch.cat([F.conv1d(qkv[b, s:e].T[None], w["conv1d.weight"], w["conv1d.bias"],
                                            padding=mha.d_conv - 1, groups=qkv.shape[-1])[0, :, : e - s].T
                                   for s, e in zip(starts[:-1], starts[1:])]))
        qkv = torch.stack(rows)
    h, hk, d = mha.num_heads, mha.num_heads_kv, mha.head_dim
    q, k, v = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))
    pos = torch.stack([torch.tensor([t - max(s for s in range(t + 1) if s == 0 or reset[b, s])
                                     for t in range(length)]) for b in range(batch)])
    if mha.rotary_emb_dim:
        q = rotary_ref(q, pos, mha.rotary_emb_dim, mha.rotary_emb_base, mha.rotary_emb_interleaved)
        k = rotary_ref(k, pos, mha.rotary_emb_dim, mha.rotary_emb_base, mha.rotary_emb_interleaved)
    out = attention_ref(q, k, v, reset, mha.softmax_scale).flatten(2)
    return out @ w["out_proj.weight"].T + w.get("out_proj.bias", 0)


@pytest.mark.parametrize("kw", [
    dict(num_heads=4),
    dict(num_heads=4, num_heads_kv=2, head_dim=8, rotary_emb_dim=4, d_conv=4, softmax_scale=0.2),
    dict(num_heads=4, num_heads_kv=1, rotary_emb_dim=8, rotary_emb_interleaved=True, qkv_proj_bias=False,
         out_proj_bias=False),
])
def test_mha_forward_equals_reference_from_its_parameters(kw):
    torch.manual_seed(0)
    mha = MHA(32, kernels_mode="torch", dtype=torch.float64, **kw)
    for p in mha.parameters():  # non-zero biases, so that a misplaced bias shows
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 50, 32, generator=g, dtype=torch.float64)
    reset = random_reset(2, 50, g)
    torch.testing.assert_close(mha(x, reset), mha_reference(mha, x, reset), rtol=1e-10, atol=1e-10)


def test_gated_mlp_is_value_times_silu_gate():
    torch.manual_seed(0)
    mlp = GatedMLP(24, 100, dtype=torch.float64)
    assert mlp.fc1.weight.shape == (2 * 128, 24) and mlp.fc2.weight.shape == (24, 128)  # 100 -> 128
    x = torch.randn(3, 24, dtype=torch.float64)
    h = x @ mlp.fc1.weight.T
    expected = (h[:, :128] * h[:, 128:] * torch.sigmoid(h[:, 128:])) @ mlp.fc2.weight.T
    torch.testing.assert_close(mlp(x), expected)


ATTN = dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=8, d_conv=4, qkv_proj_bias=False, out_proj_bias=False)


def hybrid(ssm_layer="mamba2", dtype=torch.float64, attn_cfg=ATTN, attn_layer_idx=(1,), d_intermediate=64,
           n_layer=3):
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(
        d_model=32, n_layer=n_layer, vocab_size=50, ssm_layer=ssm_layer, d_state=8, headdim=16, chunk_size=16,
        dt_rank=4, kernels="torch", attn_layer_idx=attn_layer_idx, attn_cfg=dict(attn_cfg),
        d_intermediate=d_intermediate,
    )).to(dtype)


@pytest.mark.parametrize("name,make", [
    ("attention only", lambda dtype: hybrid(dtype=dtype, attn_layer_idx=(0, 1), n_layer=2)),
    ("mamba1 + attention", lambda dtype: hybrid("mamba1", dtype)),
    ("mamba2 + MQA, no MLP", lambda dtype: hybrid("mamba2", dtype, dict(ATTN, num_heads_kv=1), d_intermediate=0)),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_each_packed_document_gives_the_logits_it_gives_alone(name, make, dtype, tol):
    m = make(dtype)
    ids = torch.randint(0, 50, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = m(ids, packed_positions(DOCS))
        start = 0
        for n in DOCS:
            alone = m(ids[:, start: start + n], packed_positions([n]))
            torch.testing.assert_close(packed[:, start: start + n], alone, rtol=tol, atol=tol)
            start += n


def test_hybrid_step_by_step_equals_forward():
    m = hybrid("mamba2", attn_layer_idx=(0, 2))
    ids = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(ids)
        cache = m.allocate_inference_cache(2)
        steps = torch.stack([m.step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)


def test_hybrid_parameters_have_mamba_ssm_names_and_init():
    m = hybrid("mamba2", dtype=torch.float32)
    shapes = {name: tuple(p.shape) for name, p in m.state_dict().items()}
    qkv = (4 + 2 * 2) * 8  # h = 4, h_kv = 2, head_dim = 32 / 4
    assert shapes["backbone.layers.1.mixer.in_proj.weight"] == (qkv, 32)
    assert shapes["backbone.layers.1.mixer.conv1d.weight"] == (qkv, 1, 4)
    assert shapes["backbone.layers.1.mixer.out_proj.weight"] == (32, 32)
    assert "backbone.layers.1.mixer.in_proj.bias" not in shapes and "backbone.layers.1.mixer.inv_freq" not in shapes
    for i in range(3):
        assert shapes[f"backbone.layers.{i}.mlp.fc1.weight"] == (2 * 128, 32)
        assert shapes[f"backbone.layers.{i}.mlp.fc2.weight"] == (32, 128)
        assert shapes[f"backbone.layers.{i}.norm2.weight"] == (32,)
    assert "backbone.layers.0.mixer.A_log" in shapes and "backbone.layers.1.mixer.A_log" not in shapes
    # GPT-2 residual scaling over 2 branches per layer: kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in),
    # divided by sqrt(2 * n_layer).
    for name, fan_in in (("layers.1.mixer.out_proj", 32), ("layers.0.mlp.fc2", 128), ("layers.2.mlp.fc2", 128)):
        w = dict(m.named_parameters())[f"backbone.{name}.weight"]
        bound = 1 / math.sqrt(fan_in) / math.sqrt(2 * 3)
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def _flash_attention_runs() -> bool:
    from mamba.model.ops.kernels import _probe_flash_attention

    return torch.cuda.is_available() and _probe_flash_attention() is not None


@pytest.mark.skipif(not _flash_attention_runs(), reason="needs a CUDA GPU and flash-attn importable")
def test_flash_attention_varlen_equals_the_sdpa_path_on_gpu():
    """model.kernels auto takes flash-attn's varlen kernel for bf16 CUDA tensors; it must give the
    torch path's output (bf16 rounding: within 2e-2) with documents packed, GQA and RoPE."""
    torch.manual_seed(0)
    kw = dict(num_heads=8, num_heads_kv=2, rotary_emb_dim=32)
    fast = MHA(256, kernels_mode="auto", device="cuda", dtype=torch.bfloat16, **kw)
    slow = MHA(256, kernels_mode="torch", device="cuda", dtype=torch.bfloat16, **kw)
    slow.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 300, 256, generator=g).to("cuda", torch.bfloat16)
    reset = random_reset(2, 300, g, p=0.02).cuda()
    for r in (reset, None):
        torch.testing.assert_close(fast(x, r).float(), slow(x, r).float(), rtol=2e-2, atol=2e-2)
