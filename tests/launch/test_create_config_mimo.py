"""The planner and create_mamba_config.py with Mamba-3's MIMO form (is_mimo, mimo_rank R): the fused
count (mamba/config/memory.py) against what autograd saves around a stand-in of mamba-ssm's TileLang
kernel that saves exactly what its autograd Function saves; the torch path measured for the MIMO
mixer and named in the plan; --mimo-rank's keys, chunk size, note and refusals."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba.config import planner
from mamba.config.load import load_config
from mamba.config.memory import mamba3_mimo_block_bytes, torch_block_bytes
from mamba.config.presets import MODEL_PRESETS
from mamba.model.factory import build_model
from mamba.model.ops import kernels
from mamba.model.ops.mamba3_scan import mamba3_scan_chunked

REPO = Path(__file__).resolve().parents[2]


class _KernelStandin(torch.autograd.Function):
    """mamba-ssm 2.3.2's `_Mamba3Function` (ops/tilelang/mamba3/mamba3_mimo.py) as far as memory goes:
    every input made contiguous, the cumulative angles allocated as angle_dt_fwd does (empty_like the
    angles), the output in `dtype`, and save_for_backward of the same tensors. The output is the torch
    scan's, so the mixer around it computes what it would on the kernel. Backward is not needed."""

    @staticmethod
    def forward(ctx, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
                rotary_dim_divisor, dtype, return_state, cu_seqlens):
        Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z = (
            None if t is None else t.contiguous()
            for t in (Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z))
        angles_cumsum = torch.empty_like(Angles)
        reset = None
        if cu_seqlens is not None:  # one flattened row, each document from zero states
            reset = torch.zeros(1, Q.shape[1], dtype=torch.bool)
            reset[0, cu_seqlens[:-1].long()] = True
        out = mamba3_scan_chunked(Q, K, V, ADT.transpose(1, 2), DT.transpose(1, 2), Trap.transpose(1, 2), Angles,
                                  Q_bias, K_bias, D, Z, reset, chunk_size, MIMO_V, MIMO_Z, MIMO_Out).to(dtype)
        ctx.save_for_backward(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, angles_cumsum, D, Z, MIMO_V, MIMO_Out,
                              MIMO_Z, cu_seqlens)
        return out


def mamba3_mimo_standin(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
                        rotary_dim_divisor, dtype, return_state=False, cu_seqlens=None):
    """mamba_ssm.ops.tilelang.mamba3.mamba3_mimo.mamba3_mimo's signature."""
    return _KernelStandin.apply(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
                                chunk_size, rotary_dim_divisor, dtype, return_state, cu_seqlens)


def small_mimo(rank: int, outproj_norm: bool, *extra: str):
    """A 2-layer MIMO model: d 64, E 128, H 4 heads of 32, G 2 groups of N 16, S 4, chunk 64 / R."""
    return load_config(None, ["model.d_model=64", "model.n_layer=2", "model.vocab_size=512", "model.ssm_layer=mamba3",
                              "model.headdim=32", f"model.chunk_size={max(8, 64 // rank)}", "model.d_state=16",
                              "model.ngroups=2", "model.is_mimo=true", f"model.mimo_rank={rank}",
                              f"model.is_outproj_norm={outproj_norm}", "trainer.precision=amp_bf16",
                              "data.seq_len=64", *extra])


