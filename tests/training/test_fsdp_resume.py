"""The real launch line on 2 CPU ranks with FSDP2: loss falls, and resume is bit-identical.

Three `composer -n 2 mamba/train.py` launches (each ~10 s of start-up, so no more):
  A  20 batches uninterrupted;
  B  the same run stopped after batch 10 (max_duration=10ba, schedule still 20 batches long);
  B' the same command with max_duration=20ba: autoresume picks up B's checkpoint at batch 10.
B' must end with exactly A's loss: same weights, optimizer state, data order and RNG.
"""
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mamba.training.metrics_file import read_metrics

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
         *map(str, sources)], cwd=REPO)
    config = work / "tiny.yaml"
    run([sys.executable, "create_mamba_config.py", "--preset", "tiny", "--data", str(work / "packed"),
         "--out", str(config), "model.d_model=64", "model.n_layer=2", "data.seq_len=64",
         "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "scheduler.t_warmup=4ba",
         "scheduler.t_max=20ba", "trainer.save_interval=10ba", "trainer.progress_bar=false",
         f"trainer.save_folder={work}/{{run_name}}/ckpt", f"metrics_file={work}/{{run_name}}/metrics.jsonl"],
        cwd=REPO)
    return config


def launch(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run([str(COMPOSER), "-n", "2", "--master_port", str(free_port()), "mamba/train.py", str(config),
                *overrides], cwd=REPO, timeout=600)


def losses(config: Path, run_name: str) -> dict[int, float]:
    rows = read_metrics(str(config.parent / run_name / "metrics.jsonl"))
    return {r["batch"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}


def test_two_rank_fsdp_training_learns_and_resumes_bit_identically(tiny_config):
    launch(tiny_config, "run_name=whole", "trainer.max_duration=20ba")
    whole = losses(tiny_config, "whole")
    assert sorted(whole) == list(range(1, 21))
    first, last = sum(whole[b] for b in range(1, 4)) / 3, sum(whole[b] for b in range(18, 21)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"

    launch(tiny_config, "run_name=split", "trainer.max_duration=10ba")
    ckpts = sorted(p.name for p in (tiny_config.parent / "split" / "ckpt").iterdir())
    assert any("ba10" in name for name in ckpts), ckpts
    assert max(losses(tiny_config, "split")) == 10

    launch(tiny_config, "run_name=split", "trainer.max_duration=20ba")
    split = losses(tiny_config, "split")
    assert min(b for b in split if b > 10) == 11, "the resumed run did not start at batch 11"
    assert split[20] == whole[20], f"resumed final loss {split[20]!r} != uninterrupted {whole[20]!r}"
    for b in range(11, 21):
        assert split[b] == whole[b], f"batch {b}: {split[b]!r} != {whole[b]!r}"
