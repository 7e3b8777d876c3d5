"""Document isolation at the LM level, both mixers: in a packed window, the outputs of a document
do not depend on the tokens of the documents before it (exactly, on the CPU torch path)."""
import pytest
import torch

from mamba.model import MambaConfig, MambaLMHeadModel

DOCS = (13, 21, 30)  # three documents packed into one 64-token window; 64 / 16 = 4 SSD chunks


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None]  # (1, L): position inside each doc


def model(ssm_layer, isolation=True):
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(
        d_model=32, n_layer=2, vocab_size=50, ssm_layer=ssm_layer, d_state=8, headdim=16, chunk_size=16,
        kernels="torch", document_isolation=isolation,
    ))


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_changing_one_document_leaves_the_others_exactly_unchanged(ssm_layer):
    m = model(ssm_layer)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (1, sum(DOCS)), generator=g)
    other = ids.clone()
    other[0, : DOCS[0]] = torch.randint(0, 50, (DOCS[0],), generator=g)  # a different document A
    assert not torch.equal(other, ids)
    pos = packed_positions(DOCS)
    with torch.no_grad():
        out, out_other = m(ids, pos), m(other, pos)
    start_b = DOCS[0]
    assert not torch.equal(out[:, :start_b], out_other[:, :start_b])  # document A's outputs changed
    assert torch.equal(out[:, start_b:], out_other[:, start_b:])  # documents B and C: bit for bit
    # ... and they equal the documents run on their own, from an empty state (up to rounding:
    # shorter inputs are chunked differently).
    with torch.no_grad():
        alone = m(ids[:, start_b: start_b + DOCS[1]], packed_positions(DOCS[1:2]))
    torch.testing.assert_close(out[:, start_b: start_b + DOCS[1]], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_without_isolation_documents_see_their_predecessors(ssm_layer):
    """The switch works: with document_isolation off the same change leaks into document B."""
    m = model(ssm_layer, isolation=False)
    ids = torch.randint(0, 50, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 50
    with torch.no_grad():
        out, out_other = m(ids, packed_positions(DOCS)), m(other, packed_positions(DOCS))
    assert not torch.equal(out[:, DOCS[0]:], out_other[:, DOCS[0]:])


@pytest.mark.parametrize("ssm_layer", ["mamba1", "mamba2"])
def test_isolated_gradients_do_not_cross_documents(ssm_layer):
    """The loss on document B has exactly zero gradient with respect to document A's embeddings."""
    m = model(ssm_layer)
    ids = torch.randint(0, 50, (1, sum(DOCS)), generator=torch.Generator().manual_seed(2))
    hidden = m.backbone.embedding(ids).detach().requires_grad_()
    reset = m.document_starts(packed_positions(DOCS))
    h, residual = hidden, None
    for layer in m.backbone.layers:
        h, residual = layer(h, residual, reset=reset)
    (h + residual)[:, DOCS[0]:].square().sum().backward()
    assert torch.count_nonzero(hidden.grad[:, : DOCS[0]]) == 0
    assert torch.count_nonzero(hidden.grad[:, DOCS[0]:]) > 0
