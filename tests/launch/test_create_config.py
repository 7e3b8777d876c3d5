"""create_mamba_config.py and its planner: counts match built models, plans are consistent with
the memory model, impossible requests fail with the reason, and the tiny config really trains."""
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mamba.config import planner
from mamba.config.load import load_config
from mamba.config.presets import MODEL_PRESETS
from mamba.model.factory import build_model
from mamba.model.ops import kernels
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


MAMBA1_PRESETS = sorted(p for p, shape in MODEL_PRESETS.items()
                        if "attn_layer_idx" not in shape and shape.get("ssm_layer", "mamba1") == "mamba1")


@pytest.mark.parametrize("preset", MAMBA1_PRESETS)
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


def fused_gpu_model(preset: str) -> tuple:
    """(config, sizes, memory terms) of a preset trained with amp_bf16 on mamba-ssm's kernels."""
    cfg = load_config(None, [f"model.{k}={v}" for k, v in MODEL_PRESETS[preset].items()] +
                      ["model.kernels=cuda", "trainer.precision=amp_bf16", "data.seq_len=2048"])
    size = planner.measure_model(cfg.model)  # built with the torch ops: no mamba-ssm needed here
    return cfg, size, planner.memory_model(cfg, size, "gpu")


@pytest.mark.parametrize("preset,gpu,nodes", [("130m", "A100-40GB", 1), ("1.4b", "H100-80GB", 2),
                                              ("2.8b", "L40S-48GB", 4), ("1.6b", "H200-141GB", 1),
                                              ("mamba3-1.4b", "H100-80GB", 1), ("mamba3-mimo-1.4b", "H100-80GB", 1)])
def test_plan_is_consistent_with_its_memory_model(preset, gpu, nodes):
    _, m, mem = fused_gpu_model(preset)
    assert (mem.blocks, mem.compute, mem.gathered) == ({"mamba": planner.block_activation_bytes(m)}, 2, 2)
    gb, peak = planner.GPUS[gpu]
    ranks = 8 * nodes
    pl = planner.plan(m, mem, ranks=ranks, seq_len=2048, global_batch_tokens=2**20, tokens=10**10, memory_gb=gb,
                      gpu=True, peak_tflops=peak, mfu=0.4, flops_per_token=6 * m.params)
    assert pl.global_batch == pl.micro_batch * pl.grad_accum * ranks
    assert pl.steps * pl.global_batch * 2048 >= 10**10 > (pl.steps - 1) * pl.global_batch * 2048
    budget = planner.usable_bytes(gb)
    assert pl.memory_per_gpu <= budget
    # The chosen micro batch is the largest divisor of the per-rank batch that fits.
    per_rank = pl.global_batch // ranks
    bigger = [b for b in range(pl.micro_batch + 1, per_rank + 1) if per_rank % b == 0]
    if bigger:
        assert planner.memory_bytes(m, mem, bigger[0], 2048, ranks, pl.checkpointing) > budget
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


def test_the_summary_is_the_written_config_overrides_included(packed, tmp_path):
    plain, changed = tmp_path / "plain.yaml", tmp_path / "changed.yaml"
    proc = run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(plain))
    cfg = load_config(plain)
    # A CPU plan on this machine's memory: the tiny model fits without checkpointing, so it is off
    # in the file too (it costs ~37% of CPU throughput).
    assert cfg.fsdp.activation_checkpointing is False
    assert "activation checkpointing off" in proc.stdout and "micro batch 4 x 1 accumulation" in proc.stdout
    assert "device       cpu, precision fp32" in proc.stdout
    proc = run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(changed),
               "fsdp.activation_checkpointing=true", "trainer.micro_batch_size=2", "trainer.max_duration=50ba",
               "scheduler.t_warmup=5ba", "trainer.save_interval=25ba")
    cfg = load_config(changed)
    assert (cfg.fsdp.activation_checkpointing, cfg.trainer.micro_batch_size, cfg.trainer.max_duration) == (
        True, 2, "50ba")
    assert "activation checkpointing on" in proc.stdout
    assert "2 ranks x micro batch 2 x 2 accumulation" in proc.stdout
    assert "50 steps = 102,400 tokens" in proc.stdout and "warmup 5 steps, checkpoint every 25 steps" in proc.stdout
    assert "overrides    fsdp.activation_checkpointing=true" in proc.stdout


