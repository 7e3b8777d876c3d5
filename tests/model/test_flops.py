"""The FLOPs formula (mamba/model/flops.py) against torch's FlopCounterMode on a real forward +
backward of the model (random weights, small shapes).

FlopCounterMode counts matmul-like aten ops only (mm, addmm, bmm, ...), not elementwise work, so
the comparison is on the matmul part: aten.mm + aten.addmm are exactly the Linear layers (mixer
projections, head), and for Mamba-2 aten.bmm is exactly the chunked SSD's matmuls. Both must be
EXACT (integers): the formula's 3x (backward = two matmuls per forward matmul) included. The
Mamba-1 scan's 9 E N and the conv are not matmuls there and are checked only by the paper's count.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mamba.model.flops import forward_flops_per_token, forward_matmul_flops_per_token, flops_per_token, ssd_flops
from mamba.model.lm import MambaConfig, MambaLMHeadModel


def counted_train_flops(model, batch, length, vocab):
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(ids)  # the plain head: no recomputation, as the formula assumes
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return by_op


@pytest.mark.parametrize("tie", [True, False])
def test_mamba1_matmul_flops_match_flop_counter(tie):
    torch.manual_seed(0)
    config = MambaConfig(d_model=24, n_layer=2, vocab_size=50, d_state=8, kernels="torch", tie_embeddings=tie)
    model = MambaLMHeadModel(config)  # dt_rank auto = 2; padded vocab 56
    batch, length = 2, 16
    by_op = counted_train_flops(model, batch, length, config.vocab_size)
    linear = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    assert linear == 3 * forward_matmul_flops_per_token(config) * batch * length


def test_mamba2_matmul_and_ssd_flops_match_flop_counter():
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_layer="mamba2", d_state=8, headdim=16,
                         ngroups=2, chunk_size=8, kernels="torch")
    model = MambaLMHeadModel(config)
    batch, length = 2, 16  # two chunks of 8
    by_op = counted_train_flops(model, batch, length, config.vocab_size)
    linear = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    assert linear == 3 * forward_matmul_flops_per_token(config) * batch * length
    ssd = 3 * config.n_layer * ssd_flops(config, q=8) * batch * length
    assert by_op["aten.bmm"] == ssd


def test_total_adds_the_non_matmul_terms_by_hand():
    # Mamba-130m's shapes (d 768, 24 layers, vocab 50277 padded to 50280): the per-token count
    # written out term by term from the module doc, so a changed term in the code is caught.
    c = MambaConfig(d_model=768, n_layer=24, vocab_size=50277)
    e, n, r = 1536, 16, 48
    layer = 2 * 768 * 2 * e + 2 * e * (r + 2 * n) + 2 * r * e + 2 * e * 768 + 2 * e * 4 + 9 * e * n
    assert flops_per_token(c) == 3 * (24 * layer + 2 * 768 * 50280)
    # Mamba-2: the chunk length is capped by a shorter sequence.
    c2 = MambaConfig(d_model=768, n_layer=24, vocab_size=50277, ssm_layer="mamba2", d_state=128)
    assert flops_per_token(c2, seq_len=64) < flops_per_token(c2, seq_len=2048) == flops_per_token(c2)


def test_hybrid_linear_flops_match_flop_counter_and_attention_term_by_hand():
    """Attention layer (GQA, conv) and MLPs: every projection is a Linear, so aten.mm + addmm is
    exact again; the attention scores/values term is the causal count from the module doc."""
    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=3, vocab_size=50, d_state=8, kernels="torch", attn_layer_idx=(1,),
                         attn_cfg=dict(num_heads=4, num_heads_kv=2, d_conv=4), d_intermediate=40)
    model = MambaLMHeadModel(config)
    batch, length = 2, 16
    by_op = counted_train_flops(model, batch, length, config.vocab_size)
    linear = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    assert linear == 3 * forward_matmul_flops_per_token(config, length) * batch * length
    h, h_kv, head_dim, mlp = 4, 2, 8, 128  # d_intermediate 40 -> 128
    qkv = (h + 2 * h_kv) * head_dim
    attention = 2 * 32 * qkv + 2 * h * head_dim * 32 + 2 * 2 * h * head_dim * (length + 1) // 2 + 2 * qkv * 4
    mlp_flops = 2 * 32 * 2 * mlp + 2 * mlp * 32
    mamba1 = forward_flops_per_token(MambaConfig(d_model=32, n_layer=1, vocab_size=50, d_state=8)) - 2 * 32 * 56
    head = 2 * 32 * 56
    assert forward_flops_per_token(config, length) == attention + 2 * mamba1 + 3 * mlp_flops + head
    with pytest.raises(ValueError, match="sequence length"):
        forward_flops_per_token(config)


def test_mamba3_matmul_and_scan_flops_match_flop_counter():
    """Mamba-3 (no conv; per-head rotated keys and queries): its Linear layers are aten.mm exactly,
    and the chunked scan's matmuls (ops/mamba3_scan.py) are aten.bmm exactly, both times 3."""
    from mamba.model.flops import mamba3_scan_flops

    torch.manual_seed(0)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_layer="mamba3", d_state=8, headdim=16,
                         ngroups=2, chunk_size=8, kernels="torch", is_outproj_norm=True)
    model = MambaLMHeadModel(config)
    batch, length = 2, 16  # two chunks of 8
    by_op = counted_train_flops(model, batch, length, config.vocab_size)
    linear = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    assert linear == 3 * forward_matmul_flops_per_token(config) * batch * length
    # in_proj by hand: E 64, G 2, N 8, H 4, S = int(8 * 0.5) // 2 = 2 rotary angles.
    assert forward_matmul_flops_per_token(config) == 2 * (2 * 32 * (2 * 64 + 2 * 2 * 8 + 3 * 4 + 2) + 2 * 64 * 32) \
        + 2 * 32 * 56
    assert by_op["aten.bmm"] == 3 * config.n_layer * mamba3_scan_flops(config, q=8) * batch * length
    assert forward_flops_per_token(config, seq_len=4) < forward_flops_per_token(config) == \
        forward_flops_per_token(config, seq_len=8)
