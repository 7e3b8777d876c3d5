"""Loss curves of the tiny preset with each mixer on the quickstart data: Mamba-1, Mamba-2,
Mamba-3 and Mamba-3 MIMO side by side, same data, tokens, steps and schedule (README's Mamba-3 table).

Usage:  .venv/bin/python benchmarks/ssm_curves.py [--layers mamba2 mamba3] [--steps 300]
                                                  [--out runs/ssm_curves] [--data DIR]

Packs CPython's standard library as tools/quickstart.sh does (a BPE of 8,192; reused when
OUT/packed/index.json exists, or --data DIR), writes one tiny config per mixer with
create_mamba_config.py (2 CPU ranks, the planner's batch; mamba2/mamba3 at mamba-ssm's default
d_state 128 and heads of 64), trains each with `composer -n 2` (FSDP2) and prints the training loss
(mean over each block of steps) and the tokens/s of each run. Runs that finished are reused.
Names (--layers): mamba1, mamba2, mamba3, mamba3-mimo (SHAPES).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mamba.runs.metrics import read_metrics, series  # noqa: E402

# Each run's overrides of the tiny preset: its mixer at mamba-ssm's default shape (MIMO: rank 4,
# chunk 64 / R, as mamba-ssm advises).
SHAPES = {"mamba1": ["model.ssm_layer=mamba1"],
          "mamba2": ["model.ssm_layer=mamba2", "model.d_state=128", "model.headdim=64"],
          "mamba3": ["model.ssm_layer=mamba3", "model.d_state=128", "model.headdim=64", "model.chunk_size=64"],
          "mamba3-mimo": ["model.ssm_layer=mamba3", "model.d_state=128", "model.headdim=64", "model.chunk_size=16",
                          "model.is_mimo=true", "model.mimo_rank=4"]}


def sh(*args: str, env: dict | None = None) -> None:
    subprocess.run(args, cwd=REPO, check=True, env=env)


def train(layer: str, data: Path, out: Path, steps: int) -> float:
    """Train the tiny preset with `layer` mixers for `steps` steps; returns wall seconds (0 if reused)."""
    run = out / layer
    if (run / "done").exists():
        return float((run / "done").read_text())
    sh(sys.executable, "create_mamba_config.py", "--preset", "tiny", "--data", str(data), "--out", str(run / "tiny.yaml"),
       "--run-name", f"curves-{layer}", *SHAPES[layer],
       f"trainer.max_duration={steps}ba", f"trainer.save_folder={run}/checkpoints",
       f"logging.metrics_file={run}/metrics.jsonl", "trainer.save_interval=100000ba")
    t = time.perf_counter()
    sh(str(Path(sys.executable).parent / "composer"), "-n", "2", "mamba/train.py", str(run / "tiny.yaml"),
       env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - t
    (run / "done").write_text(f"{seconds:.1f}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["mamba1", "mamba2", "mamba3", "mamba3-mimo"], choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ssm_curves")
    parser.add_argument("--data", type=Path, help="a packed directory (default: pack the standard library into OUT)")
    args = parser.parse_args()
    data = args.data or args.out / "packed"
    if not (data / "index.json").exists():
        sh(sys.executable, "tools/pack.py", "--tokenizer", "bpe:8192", "--on-bad-input", "skip", "--exclude",
           "site-packages", "--quiet", "--out", str(data), sysconfig.get_paths()["stdlib"])
    seconds = {layer: train(layer, data, args.out, args.steps) for layer in args.layers}
    losses = {layer: series(read_metrics(str(args.out / layer / "metrics.jsonl")), "loss/train/total")
              for layer in args.layers}
    rate_of = {}
    for layer in args.layers:
        rows = read_metrics(str(args.out / layer / "metrics.jsonl"))
        rate = [r["throughput/device/tokens_per_sec"] for r in rows if "throughput/device/tokens_per_sec" in r]
        rate_of[layer] = sorted(rate)[len(rate) // 2] if rate else float("nan")
    block = max(1, args.steps // 10)
    print(f"{'steps':>11} " + " ".join(f"{layer:>11}" for layer in args.layers))
    for start in range(1, args.steps + 1, block):
        end = min(args.steps, start + block - 1)
        means = [sum(losses[k].get(b, float("nan")) for b in range(start, end + 1)) / (end - start + 1)
                 for k in args.layers]
        print(f"{start:>5}-{end:<5} " + " ".join(f"{m:>11.3f}" for m in means))
    print(f"{'tokens/s':>11} " + " ".join(f"{rate_of[k]:>11.0f}" for k in args.layers)
          + "   (median logged per-rank throughput)")
    print(f"{'wall s':>11} " + " ".join(f"{seconds[k]:>11.0f}" for k in args.layers) + "   (0: reused run)")


if __name__ == "__main__":
    main()