def test_cpu_plans_checkpoint_only_when_nothing_fits_without(packed):
    cfg = load_config(None, ["model.d_model=128", "model.n_layer=4", "model.vocab_size=512", "data.seq_len=256",
                             "trainer.precision=fp32"])
    size = planner.measure_model(cfg.model)
    mem = planner.memory_model(cfg, size, "cpu")
    assert "pure-PyTorch" in mem.path and mem.compute == 4

    def cpu_plan(budget_bytes: int) -> planner.Plan:
        memory_gb = (budget_bytes / 0.9 + 2 * planner.GIB) / 1e9  # the host share whose usable part is this
        return planner.plan(size, mem, ranks=2, seq_len=256, global_batch_tokens=8 * 256, tokens=10**6,
                            memory_gb=memory_gb, gpu=False, peak_tflops=None, mfu=0.4, flops_per_token=1)

    one_plain = planner.memory_bytes(size, mem, 1, 256, 2, checkpointing=False)
    one_checkpointed = planner.memory_bytes(size, mem, 1, 256, 2, checkpointing=True)
    assert one_checkpointed < one_plain
    roomy = cpu_plan(planner.memory_bytes(size, mem, 4, 256, 2, checkpointing=False) + 10**6)
    assert (roomy.micro_batch, roomy.checkpointing) == (4, False)
    # One window fits without checkpointing: still off (a GPU plan would turn it on below 4 windows).
    tight = cpu_plan(one_plain + 10**4)
    assert (tight.micro_batch, tight.checkpointing) == (1, False)
    budget = (one_plain + one_checkpointed) // 2
    short = cpu_plan(budget)  # only checkpointed windows fit: on, with as many as fit
    assert short.checkpointing and short.memory_per_gpu <= budget
    assert short.micro_batch == planner.micro_batch_fitting(size, mem, 256, 4, 2, budget, checkpointing=True) >= 1
    with pytest.raises(planner.PlanError, match=r"does not fit: .* per CPU rank"):
        cpu_plan(one_checkpointed - 10**4)


HYBRID = ["model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=4", "model.attn_cfg.num_heads_kv=2",
          "model.attn_cfg.rotary_emb_dim=8", "model.attn_cfg.d_conv=4", "model.d_intermediate=100"]


@pytest.mark.parametrize("ssm", ["mamba1", "mamba2", "mamba2+attention", "mamba3", "mamba3+attention", "mamba3-mimo"])
@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_activation_count_is_what_autograd_saves(ssm, precision):
    """The memory model's activations (the pure-PyTorch blocks, measured on fake tensors, plus the
    loss's per-token terms) against the tensors a real forward of a 3-layer LM saves for its
    backward, counted per storage; two batch sizes, so that per-weight copies cancel. The hybrids
    (attention in layer 1, MLPs everywhere) sum two kinds of block."""
    amp = precision == "amp_bf16"
    hybrid = HYBRID if ssm.endswith("+attention") else []
    mimo = ["model.is_mimo=true", "model.mimo_rank=2"] if ssm == "mamba3-mimo" else []  # its torch scan
    cfg = load_config(None, ["model.d_model=64", "model.n_layer=3", "model.vocab_size=512", "data.seq_len=128",
                             f"model.ssm_layer={ssm.split('+')[0].removesuffix('-mimo')}", "model.chunk_size=32",
                             "model.headdim=32", f"trainer.precision={precision}", *hybrid, *mimo])
    size = planner.measure_model(cfg.model)
    mem = planner.memory_model(cfg, size, "gpu" if amp else "cpu")
    model = build_model(cfg.model, device="cpu").to(torch.bfloat16 if amp else torch.float32)  # as FSDP gathers it
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(batch: int) -> int:
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 512, (batch, 128), generator=torch.Generator().manual_seed(batch))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(ids, position_ids=torch.arange(128).repeat(batch, 1), labels=ids)
        return sum(saved.values())

    measured = (saved_bytes(2) - saved_bytes(1)) / 128
    counted = planner.activation_bytes_per_token(size, mem, checkpointing=False) + (4 + mem.compute) * 64 + 13
    assert counted == pytest.approx(measured, rel=0.02)


