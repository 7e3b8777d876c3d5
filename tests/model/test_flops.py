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


def mamba3_config(rank=None, **kw):
    """A small Mamba-3 LM: E 64, H 4 heads of 16, G 2 groups of N 8, Q 8; MIMO of rank `rank`."""
    mimo = {} if rank is None else {"is_mimo": True, "mimo_rank": rank}
    shape = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, ngroups=2, chunk_size=8)
    return MambaConfig(ssm_layer="mamba3", kernels="torch", **{**shape, **kw}, **mimo)


def test_mamba3_mimo_of_rank_one_counts_as_siso_and_rank_grows_the_scan():
    from mamba.model.flops import mamba3_layer_flops, mamba3_scan_flops

    for shape in ({}, {"d_model": 2048, "n_layer": 48, "d_state": 128, "headdim": 64, "ngroups": 1, "chunk_size": 64}):
        siso, rank_one = mamba3_config(**shape), mamba3_config(1, **shape)
        assert mamba3_layer_flops(rank_one) == mamba3_layer_flops(siso)
        for seq_len in (None, 4, 2048):
            assert forward_flops_per_token(rank_one, seq_len) == forward_flops_per_token(siso, seq_len)
        # Rank R with the chunk cut to Q / R (mamba-ssm's recommendation) keeps blocks of Q rows:
        # each token then costs R times SISO's scan, the paper's "R times the FLOPs, same state".
        q = siso.chunk_size
        for r in (2, 4):
            mimo = mamba3_config(r, **{**shape, "chunk_size": q // r})
            assert mamba3_scan_flops(mimo, q // r) == r * mamba3_scan_flops(siso, q)


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("length", [16, 24])  # chunks of 8: two, and three
def test_mamba3_mimo_scan_flops_match_flop_counter_on_the_scan(rank, length):
    """mamba3_scan_chunked itself, MIMO without the mimo_o sum (the output norm's layout): its
    batched matmuls are exactly the formula's scores, values, chunk states and read-out."""
    from mamba.model.flops import mamba3_scan_flops
    from mamba.model.ops.mamba3_scan import mamba3_scan_chunked

    config = mamba3_config(rank)
    batch, H, P, G, N, S = 2, 4, 16, 2, 8, 2
    g = torch.Generator().manual_seed(rank)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    dt = F.softplus(rnd(batch, length, H))
    args = dict(C=rnd(batch, length, rank, G, N), B=rnd(batch, length, rank, G, N), x=rnd(batch, length, H, P),
                adt=-dt, dt=dt, trap=rnd(batch, length, H), angles=rnd(batch, length, S),
                C_bias=rnd(H, rank, N), B_bias=rnd(H, rank, N), D=rnd(H), mimo_x=rnd(H, rank, P))
    counter = FlopCounterMode(display=False)
    with counter:
        mamba3_scan_chunked(**args, chunk_size=8)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op == {"aten.bmm": mamba3_scan_flops(config, q=8) * batch * length}


@pytest.mark.parametrize("outproj_norm", [False, True])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_mamba3_mimo_lm_flops_match_flop_counter(outproj_norm, rank):
    """A MIMO LM, forward + backward: the Linear layers (in_proj with its R B's and C's) are aten.mm
    exactly, and aten.bmm is the scan formula plus the one matmul it leaves out, torch's batched
    matmul for the mimo_o sum of the R outputs (2 R E per token; a plain product at R = 1)."""
    torch.manual_seed(0)
    config = mamba3_config(rank, is_outproj_norm=outproj_norm)
    model = MambaLMHeadModel(config)
    batch, length = 2, 16  # two chunks of 8
    by_op = counted_train_flops(model, batch, length, config.vocab_size)
    linear = by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0)
    assert linear == 3 * forward_matmul_flops_per_token(config) * batch * length
    assert sum(p.numel() for p in model.backbone.layers[0].mixer.in_proj.parameters()) == \
        32 * (2 * 64 + 2 * rank * 2 * 8 + 3 * 4 + 2)  # the in_proj width the formula reads, as built
    from mamba.model.flops import mamba3_scan_flops
    mimo_o_sum = 2 * rank * 64 if rank > 1 else 0
    assert by_op["aten.bmm"] == 3 * config.n_layer * (mamba3_scan_flops(config, q=8) + mimo_o_sum) * batch * length
