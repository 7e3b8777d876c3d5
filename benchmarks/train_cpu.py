"""Training throughput of the tiny config on CPU: 1 rank (a 1-rank FSDP2 mesh) vs 2 ranks (FSDP2), with and
without activation checkpointing. Prints a table; asserts nothing.

    python benchmarks/train_cpu.py [--batches 40] [--data PACKED_DIR]

Each case is the real launch line, `composer -n R mamba/train.py` with OMP_NUM_THREADS=1 (one
core per rank), on 60 packed stdlib modules unless --data is given. tokens/s per device is the
median of SpeedMonitor's windowed values after the first 10 batches (start-up excluded);
scaling efficiency = (2-rank tokens/s per device) / (1-rank tokens/s per device).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mamba.runs.metrics import read_metrics  # noqa: E402

TINY = ["model.d_model=128", "model.n_layer=4", "data.seq_len=256", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4", "scheduler.t_warmup=4ba", "logging.progress_bar=false",
        "trainer.save_interval=1000ba", "trainer.autoresume=false"]


def sh(args: list[str], **kw) -> None:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokens_per_sec(work: Path, data: Path, ranks: int, checkpointing: bool, batches: int) -> float:
    name = f"r{ranks}-ac{int(checkpointing)}"
    config = work / f"{name}.yaml"
    sh([sys.executable, "create_mamba_config.py", "--preset", "tiny", "--data", str(data), "--out", str(config),
        *TINY, f"run_name={name}", f"trainer.max_duration={batches}ba", f"scheduler.t_max={batches}ba",
        f"fsdp.activation_checkpointing={str(checkpointing).lower()}",
        f"trainer.save_folder={work}/{name}/ckpt", f"logging.metrics_file={work}/{name}/metrics.jsonl"])
    composer = Path(sys.executable).parent / "composer"
    sh([str(composer), "-n", str(ranks), "--master_port", str(free_port()), "mamba/train.py", str(config)],
       env=dict(os.environ, OMP_NUM_THREADS="1"))
    rows = read_metrics(str(work / name / "metrics.jsonl"))
    values = [r["throughput/device/tokens_per_sec"] for r in rows
              if r["batch"] > 10 and "throughput/device/tokens_per_sec" in r]
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--data", type=Path, help="a tools/pack.py directory (default: pack 60 stdlib modules)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "packed"
            stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
            sh([sys.executable, "tools/pack.py", "--tokenizer", "bpe:512", "--out", str(data), *map(str, stdlib)])
        results = {(r, ac): tokens_per_sec(work, data, r, ac, args.batches) for ac in (False, True) for r in (1, 2)}
    print(f"{'ranks':>5}  {'FSDP':>5}  {'act. ckpt':>9}  {'tokens/s/device':>15}  {'tokens/s total':>14}  {'scaling eff.':>12}")
    for (ranks, ac), tps in results.items():
        eff = tps / results[(1, ac)]
        print(f"{ranks:>5}  {'FSDP2' if ranks > 1 else 'no':>5}  {'on' if ac else 'off':>9}  "
              f"{tps:>15.0f}  {tps * ranks:>14.0f}  {eff:>12.2f}")


if __name__ == "__main__":
    main()