def test_the_plan_says_which_kernels_it_assumed_and_adjusts(tmp_path):
    out = {}
    for kernels in ("cuda", "torch"):
        proc = run("create_mamba_config.py", "--preset", "130m", "--gpu", "A100-80GB", "--tokens", "1e9",
                   "--out", str(tmp_path / f"{kernels}.yaml"), f"model.kernels={kernels}")
        out[kernels] = proc.stdout
    assert "activations  estimated for mamba-ssm's fused kernels, counted (model.kernels=cuda)" in out["cuda"]
    assert "activations  estimated for the pure-PyTorch ops, measured (model.kernels=torch)" in out["torch"]
    fused, torch_ops = (load_config(tmp_path / f"{k}.yaml") for k in ("cuda", "torch"))
    # The torch ops keep every scan state (E x N fp32 per token): a smaller micro batch fits.
    assert fused.trainer.micro_batch_size > torch_ops.trainer.micro_batch_size


def test_a_plan_over_its_memory_budget_is_warned_with_the_numbers(tmp_path):
    out = tmp_path / "over.yaml"
    proc = run("create_mamba_config.py", "--preset", "130m", "--gpu-memory", "24", "--tokens", "1e9",
               "--out", str(out), "model.kernels=cuda", "trainer.micro_batch_size=32")
    assert load_config(out).trainer.micro_batch_size == 32  # written as asked ...
    warning = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1, proc.stderr  # ... with the estimate, the budget and what fits
    budget = planner.gb(planner.usable_bytes(24))
    assert f"per 24 GB GPU, exceeds the {budget} a plan may use" in warning[0]
    assert "at micro batch 32 with activation checkpointing off; trainer.micro_batch_size=" in warning[0]
    assert f"memory       {warning[0].split('estimate, ')[1].split(' per')[0]} of {budget}" in proc.stdout


def test_a_budget_of_many_epochs_is_warned(packed, tmp_path):
    data_tokens = json.loads((packed / "index.json").read_text())["total_tokens"]
    proc = run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(tmp_path / "c.yaml"),
               "--tokens", str(150 * data_tokens))
    assert f"repeats the {data_tokens:,} tokens of --data more than 100 times" in proc.stderr
    steps = load_config(tmp_path / "c.yaml").trainer.max_duration.removesuffix("ba")
    assert f"token budget of {int(steps) * 2048:,} tokens" in proc.stderr
    quiet = run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(tmp_path / "d.yaml"))
    assert "warning" not in quiet.stderr


def test_planning_without_data(tmp_path):
    out = tmp_path / "nodata.yaml"
    proc = run("create_mamba_config.py", "--preset", "130m", "--gpu", "H100-80GB", "--out", str(out))
    placeholder = load_config(None).data.sources
    assert load_config(out).data.sources == placeholder and load_config(out).model.vocab_size == 50280
    assert f"data.sources is the placeholder {placeholder[0]['path']}" in proc.stdout
    proc = run("create_mamba_config.py", "--preset", "tiny", "--out", str(tmp_path / "t.yaml"), ok=False)
    assert proc.returncode != 0 and "give --data DIR (a tools/pack.py directory) or --vocab-size N" in proc.stderr
    run("create_mamba_config.py", "--preset", "tiny", "--vocab-size", "512", "--out", str(tmp_path / "t.yaml"))
    assert load_config(tmp_path / "t.yaml").model.vocab_size == 512


def test_a_vocabulary_below_the_datas_is_refused(packed, tmp_path):
    """The data was packed with a 512-entry BPE: neither --vocab-size nor an override may shrink
    the model's embedding below it, even though the ids found in the data may all fit."""
    config = tmp_path / "c.yaml"
    for args, message in [
            (["--vocab-size", "300"], "the data uses a 512-token vocabulary but the model embeds only 300"),
            (["model.vocab_size=300"], "model.vocab_size=300 is below the data's 512-token vocabulary")]:
        proc = run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(config), *args,
                   ok=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not config.exists()
    run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(config), "model.vocab_size=520")
    assert load_config(config).model.vocab_size == 520


def test_a_misspelled_override_is_named_as_the_command_lines(packed, tmp_path):
    config = tmp_path / "c.yaml"
    proc = run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(config),
               "optimizer.learning_rate=1", ok=False)
    expected = ("command line (override 'optimizer.learning_rate=1'): unknown key 'optimizer.learning_rate' in "
                "section 'optimizer'; did you mean 'optimizer.lr'")
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
    assert not config.exists()
    run("create_mamba_config.py", "--preset", "tiny", "--data", str(packed), "--out", str(config))
    proc = run("mamba/train.py", str(config), "optimizer.learning_rate=1", ok=False)
    assert proc.returncode != 0 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and f"{config}: unknown key" not in proc.stderr


