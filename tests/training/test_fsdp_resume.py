"""The real launch line on 2 CPU ranks with FSDP2: loss falls, runs are deterministic, resume is
bit-identical, FSDP trains the same model as one device, and the other strategies work.

Nine `composer -n 2 mamba/train.py` launches (each ~10 s of start-up, so no more), all evaluating
on a held-out split every 10 batches:
  A  20 batches uninterrupted; rank 1 builds the model on the meta device and gets rank 0's
     weights when FSDP2 shards it (Composer's sync_module_states, seen in rank 0's log);
  B  the same run stopped after batch 10 (max_duration=10ba, schedule still 20 batches long):
     its 10 losses must equal A's bit for bit (same config and seed give the same losses);
  B' the same command with max_duration=20ba: autoresume picks up B's checkpoint at batch 10.
     B' must end with exactly A's loss: same weights, optimizer state, data order and RNG.
  C  A with SHARD_GRAD_OP and checkpointing of every 2nd block, exporting the final model to HF:
     the same losses as A up to fp32 reduction order.
  D  HYBRID_SHARD with one replica (the shard group is both ranks), untied embedding and head
     (their own FSDP units), WSD on token durations: trains, and the logged lr follows the schedule.
  E  NO_SHARD: two replicas, gradients all-reduced across them (where gloo can average: the same
     losses and gradient norms as A; elsewhere refused with the reason).
  F  a hybrid (Mamba-2 with an attention layer, GQA, RoPE, conv and MLPs) with activation
     checkpointing of every block, 6 batches exporting at the end; relaunched with its newest
     checkpoint deleted, it resumes from batch 3 and retrains batches 4..6 to the same losses.
  G  Mamba-3 mixers (SISO) with activation checkpointing, 20 batches: the loss falls as A's does.
and one single-process run (a 1-rank FSDP2 mesh, no gradient reduction): the same losses and gradient norms as A (rank 1's shards
got rank 0's initial weights, and FSDP2 averages gradients over ranks, not sums them, whatever the
backend).
"""
import math
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mamba.runs.metrics import read_metrics, series

REPO = Path(__file__).resolve().parents[2]
COMPOSER = Path(sys.executable).parent / "composer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """Pack 60 real stdlib modules with a freshly trained BPE; write a tiny config for them."""
    work = tmp_path_factory.mktemp("fsdp")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(p for p in stdlib.glob("*.py"))[:60]
    run([sys.executable, "tools/pack.py", "--tokenizer", "bpe:512", "--out", str(work / "packed"),
         "--val-fraction", "0.1", *map(str, sources)], cwd=REPO)
    config = work / "tiny.yaml"
    run([sys.executable, "create_mamba_config.py", "--preset", "tiny", "--data", str(work / "packed" / "train"),
         "--eval-data", str(work / "packed" / "val"),
         "--out", str(config), "trainer.eval_interval=10ba", "trainer.eval_subset_num_batches=2", "model.d_model=64", "model.n_layer=2", "data.seq_len=64",
         "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "scheduler.t_warmup=4ba",
         "scheduler.t_max=20ba", "trainer.save_interval=10ba", "logging.progress_bar=false",
         f"trainer.save_folder={work}/{{run_name}}/ckpt", f"logging.metrics_file={work}/{{run_name}}/metrics.jsonl"],
        cwd=REPO)
    return config


def launch(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run([str(COMPOSER), "-n", "2", "--master_port", str(free_port()), "mamba/train.py", str(config),
                *overrides], cwd=REPO, timeout=600)


def logged(config: Path, run_name: str, key: str) -> dict[int, float]:
    """{batch: value} of one metric from a run's metrics.jsonl."""
    return series(read_metrics(str(config.parent / run_name / "metrics.jsonl")), key)


def losses(config: Path, run_name: str) -> dict[int, float]:
    return logged(config, run_name, "loss/train/total")


