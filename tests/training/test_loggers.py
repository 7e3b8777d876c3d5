"""build_loggers on a real single-rank Composer run: the JSON lines file, TensorBoard and W&B
(offline, so no account or network) all receive the same per-batch training losses.

The TensorBoard event files are read back with TensorBoard's own EventAccumulator; the W&B run
file with wandb's own record reader (the format `wandb sync` uploads later).
"""
import json
import sys
from pathlib import Path

import torch
from composer import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_callbacks import stdlib_batches  # noqa: E402

from mamba.config.load import load_config  # noqa: E402
from mamba.model.composer_model import ComposerMambaLM  # noqa: E402
from mamba.model.lm import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba.training.callbacks import build_loggers  # noqa: E402
from mamba.runs.metrics import read_metrics, series  # noqa: E402

LOSS = "loss/train/total"
BATCHES = 5


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    events = sorted(log_dir.rglob("events.out.tfevents*"))
    assert events, f"no TensorBoard event file under {log_dir}"
    values = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def wandb_history(wandb_dir: Path, key: str) -> dict[int, float]:
    """{_step: value} of `key` from the one offline run's .wandb file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    runs = sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline W&B run under {wandb_dir}, found {runs}"
    store = DataStore()
    store.open_for_scan(str(runs[0]))
    values = {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if key in row:
                values[row["_step"]] = row[key]
    return values


def test_metrics_file_tensorboard_and_wandb_get_the_same_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["run_name=loggers", f"logging.metrics_file={tmp_path}/{{run_name}}/metrics.jsonl",
                             f"logging.tensorboard_dir={tmp_path}/{{run_name}}/tb", "logging.wandb_project=mamba-tests"])
    loggers = build_loggers(cfg)
    torch.manual_seed(0)
    model = ComposerMambaLM(MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=256, d_state=8)))
    trainer = Trainer(model=model, train_dataloader=stdlib_batches(BATCHES), max_duration=f"{BATCHES}ba",
                      device="cpu", optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), loggers=loggers,
                      run_name=cfg.run_name, progress_bar=False, log_to_console=False)
    trainer.fit()
    # Closing finishes the W&B run, but its offline file is written by W&B's own service process,
    # which may still be flushing: read empty once under load even after close(). Tearing the
    # service down waits until it has written everything and exited.
    trainer.close()
    import wandb
    wandb.teardown()

    jsonl = series(read_metrics(str(tmp_path / "loggers" / "metrics.jsonl")), LOSS)
    assert sorted(jsonl) == list(range(1, BATCHES + 1))
    # Composer's loggers use its step (batches completed before the batch), the metrics file the
    # batch's own number: batch n is step n - 1.
    tensorboard = {step + 1: v for step, v in tensorboard_scalars(tmp_path / "loggers" / "tb", LOSS).items()}
    wandb = {step + 1: v for step, v in wandb_history(tmp_path, LOSS).items()}
    assert sorted(tensorboard) == sorted(jsonl), f"TensorBoard steps {sorted(tensorboard)}"
    assert sorted(wandb) == sorted(jsonl), f"W&B steps {sorted(wandb)}"
    for b, loss in jsonl.items():
        assert abs(tensorboard[b] - loss) <= 1e-6 * loss, (b, tensorboard[b], loss)  # TensorBoard stores float32
        assert wandb[b] == loss, (b, wandb[b], loss)