def mixer_saved_bytes(mixer, batch: int, length: int, documents: bool) -> int:
    """Bytes of the storages autograd saves in one amp_bf16 forward of `mixer`, parameters excluded
    (they are counted with the parameters), each storage once."""
    params = {p.untyped_storage()._cdata for p in mixer.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    hidden = torch.randn(batch, length, mixer.d_model, dtype=torch.bfloat16, requires_grad=True)
    reset = torch.zeros(batch, length, dtype=torch.bool)
    reset[:, length // 3] = documents
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(hidden, reset=reset if documents else None)
    return sum(saved.values())


@pytest.fixture
def mimo_kernel_standin(monkeypatch):
    """The MIMO kernel path on CPU: dispatch by mode alone, the kernel the stand-in."""
    monkeypatch.setattr(kernels, "use_cuda", lambda mode, tensor, op, family="mamba-ssm": mode == "cuda")
    monkeypatch.setattr(kernels, "_probe_mamba3_mimo", lambda: ({"mamba3_mimo": mamba3_mimo_standin}, ""))


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("outproj_norm", [False, True])
@pytest.mark.parametrize("documents", [False, True])
def test_mimo_fused_count_is_what_autograd_saves_around_the_kernel(mimo_kernel_standin, rank, outproj_norm,
                                                                    documents):
    """The count (less the block's fp32 residual, 4d, which the fused add+norm keeps outside the
    mixer) equals the bytes per token a mixer on the kernel path saves: two batch sizes, so that the
    weights autocast casts once cancel."""
    cfg = small_mimo(rank, outproj_norm)
    size = planner.measure_model(cfg.model)
    mixer = build_model(cfg.model, device="cpu").backbone.layers[0].mixer
    length = 48
    torch.manual_seed(0)
    with torch.no_grad():  # the kernel path gives the torch path's output, so the stand-in gets the right tensors
        hidden = torch.randn(2, length, 64)
        torch_out = mixer(hidden)
        mixer.kernels_mode = "cuda"
        torch.testing.assert_close(mixer(hidden), torch_out, rtol=1e-5, atol=1e-5)
    measured = mixer_saved_bytes(mixer, 2, length, documents) - mixer_saved_bytes(mixer, 1, length, documents)
    counted = planner.block_activation_bytes(size)
    assert counted == mamba3_mimo_block_bytes(size)
    # Per document the kernel keeps one more cu_seqlens entry (not per token, so not counted): the
    # second row brings two more documents, 2 int32 entries.
    assert measured - length * (counted - 4 * 64) == (8 if documents else 0)


def test_mimo_count_grows_by_rank_only_in_b_and_c():
    """Between ranks only the per-rank B and C terms (and, with the output norm, the per-rank norm
    and in_proj's R B's and C's) change: the count reads R from the built model, not the config."""
    sizes = {r: planner.measure_model(small_mimo(r, False, "model.chunk_size=16").model) for r in (1, 2, 4)}
    assert [sizes[r].mimo_rank for r in (1, 2, 4)] == [1, 2, 4]
    g, n = 2, 16
    step = 2 * (4 * g * n + 4 * g + 4 * g * n + 2 * g * n)  # the B_norm and C_norm terms of one rank
    assert mamba3_mimo_block_bytes(sizes[2]) - mamba3_mimo_block_bytes(sizes[1]) == step
    assert mamba3_mimo_block_bytes(sizes[4]) - mamba3_mimo_block_bytes(sizes[1]) == 3 * step
    siso = planner.measure_model(load_config(None, ["model.d_model=64", "model.n_layer=2", "model.vocab_size=512",
                                                    "model.ssm_layer=mamba3", "model.headdim=32", "model.d_state=16",
                                                    "model.ngroups=2", "model.chunk_size=16"]).model)
    assert siso.mimo_rank == 0 and planner.block_activation_bytes(siso) != mamba3_mimo_block_bytes(sizes[1])


def test_the_plan_names_the_mimo_path_it_assumed():
    """kernels=cuda: the fused MIMO count; kernels=torch: the MIMO mixer measured on fake tensors
    (is_mimo reaches the measured block: it differs from SISO's); auto follows the MIMO kernel's own
    probe ("mamba3-mimo", which needs tilelang), not the SISO kernel's."""
    cfg = small_mimo(2, False, "model.kernels=cuda")
    size = planner.measure_model(cfg.model)
    fused = planner.memory_model(cfg, size, "gpu")
    assert fused.blocks == {"mamba": mamba3_mimo_block_bytes(size)}
    assert fused.path == "mamba-ssm's fused kernels for Mamba-3 MIMO of rank 2, counted (model.kernels=cuda)"
    cfg = small_mimo(2, False, "model.kernels=torch")
    measured = planner.memory_model(cfg, size, "gpu")
    assert measured.path == "the pure-PyTorch ops for Mamba-3 MIMO of rank 2, measured (model.kernels=torch)"
    siso_cfg = load_config(None, ["model.d_model=64", "model.n_layer=2", "model.vocab_size=512",
                                  "model.ssm_layer=mamba3", "model.headdim=32", "model.chunk_size=32", "model.d_state=16", "model.ngroups=2"])
    siso = torch_block_bytes(siso_cfg.model, 64, True, 4)
    assert measured.blocks["mamba"] == torch_block_bytes(cfg.model, 64, True, 4) > siso
    available = kernels.cuda_kernels_available("mamba3-mimo")[0]
    fused_path, why = planner.kernel_path("auto", "gpu", "mamba3", mimo=True)
    assert fused_path == available and "Mamba-3 MIMO kernel" in why
    assert planner.kernel_path("auto", "cpu", "mamba3", mimo=True) == (False, "CPU ranks")


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "create_mamba_config.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_mimo_rank_flag_writes_mimo_with_the_recommended_chunk(tmp_path):
    out = tmp_path / "m.yaml"
    common = ["--preset", "mamba3-1.4b", "--gpu", "H100-80GB", "--tokens", "1e9", "--out", str(out)]
    written = {}
    for rank, chunk in ((1, 64), (2, 32), (4, 16), (16, 8)):  # 64 / R, at least 8 (the kernel asserts it)
        proc = run(*common, "--mimo-rank", str(rank))
        m = written[rank] = load_config(out).model
        assert (m.is_mimo, m.mimo_rank, m.chunk_size) == (True, rank, chunk)
        note = f"--mimo-rank {rank}: model.is_mimo=true, model.mimo_rank={rank}, model.chunk_size={chunk} (64 / R"
        assert f"mimo         {note}" in proc.stdout and f"# {note}" in out.read_text()
        assert f"model        mamba3 MIMO rank {rank} d_model=2048" in proc.stdout
    # The preset of the same shape is what --mimo-rank 4 writes.
    preset = MODEL_PRESETS["mamba3-mimo-1.4b"]
    assert {k: getattr(written[4], k) for k in preset} == preset
    # A chunk size the user sets wins, and the note says what mamba-ssm recommends instead.
    proc = run(*common, "--mimo-rank", "2", "model.chunk_size=16", "model.kernels=torch")
    assert load_config(out).model.chunk_size == 16
    assert "model.chunk_size=16 (as overridden; mamba-ssm recommends 32" in proc.stdout
    assert "activations  estimated for the pure-PyTorch ops for Mamba-3 MIMO of rank 2" in proc.stdout


def test_mimo_rank_flag_is_refused_without_a_mamba3_layer(tmp_path):
    out = tmp_path / "m.yaml"
    for flags, message in (
            (["--preset", "1.4b"], "--mimo-rank 4: MIMO is a form of the Mamba-3 layer, but the model's layer is "
                                   "mamba1; add --ssm-layer mamba3"),
            (["--preset", "1.4b", "--ssm-layer", "mamba2"], "but the model's layer is mamba2"),
            (["--preset", "mamba3-1.4b", "model.ssm_layer=mamba2"], "but the model's layer is mamba2")):
        proc = run(*flags, "--mimo-rank", "4", "--gpu", "H100-80GB", "--out", str(out), ok=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run("--preset", "mamba3-1.4b", "--mimo-rank", "0", "--gpu", "H100-80GB", "--out", str(out), ok=False)
    assert proc.returncode != 0 and "--mimo-rank 0: give a rank >= 1" in proc.stderr, proc.stderr
    assert not out.exists()
    run("--preset", "1.4b", "--ssm-layer", "mamba3", "--mimo-rank", "2", "--gpu", "H100-80GB", "--out", str(out))
    assert load_config(out).model.is_mimo
