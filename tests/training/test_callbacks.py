"""The gradient guard on real single-rank Composer runs: norm, clipping, NaN stop and NaN skip.

The non-finite loss is produced for real: a test-only callback writes +inf into the final norm's
weight before batch 3 (as a corrupted weight or an overflowing activation would), so the forward
pass yields NaN logits, a NaN loss and NaN gradients.
"""
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.core import Callback

from mamba.model.composer_model import ComposerMambaLM
from mamba.model.lm import MambaConfig, MambaLMHeadModel
from mamba.runs.metrics import read_metrics
from mamba.training.callbacks import GradientGuard, NonFiniteLossError
from mamba.training.metrics_file import JSONLinesLogger
from mamba.device_peaks import gpu_peak_flops

SEQ = 32


def stdlib_batches(n: int, batch: int = 4) -> torch.utils.data.DataLoader:
    """Byte-level windows of a real stdlib module: n batches of (batch, SEQ) inputs and labels."""
    data = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_bytes()
    tokens = torch.tensor(list(data[: n * batch * (SEQ + 1)]), dtype=torch.long).view(n * batch, SEQ + 1)
    windows = [{"input_ids": w[:-1], "labels": w[1:]} for w in tokens]
    return torch.utils.data.DataLoader(windows, batch_size=batch)


class PoisonNormWeight(Callback):
    """Before batch `at`, norm_f.weight[0] = +inf; after it, the clean value comes back (if `heal`).

    Also records every parameter at the end of each batch, to compare updates against.
    """

    def __init__(self, at: int, heal: bool):
        self.at, self.heal, self.snapshots = at, heal, {}

    def batch_start(self, state, logger):
        if int(state.timestamp.batch) + 1 == self.at:
            weight = state.model.model.backbone.norm_f.weight
            self._clean = weight.detach().clone()
            with torch.no_grad():
                weight[0] = math.inf

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) == self.at and self.heal:
            with torch.no_grad():
                state.model.model.backbone.norm_f.weight.copy_(self._clean)
        self.snapshots[int(state.timestamp.batch)] = {
            k: v.detach().clone() for k, v in state.model.model.state_dict().items()}


def make_trainer(tmp_path: Path, guard: Callback, poison: Callback | None, batches: int, **kw) -> Trainer:
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=256, d_state=8))
    composer_model = ComposerMambaLM(model)
    return Trainer(
        model=composer_model,
        train_dataloader=stdlib_batches(batches),
        optimizers=torch.optim.AdamW(composer_model.parameters(), lr=1e-3),
        max_duration=f"{batches}ba",
        device="cpu",
        callbacks=[guard] + ([poison] if poison else []),
        loggers=[JSONLinesLogger(str(tmp_path / "metrics.jsonl"))],
        save_folder=str(tmp_path / "ckpt"),
        save_interval="1ba",
        progress_bar=False,
        log_to_console=False,
        run_name="guard",
        seed=0,
        **kw,
    )


def test_grad_norm_is_the_pre_clip_global_norm_and_clipping_applies(tmp_path):
    """Logged norm == float64 norm of all gradients before clipping; after it, the norm is the threshold."""

    class Reference(Callback):
        def after_backward(self, state, logger):  # one microbatch per batch here: the full gradient
            grads = [p.grad.double().flatten() for p in state.model.parameters() if p.grad is not None]
            self.norm = torch.cat(grads).norm().item()

        def batch_end(self, state, logger):
            grads = [p.grad.double().flatten() for p in state.model.parameters() if p.grad is not None]
            self.clipped = torch.cat(grads).norm().item()

    reference = Reference()
    trainer = make_trainer(tmp_path, GradientGuard(0.5, "stop", str(tmp_path)), reference, 1)
    trainer.fit()
    logged = read_metrics(str(tmp_path / "metrics.jsonl"))[-1]["train/grad_norm"]
    assert reference.norm > 0.5, "the test needs a gradient large enough to be clipped"
    assert logged == pytest.approx(reference.norm, rel=1e-5)
    assert reference.clipped == pytest.approx(0.5, rel=1e-4)


def test_stop_raises_naming_the_batch_and_saves_nothing_after_the_last_good_checkpoint(tmp_path):
    poison = PoisonNormWeight(at=3, heal=False)
    trainer = make_trainer(tmp_path, GradientGuard(1.0, "stop", str(tmp_path / "ckpt")), poison, 6)
    with pytest.raises(NonFiniteLossError, match=r"in batch 3: stopped before its optimizer step.*intact"):
        trainer.fit()
    trainer.close()
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["ep0-ba1-rank0.pt", "ep0-ba2-rank0.pt", "latest-rank0.pt"], saved
    assert (tmp_path / "ckpt" / "latest-rank0.pt").resolve().name == "ep0-ba2-rank0.pt"
    weights = torch.load(tmp_path / "ckpt" / "ep0-ba2-rank0.pt", weights_only=False)["state"]["model"]
    for name, value in poison.snapshots[2].items():
        assert torch.equal(weights[f"model.{name}"], value), name
        assert torch.isfinite(value).all(), name



def test_skip_drops_exactly_the_bad_step_and_training_goes_on(tmp_path):
    poison = PoisonNormWeight(at=3, heal=True)
    guard = GradientGuard(1.0, "skip", str(tmp_path / "ckpt"))
    trainer = make_trainer(tmp_path, guard, poison, 6)
    trainer.fit()
    rows = {r["batch"]: r for r in read_metrics(str(tmp_path / "metrics.jsonl"))}
    assert math.isnan(rows[3]["loss/train/total"])
    assert [rows[b]["train/skipped_steps"] for b in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(rows[b]["loss/train/total"]) for b in (1, 2, 4, 5, 6))
    # The skipped step changed nothing: batch 3 ends with batch 2's weights, bit for bit.
    for name, value in poison.snapshots[2].items():
        assert torch.equal(poison.snapshots[3][name], value), name
    assert any(not torch.equal(poison.snapshots[4][k], v) for k, v in poison.snapshots[3].items())
    # ... and AdamW's state too: 5 optimizer steps in 6 batches.
    steps = {int(s["step"]) for s in trainer.state.optimizers[0].state.values()}
    assert steps == {5}
    assert guard.skipped_steps == 1


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "amp_bf16", 989.5e12),
    ("NVIDIA H100 PCIe", "amp_bf16", 756.5e12),
    ("NVIDIA H100 NVL", "fp32", 417.5e12),
    ("NVIDIA H200", "amp_bf16", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", "amp_bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", 156e12),
    ("NVIDIA L4", "amp_bf16", 121e12),
    ("NVIDIA L40S", "amp_bf16", 362.05e12),
    ("AMD Instinct MI300X", "amp_bf16", 1307.4e12),
    ("H100-80GB", "amp_bf16", 989.5e12),  # create_mamba_config.py's --gpu names
    ("Tesla T4", "amp_bf16", None),
])
def test_gpu_peak_table_lookup(name, precision, peak):
    assert gpu_peak_flops(name, precision) == peak