def test_errors_name_what_the_user_gave_never_a_temporary_file(packed, tmp_path):
    (tmp_path / "a_file").write_text("")
    cases = [(["--out", str(tmp_path)], f"--out {tmp_path} is a directory"),
             (["--out", str(tmp_path / "a_file" / "c.yaml")], f"--out {tmp_path / 'a_file' / 'c.yaml'}: cannot write it"),
             (["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "c.yaml")],
              f"--data {tmp_path / 'nope'}: no such directory")]
    for args, message in cases:
        data = [] if "--data" in args else ["--data", str(packed)]
        proc = run("create_mamba_config.py", "--preset", "tiny", *data, *args, ok=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert ".tmp" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing left behind


def test_hybrid_sizes_and_fused_attention_count_by_hand():
    """A hybrid's sizes read off the built model, and the fused count of its attention block
    written out from the module docstring (h = 4, h_kv = 2, D = 16, Q = 128; MLP 100 -> 128)."""
    cfg = load_config(None, ["model.d_model=64", "model.n_layer=3", "model.vocab_size=512",
                             "model.ssm_layer=mamba2", "model.headdim=32", *HYBRID])
    size = planner.measure_model(cfg.model)
    model = build_model(cfg.model, device="cpu")
    assert size.params == sum(p.numel() for p in model.parameters())
    assert size.layer_kinds == ("mamba", "attention", "mamba")
    assert size.largest_unit == max(max(sum(p.numel() for p in layer.parameters()) for layer in model.backbone.layers),
                                    model.backbone.embedding.weight.numel())
    d, q, i = 64, (4 + 2 * 2) * 16, 128
    mlp = 4 * d + 2 * d + 2 * 2 * i + 2 * i
    attention = 4 * d + 2 * d + 2 * q + 2 * q + 2 * (4 + 2) * 16 + 2 * 4 * 16 + 4 * 4 + mlp
    assert planner.block_activation_bytes(size, "attention") == attention
    mem = planner.memory_model(load_config(None, ["model.d_model=64", "model.n_layer=3", "model.vocab_size=512",
                                                  "model.ssm_layer=mamba2", "model.headdim=32", "model.kernels=cuda",
                                                  *HYBRID]), size, "gpu")
    per_token = 2 * mem.blocks["mamba"] + mem.blocks["attention"]
    assert planner.activation_bytes_per_token(size, mem, checkpointing=False) == per_token
    # Checkpointing every block: each keeps its input, plus the largest block recomputed.
    assert planner.activation_bytes_per_token(size, mem, checkpointing=True) == \
        3 * (4 + 2) * d + max(mem.blocks.values())


def test_mamba2attn_preset_is_the_published_shape():
    """state-spaces/mamba2attn-2.7b, counted from mamba-ssm's shapes (modules/mamba2.py, mha.py):
    58 Mamba-2 layers (E = 5120, N = 128, 80 heads of 64, one group) and 6 attention layers (30
    heads of 128, q k v = 90 x 128 channels, 4-tap conv, no biases), tied 50,277 -> 50,288 vocab."""
    preset = MODEL_PRESETS["mamba2attn-2.7b"]
    cfg = load_config(None, [f"model.{k}={v}" for k, v in preset.items() if k != "attn_cfg"] +
                      [f"model.attn_cfg.{k}={v}" for k, v in preset["attn_cfg"].items()])
    size = planner.measure_model(cfg.model)
    d, e, n, h = 2560, 5120, 128, 80
    mamba = d * (2 * e + 2 * n + h) + (e + 2 * n) * 5 + 3 * h + e + e * d + d
    q = 90 * 128
    attention = d * q + q * 5 + 30 * 128 * d + d
    vocab = 50288
    assert size.params == 58 * mamba + 6 * attention + vocab * d + d
    assert size.layer_kinds.count("attention") == 6 and size.layer_kinds[9] == "attention"


def test_hybrid_flags_write_a_valid_hybrid(tmp_path):
    out = tmp_path / "h.yaml"
    proc = run("create_mamba_config.py", "--preset", "tiny", "--attn-every", "--vocab-size", "512", "--out", str(out))
    cfg = load_config(out)
    assert cfg.model.attn_layer_idx == [2] and cfg.model.attn_cfg.num_heads == 2  # 4 layers: one in 4, head_dim 64
    assert "hybrid       attention at layers [2] (2 heads)" in proc.stdout
    proc = run("create_mamba_config.py", "--d-model", "256", "--n-layer", "16", "--vocab-size", "512",
               "--gpus-per-node", "0", "--attn-every", "--out", str(out))
    assert load_config(out).model.attn_layer_idx == [4, 12]  # one in 8, mid-group
    run("create_mamba_config.py", "--preset", "tiny", "--attn-layers", "0,3", "--vocab-size", "512",
        "--out", str(out), "model.attn_cfg.num_heads_kv=1")
    cfg = load_config(out)
    assert (cfg.model.attn_layer_idx, cfg.model.attn_cfg.num_heads_kv) == ([0, 3], 1)
    for flags, message in ((["--attn-layers", "1", "--attn-every", "2"], "not both"),
                           (["--attn-layers", "4"], "model.attn_layer_idx=[4]: give distinct layer indices in 0..3"),
                           (["--attn-every", "9"], "--attn-every 9: give 1..n_layer (4)")):
        proc = run("create_mamba_config.py", "--preset", "tiny", "--vocab-size", "512", "--out", str(out), *flags,
                   ok=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("preset,rank,chunk", [("mamba3-1.4b", 1, 64), ("mamba3-mimo-1.4b", 4, 16)])
def test_mamba3_preset_is_mamba_ssm_shape(preset, rank, chunk):
    """mamba3-1.4b counted from mamba-ssm 2.3.2's Mamba3 shapes (modules/mamba3.py): in_proj d ->
    [z, x (E each), B, C (R N each, one group), dt, A, trap (H each), S angles], dt_bias and D (H),
    B_bias and C_bias (H, R, N), B_norm and C_norm (N), with is_mimo mimo_x, mimo_z, mimo_o (H, R, P),
    out_proj E -> d, no output norm; E = 4096, H = 4096 / 64 = 64 heads of P = 64, N = 128, S = 128 *
    0.5 / 2 = 32; tied 50,280 vocab. mamba3-mimo-1.4b is the same with rank R = 4 and chunk 64 / R."""
    assert preset not in MAMBA1_PRESETS
    cfg = load_config(None, [f"model.{k}={v}" for k, v in MODEL_PRESETS[preset].items()])
    size = planner.measure_model(cfg.model)
    d, e, h, n, s, p = 2048, 4096, 64, 128, 32, 64
    mimo = 3 * h * rank * p if rank > 1 else 0
    mixer = d * (2 * e + 2 * rank * n + 3 * h + s) + h + 2 * h * rank * n + 2 * n + h + e * d + mimo
    block = mixer + d  # + the block's RMSNorm
    assert size.params == 48 * block + 50280 * d + d
    assert size.largest_unit == max(block, 50280 * d)
    assert (size.ssm_heads, size.state_size, size.rope_angles, size.chunk) == (h, n, s, chunk)
    assert size.mimo_rank == (rank if rank > 1 else 0)


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_mamba3_fused_count_by_hand(outproj_norm):
    """The fused Mamba-3 count (module docstring) written out for d = 64, E = 128, H = 4 heads of
    32, G = 2 groups of N = 16, S = 4 angles, Q = 32, W3 = 2E + 2GN + 3H + S = 332; with kernels=cuda
    on a GPU the plan uses it, and with auto it follows the Mamba-3 kernel's own probe."""
    keys = ["model.d_model=64", "model.n_layer=2", "model.vocab_size=512", "model.ssm_layer=mamba3",
            "model.headdim=32", "model.chunk_size=32", "model.d_state=16", "model.ngroups=2",
            f"model.is_outproj_norm={outproj_norm}", "trainer.precision=amp_bf16"]
    size = planner.measure_model(load_config(None, keys).model)
    d, e, h, g, n, s, q = 64, 128, 4, 2, 16, 4, 32
    w3 = 2 * e + 2 * g * n + 3 * h + s
    block = (4 * d + 2 * d + 2 * w3 + 2 * (4 * g * n + 4 * g + 4 * g * n + 2 * g * n) + 24 * h + 8 * h * s
             + 4 * e + 4 * h * n + 16 * h + math.ceil((2 * e * n + 4 * h) / q)
             + (22 * e + 4 * h if outproj_norm else 0))
    assert planner.block_activation_bytes(size) == block
    mem = planner.memory_model(load_config(None, keys + ["model.kernels=cuda"]), size, "gpu")
    assert mem.blocks == {"mamba": block} and "fused kernels, counted" in mem.path
    fused, why = planner.kernel_path("auto", "gpu", "mamba3")
    assert fused == kernels.cuda_kernels_available("mamba3")[0] and "Mamba-3 kernel" in why
