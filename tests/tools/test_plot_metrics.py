"""tools/plot_metrics.py renders a PNG from the metrics file of a real (single-rank, CPU) Composer run."""
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import torch
from composer import Trainer
from composer.callbacks import LRMonitor, SpeedMonitor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from test_callbacks import stdlib_batches  # noqa: E402

from mamba.model.composer_model import ComposerMambaLM  # noqa: E402
from mamba.model.lm import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba.runs.metrics import read_metrics  # noqa: E402
from mamba.training.metrics_file import JSONLinesLogger  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from plot_metrics import curves  # noqa: E402


def test_renders_loss_lr_and_throughput_of_a_real_run(tmp_path):
    torch.manual_seed(0)
    model = ComposerMambaLM(MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=256, d_state=8)))
    metrics = tmp_path / "run" / "metrics.jsonl"
    Trainer(model=model, train_dataloader=stdlib_batches(6), max_duration="6ba", device="cpu",
            optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
            callbacks=[SpeedMonitor(window_size=2), LRMonitor()], loggers=[JSONLinesLogger(str(metrics))],
            progress_bar=False, log_to_console=False).fit()
    data = curves(read_metrics(str(metrics)))
    assert set(data) == {"loss/train/total", "lr-AdamW/group0", "throughput/device/tokens_per_sec"}
    assert data["loss/train/total"][0] == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(metrics), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (900, 800)  # figsize (8, 9) at dpi 100
    assert image.std() > 0.05, "the image is blank"


def test_a_resumed_batch_takes_the_later_line():
    rows = [{"batch": 1, "loss/train/total": 5.0}, {"batch": 2, "loss/train/total": 4.0},
            {"batch": 2, "loss/train/total": 3.5}, {"batch": 3, "loss/train/total": 3.0}]
    assert curves(rows) == {"loss/train/total": ([1, 2, 3], [5.0, 3.5, 3.0])}


def test_a_missing_file_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path / "nope.jsonl")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "nope.jsonl does not exist" in proc.stderr
