"""create_mamba_config.py and its planner: counts match built models, plans are consistent with
the memory model, impossible requests fail with the reason, and the tiny config really trains."""
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mamba.config import planner
from mamba.config.load import load_config
from mamba.config.presets import MODEL_PRESETS
from mamba.model.factory import build_model
from mamba.runs.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cfg") / "packed"
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    run("tools/pack.py", "--tokenizer", "bpe:512", "--out", str(out), *map(str, sources))
    return out


def mamba1_sizes_by_hand(d: int, n_layer: int, vocab: int, n: int = 16, k: int = 4, expand: int = 2) -> tuple:
    """(parameters, largest FSDP unit, activation bytes per token of one block) of a tied Mamba-1 LM,
    written out from mamba-ssm's layer shapes (modules/mamba_simple.py, models/mixer_seq_simple.py)
    and planner.py's memory model: the independent reference the sizes read off the model must meet."""
    e, r, v = expand * d, math.ceil(d / 16), vocab + (-vocab % 8)
    # in_proj, conv1d (+bias), x_proj, dt_proj (+bias), A_log, D, out_proj, the block's RMSNorm
    block = d * 2 * e + e * (k + 1) + e * (r + 2 * n) + r * e + e + e * n + e + e * d + d
    activations = 4 * d + 2 * d + 2 * 2 * e + 2 * e + 2 * e + 2 * (r + 2 * n) + 4 * e + 2 * e + 2 * e
    return n_layer * block + v * d + d, max(block, v * d), activations  # + embedding (tied head), norm_f


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_preset_sizes_are_mamba_ssm_shapes(preset):
    shape = dict(MODEL_PRESETS[preset], vocab_size=MODEL_PRESETS[preset]["vocab_size"] or 8192)
    cfg = load_config(None, [f"model.{k}={v}" for k, v in shape.items()])
    size = planner.measure_model(cfg.model)  # on meta: the 2.8b model without allocating 11 GB
    expected = mamba1_sizes_by_hand(shape["d_model"], shape["n_layer"], shape["vocab_size"])
    assert (size.params, size.largest_unit, planner.block_activation_bytes(size)) == expected


@pytest.mark.parametrize("shape, scan_inputs", [
    (["model.tie_embeddings=false"], 6 + 2 * 16),  # Mamba-1: dt_rank ceil(96 / 16) + B, C of d_state 16
    (["model.ssm_layer=mamba2", "model.d_state=128"], 3 + 2 * 128),  # Mamba-2: 192 / 64 heads + B, C
    (["model.ssm_layer=mamba2", "model.d_state=64", "model.headdim=32", "model.ngroups=2", "model.expand=4"],
     12 + 2 * 2 * 64),  # 384 / 32 heads + B, C for 2 groups
])
def test_untied_and_mamba2_shapes_are_counted(shape, scan_inputs):
    cfg = load_config(None, ["model.d_model=96", "model.n_layer=3", "model.vocab_size=1000", *shape])
    size = planner.measure_model(cfg.model)
    model = build_model(cfg.model, device="cpu")  # the materialised model the meta one stands for
    assert size.params == sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.backbone.layers[0].parameters())
    assert size.largest_unit == max(block, model.backbone.embedding.weight.numel())
    assert (size.n_layer, size.d_model, size.padded_vocab, size.scan_inputs) == (3, 96, 1000, scan_inputs)


@pytest.mark.parametrize("preset,gpu,nodes", [("130m", "A100-40GB", 1), ("1.4b", "H100-80GB", 2),
                                              ("2.8b", "L40S-48GB", 4), ("1.6b", "H200-141GB", 1)])
def test_plan_is_consistent_with_its_memory_model(preset, gpu, nodes):
    m = planner.measure_model(load_config(None, [f"model.{k}={v}" for k, v in MODEL_PRESETS[preset].items()]).model)
    gb, peak = planner.GPUS[gpu]
    ranks = 8 * nodes
    pl = planner.plan(m, ranks=ranks, seq_len=2048, global_batch_tokens=2**20, tokens=10**10, gpu_gb=gb,
                      peak_tflops=peak, mfu=0.4, flops_per_token=6 * m.params)
    assert pl.global_batch == pl.micro_batch * pl.grad_accum * ranks
    assert pl.steps * pl.global_batch * 2048 >= 10**10 > (pl.steps - 1) * pl.global_batch * 2048
    budget = planner.usable_bytes(gb)
    assert pl.memory_per_gpu <= budget
    # The chosen micro batch is the largest divisor of the per-rank batch that fits.
    per_rank = pl.global_batch // ranks
    bigger = [b for b in range(pl.micro_batch + 1, per_rank + 1) if per_rank % b == 0]
    if bigger:
        assert planner.memory_bytes(m, bigger[0], 2048, ranks, pl.checkpointing) > budget
    # Wall time is FLOPs / (ranks x peak x MFU).
    assert pl.hours == pytest.approx(6 * pl.params * pl.tokens / (ranks * peak * 1e12 * 0.4) / 3600)


def test_impossible_request_fails_with_the_reason(packed, tmp_path):
    out = tmp_path / "big.yaml"
    proc = run("create_mamba_config.py", "--preset", "2.8b", "--gpu-memory", "8", "--data", str(packed),
               "--out", str(out), ok=False)
    assert proc.returncode != 0
    assert "does not fit" in proc.stderr and "8 GB GPU" in proc.stderr, proc.stderr
    assert not out.exists()


def test_written_config_matches_the_plan(packed, tmp_path):
    out = tmp_path / "c.yaml"
    proc = run("create_mamba_config.py", "--preset", "130m", "--nodes", "2", "--gpu", "A100-80GB",
               "--tokens", "1e9", "--scheduler", "wsd", "--data", f"{packed}:3", "--data", f"{packed}:1",
               "--out", str(out), "model.vocab_size=50280")
    cfg = load_config(out)
    t = cfg.trainer
    assert t.global_batch_size * cfg.data.seq_len == 2**19  # the preset's 0.5M tokens, 256 windows
    assert t.global_batch_size % (16 * t.micro_batch_size) == 0
    steps = int(t.max_duration.removesuffix("ba"))
    assert steps == -(-10**9 // 2**19)
    assert cfg.scheduler.name == "wsd" and cfg.scheduler.t_decay == f"{round(0.2 * steps)}ba"
    assert [s["weight"] for s in cfg.data.sources] == [3.0, 1.0]
    assert "129,135,360 parameters" in proc.stdout and "wall time" in proc.stdout


def test_tiny_config_trains_on_cpu(packed, tmp_path):
    config = tmp_path / "tiny.yaml"
    run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(config),
        f"trainer.save_folder={tmp_path}/ckpt", f"logging.metrics_file={tmp_path}/metrics.jsonl",
        "logging.progress_bar=false")
    cfg = load_config(config)
    assert (cfg.trainer.device, cfg.trainer.global_batch_size, cfg.data.seq_len) == ("cpu", 8, 256)
    # The written config as is, stopped after 3 of its steps (the schedule keeps its full length);
    # one process (2-rank runs are in tests/training and test_slurm.py).
    run("mamba/train.py", str(config), f"scheduler.t_max={cfg.trainer.max_duration}", "trainer.max_duration=3ba")
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss/train/total" in r]
    assert [r["batch"] for r in rows] == [1, 2, 3]
    assert all(0 < r["loss/train/total"] < 20 for r in rows)
    assert any("ba3" in p.name for p in (tmp_path / "ckpt").iterdir())
