"""Plot a run's curves from its metrics file: loss (train and eval), learning rate, throughput.

    python tools/plot_metrics.py runs/NAME/metrics.jsonl [--out curves.png]

The file is the JSON lines written by logging.metrics_file (one line per batch, plus one per eval).
A resumed run appends to it, so a batch may appear twice; the later line (the resumed run's) wins.
Needs matplotlib (`pip install -e .[monitor]`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# (metric key, label, panel): the panels are loss, lr, throughput; keys as mamba/training/callbacks.py logs them
CURVES = [
    ("loss/train/total", "train loss", 0),
    ("metrics/eval/LanguageCrossEntropy", "eval loss", 0),
    ("lr-AdamW/group0", "learning rate", 1),
    ("throughput/device/tokens_per_sec", "tokens/s per device", 2),
]
PANELS = ["loss", "learning rate", "tokens/s per device"]


def curves(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (batches, values), one value per batch (the last line for it), in batch order."""
    from mamba.runs.metrics import series  # sys.path is set in __main__

    out = {}
    for key, _, _ in CURVES:
        points = series(rows, key)
        if points:
            xs = sorted(points)
            out[key] = (xs, [points[x] for x in xs])
    return out


def plot(metrics_path: Path, out_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    from mamba.files import write_atomic
    from mamba.runs.metrics import read_metrics

    data = curves(read_metrics(str(metrics_path)))
    if "loss/train/total" not in data:
        raise SystemExit(f"{metrics_path}: no 'loss/train/total' values; is it a logging.metrics_file of a run?")
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 9), sharex=True)
    for key, label, panel in CURVES:
        if key in data:
            axes[panel].plot(*data[key], label=label, marker="o" if panel == 0 and "eval" in key else None)
    for ax, title in zip(axes, PANELS):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, "not logged yet", transform=ax.transAxes, ha="center")
    axes[-1].set_xlabel("batch")
    fig.suptitle(metrics_path.parent.name or str(metrics_path))
    fig.tight_layout()
    write_atomic(out_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics", type=Path, help="a metrics.jsonl written by logging.metrics_file")
    parser.add_argument("--out", type=Path, help="PNG to write (default: next to METRICS, .png suffix)")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        raise SystemExit(f"{args.metrics} does not exist; pass the run's logging.metrics_file")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("plot_metrics needs matplotlib: pip install matplotlib (or pip install -e .[monitor])")
    out = args.out or args.metrics.with_suffix(".png")
    plot(args.metrics, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
    main()
