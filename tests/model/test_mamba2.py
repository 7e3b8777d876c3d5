"""The Mamba-2 mixer: mamba-ssm's parameter layout, its forward against a float64 reference built
from the sequential ops, the gated norm, and float32 SSM parameters under bf16 autocast."""
import torch
import torch.nn.functional as F

from mamba.model.mamba2 import Mamba2
from mamba.model.ops.causal_conv1d import causal_conv1d_ref
from mamba.model.ops.rms_norm import RMSNormGated
from mamba.model.ops.ssd import ssd_ref


def small(**kw):
    torch.manual_seed(0)
    args = dict(d_model=32, d_state=8, headdim=16, ngroups=2, chunk_size=16, kernels_mode="torch")
    return Mamba2(**{**args, **kw})


def test_parameter_names_and_shapes_are_mamba_ssm():
    m = small()  # d_inner 64, nheads 4, ngroups 2, d_state 8
    conv_dim = 64 + 2 * 2 * 8
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "in_proj.weight": (2 * 64 + 2 * 2 * 8 + 4, 32), "conv1d.weight": (conv_dim, 1, 4),
        "conv1d.bias": (conv_dim,), "dt_bias": (4,), "A_log": (4,), "D": (4,),
        "norm.weight": (64,), "out_proj.weight": (32, 64),
    }
    assert (m.d_inner, m.nheads, m.headdim, m.ngroups, m.d_state, m.d_conv) == (64, 4, 16, 2, 8, 4)
    assert {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)} == {"A_log", "D", "dt_bias"}


def test_gated_norm_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 5, 12, generator=g, dtype=torch.float64), torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    norm = RMSNormGated(12, group_size=4, eps=1e-5).double()
    norm.weight.data = torch.randn(12, generator=g, dtype=torch.float64)
    gated = x * z * torch.sigmoid(z)
    expected = []
    for k in range(3):  # each group of 4 channels normalised on its own
        part = gated[..., 4 * k: 4 * k + 4]
        expected.append(part / torch.sqrt(part.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x, z), torch.cat(expected, -1) * norm.weight, rtol=1e-12, atol=1e-12)


def reference_forward(m: Mamba2, u, reset):
    """The mixer written out with the slow reference ops (float64). A_log, D and dt_bias enter at
    float32, as the mixer reads them (`.float()`, so that bf16 never rounds them)."""
    gn = m.ngroups * m.d_state
    z, xBC, dt = torch.split(m.in_proj(u), [m.d_inner, m.d_inner + 2 * gn, m.nheads], dim=-1)
    xBC = F.silu(causal_conv1d_ref(xBC.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, reset)).transpose(1, 2)
    x, B, C = torch.split(xBC, [m.d_inner, gn, gn], dim=-1)
    b, L = u.shape[:2]
    y = ssd_ref(x.reshape(b, L, m.nheads, m.headdim), dt, -torch.exp(m.A_log.float()).double(), B.reshape(b, L, m.ngroups, -1),
                C.reshape(b, L, m.ngroups, -1), D=m.D.float().double(), dt_bias=m.dt_bias.float().double(), dt_softplus=True,
                reset=reset)
    return m.out_proj(m.norm(y.reshape(b, L, -1), z))


def test_forward_and_gradients_match_reference_float64():
    m = small().double()
    u = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(2, 37, dtype=torch.bool)
    reset[0, 11] = reset[1, 30] = True
    out = m(u, reset=reset)
    ref = reference_forward(m, u, reset)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(out)
    params = [u] + list(m.parameters())
    for a, b in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ssm_parameters_stay_float32_under_bf16_autocast():
    """bf16 autocast computes the projections in bf16, but A_log, D and dt_bias stay float32
    parameters with float32 gradients, and the scan output stays close to the float32 run."""
    m = small()
    u = torch.randn(1, 20, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(u)
    out.float().square().sum().backward()
    for p in (m.A_log, m.D, m.dt_bias):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    torch.testing.assert_close(out.float(), m(u).detach(), rtol=0.1, atol=0.05)


def test_lm_logits_match_hf_transformers_mamba2():
    """An independent implementation on the same weights: transformers' Mamba2ForCausalLM (its
    pure-torch path). ngroups=1: transformers 4.53's gated norm ignores groups, where mamba-ssm
    (and this mixer) normalise each of the ngroups groups separately. HF computes its norm and
    logits in float32, hence the tolerance on float64 weights."""
    import transformers
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from mamba.model import MambaConfig, MambaLMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=104, ssm_layer="mamba2", d_state=16,
                                        headdim=16, chunk_size=16, kernels="torch")).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))  # move off the init so every parameter matters
    hf = Mamba2ForCausalLM(Mamba2Config(
        hidden_size=64, num_hidden_layers=2, vocab_size=104, state_size=16, head_dim=16, num_heads=8,
        n_groups=1, expand=2, chunk_size=16, tie_word_embeddings=True, use_conv_bias=True, use_bias=False,
        residual_in_fp32=True, layer_norm_epsilon=1e-5,
    )).double()
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    ids = torch.randint(0, 104, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits.double(), rtol=1e-5, atol=1e-5)