def close(a: dict[int, float], b: dict[int, float], rtol: float, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: batches {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert abs(a[k] - b[k]) <= rtol * abs(b[k]), f"{what} at batch {k}: {a[k]} vs {b[k]}"


def test_two_rank_fsdp_training_learns_and_resumes_bit_identically(tiny_config):
    proc = launch(tiny_config, "run_name=whole", "trainer.max_duration=20ba")
    assert "Sync Module States" in proc.stderr, "rank 1 did not build on meta and receive rank 0's weights"
    whole = losses(tiny_config, "whole")
    assert sorted(whole) == list(range(1, 21))
    first, last = sum(whole[b] for b in range(1, 4)) / 3, sum(whole[b] for b in range(18, 21)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"

    launch(tiny_config, "run_name=split", "trainer.max_duration=10ba")
    ckpts = sorted(p.name for p in (tiny_config.parent / "split" / "ckpt").iterdir())
    assert any("ba10" in name for name in ckpts), ckpts
    first_half = losses(tiny_config, "split")
    assert max(first_half) == 10
    assert all(first_half[b] == whole[b] for b in range(1, 11)), "same config and seed gave different losses"

    launch(tiny_config, "run_name=split", "trainer.max_duration=20ba")
    split = losses(tiny_config, "split")
    assert min(b for b in split if b > 10) == 11, "the resumed run did not start at batch 11"
    assert split[20] == whole[20], f"resumed final loss {split[20]!r} != uninterrupted {whole[20]!r}"
    for b in range(11, 21):
        assert split[b] == whole[b], f"batch {b}: {split[b]!r} != {whole[b]!r}"


def whole_run(config: Path) -> None:
    if not (config.parent / "whole" / "metrics.jsonl").exists():  # when run alone
        launch(config, "run_name=whole", "trainer.max_duration=20ba")


def test_fsdp_on_two_ranks_trains_the_same_model_as_one_process(tiny_config):
    whole_run(tiny_config)
    # 5 batches in one process: a 1-rank mesh, no gradient reduction (Composer runs world size 1).
    run([sys.executable, "mamba/train.py", str(tiny_config), "run_name=single", "trainer.max_duration=5ba"],
        cwd=REPO, timeout=600)
    first = range(1, 6)
    for key in ("loss/train/total", "train/grad_norm"):
        two, one = logged(tiny_config, "whole", key), logged(tiny_config, "single", key)
        close({b: two[b] for b in first}, one, 1e-5, key)  # fp32 sums in another order


def test_shard_grad_op_with_sparse_checkpointing_matches_evaluates_and_exports_hf(tiny_config):
    from mamba.config.load import load_config

    run_dir = tiny_config.parent / "gradop"
    launch(tiny_config, "run_name=gradop", "trainer.max_duration=20ba", "fsdp.sharding_strategy=SHARD_GRAD_OP",
           "fsdp.activation_checkpointing=true", "fsdp.activation_checkpointing_every=2", "trainer.export_hf=true")
    whole_run(tiny_config)
    close(losses(tiny_config, "gradop"), losses(tiny_config, "whole"), 1e-6, "loss")
    # Evaluated at batches 10 and 20 on the held-out split, loss and perplexity consistent.
    ce = logged(tiny_config, "gradop", "metrics/eval/LanguageCrossEntropy")
    ppl = logged(tiny_config, "gradop", "metrics/eval/LanguagePerplexity")
    assert sorted(ce) == [10, 20] and sorted(ppl) == [10, 20], (ce, ppl)
    assert ce[20] < ce[10], f"eval loss did not fall: {ce}"
    for b in ce:
        assert abs(ppl[b] - math.exp(ce[b])) <= 1e-4 * ppl[b]
    # The run wrote its resolved config next to the checkpoints, and it loads back to the same run.
    cfg = load_config(run_dir / "ckpt" / "config.yaml")
    assert (cfg.run_name, cfg.fsdp.sharding_strategy, cfg.trainer.export_hf) == ("gradop", "SHARD_GRAD_OP", True)
    hf = run_dir / "ckpt" / "hf"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()


def test_hybrid_shard_untied_head_and_token_wsd_schedule(tiny_config):
    # 8 windows x 64 tokens = 512 tokens per batch; 12 batches = 6144 tokens: warmup 1024 tokens
    # (2 batches), stable to 4096, decay over the last 2048 (batches 8..12) linearly to 0.
    launch(tiny_config, "run_name=hybrid", "trainer.max_duration=6144tok", "fsdp.sharding_strategy=HYBRID_SHARD",
           "fsdp.shard_degree=2", "model.tie_embeddings=false", "scheduler.name=wsd", "scheduler.t_warmup=1024tok",
           "scheduler.t_max=1dur", "scheduler.t_decay=2048tok", "scheduler.decay_shape=linear", "scheduler.alpha_f=0",
           "trainer.save_interval=6ba")
    rows = read_metrics(str(tiny_config.parent / "hybrid" / "metrics.jsonl"))
    lrs = {r["batch"]: r[k] for r in rows for k in r if k.startswith("lr-")}
    peak = max(lrs.values())
    # LRMonitor logs the lr each batch trained with: batch b ran at the schedule's value after b - 1 batches.
    expected = {1: 0.0, 2: 0.5, 3: 1.0, 6: 1.0, 9: 1.0, 10: 0.75, 11: 0.5, 12: 0.25}
    for b, factor in expected.items():
        assert abs(lrs[b] - factor * peak) <= 1e-9 * peak, f"batch {b}: lr {lrs[b]} != {factor} x {peak}"
    trained = losses(tiny_config, "hybrid")
    assert sorted(trained) == list(range(1, 13)) and all(v == v for v in trained.values())
    assert any("ba12" in p.name for p in (tiny_config.parent / "hybrid" / "ckpt").iterdir())


def test_two_replicas_average_like_one_process_where_gloo_averages(tiny_config):
    """NO_SHARD on 2 ranks: a (2 replicas, 1 shard) mesh, gradients all-reduced across replicas.
    On a CPU that needs gloo's all-reduce to honour ReduceOp.AVG (mamba.capabilities): where it does
    (the current stack) the run trains the same model as one process; where it does not (the pinned
    stack) it is refused before training, saying why and what to use."""
    from mamba.capabilities import gloo_averaging

    args = [str(COMPOSER), "-n", "2", "--master_port", str(free_port()), "mamba/train.py", str(tiny_config),
            "run_name=replicas", "trainer.max_duration=5ba", "fsdp.sharding_strategy=NO_SHARD"]
    if not gloo_averaging().all_reduce:
        proc = subprocess.run(args, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode != 0
        assert "fsdp.sharding_strategy=NO_SHARD with 2 replicas needs GPUs" in proc.stderr, proc.stderr[-3000:]
        return
    run(args, cwd=REPO, timeout=600)
    whole_run(tiny_config)
    for key in ("loss/train/total", "train/grad_norm"):
        two, replicas = logged(tiny_config, "whole", key), logged(tiny_config, "replicas", key)
        close(replicas, {b: two[b] for b in range(1, 6)}, 1e-5, key)  # fp32 sums in another order


HYBRID = ("model.ssm_layer=mamba2", "model.headdim=32", "model.attn_layer_idx=[1]", "model.attn_cfg.num_heads=4",
          "model.attn_cfg.num_heads_kv=2", "model.attn_cfg.rotary_emb_dim=8", "model.attn_cfg.d_conv=4",
          "model.d_intermediate=64", "fsdp.activation_checkpointing=true", "trainer.export_hf=true",
          "trainer.save_interval=3ba", "trainer.max_duration=6ba")


def test_hybrid_trains_with_checkpointing_resumes_bit_identically_and_exports(tiny_config):
    import shutil

    from mamba.model.hf import model_from_pretrained

    launch(tiny_config, "run_name=hybrid_attn", *HYBRID)
    folder = tiny_config.parent / "hybrid_attn" / "ckpt"
    first = losses(tiny_config, "hybrid_attn")
    assert sorted(first) == list(range(1, 7)) and all(math.isfinite(v) for v in first.values())
    exported = model_from_pretrained(folder / "hf")
    assert [type(layer.mixer).__name__ for layer in exported.backbone.layers] == ["Mamba2", "MHA"]
    newest = [p for p in folder.iterdir() if "ba6" in p.name]
    assert newest, sorted(p.name for p in folder.iterdir())
    for p in newest:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    launch(tiny_config, "run_name=hybrid_attn", *HYBRID)
    rows = [r["batch"] for r in read_metrics(str(folder.parent / "metrics.jsonl")) if "loss/train/total" in r]
    assert sorted(rows) == [1, 2, 3, 4, 4, 5, 5, 6, 6], f"not resumed from batch 3: {rows}"
    again = losses(tiny_config, "hybrid_attn")  # a resumed batch's later line wins
    for b in (4, 5, 6):
        assert again[b] == first[b], f"batch {b} after resuming from batch 3: {again[b]!r} != {first[b]!r}"


@pytest.mark.parametrize("run,form", [("mamba3", ["model.chunk_size=16"]),  # SISO
                                      ("mamba3_mimo", ["model.chunk_size=8", "model.is_mimo=true", "model.mimo_rank=2"])])
def test_mamba3_trains_with_fsdp2_and_checkpointing_like_mamba1(tiny_config, run, form):
    launch(tiny_config, f"run_name={run}", "model.ssm_layer=mamba3", "model.d_state=32", "model.headdim=32", *form,
           "fsdp.activation_checkpointing=true", "trainer.max_duration=20ba")
    trained = losses(tiny_config, run)
    assert sorted(trained) == list(range(1, 21))
    first, last = sum(trained[b] for b in range(1, 4)) / 3, sum(trained[b] for b in range(18, 21)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    whole_run(tiny_config)
    whole = losses(tiny_config, "whole")
    # Within a nat of the Mamba-1 run at the end (same data, schedule, steps): learning, not diverging.
    assert abs(last - sum(whole[b] for b in range(18, 21)) / 3) < 1.0
