"""Gradient accumulation: one step over 8 windows equals 4 micro batches of 2, to fp32 tolerance.

A real single-rank Composer Trainer does the micro-batching (splitting the batch dict, scaling
each micro batch's mean loss by 2/8, summing gradients) exactly as in training. SGD with lr=1 and
no momentum makes the update equal to minus the accumulated gradient, so the comparison sees the
gradient itself (Adam's first step, ~lr * sign(g), would hide a wrong scale).
"""
import sysconfig
from pathlib import Path

import torch
from composer import Trainer
from torch.utils.data import DataLoader

from mamba.model.composer_model import ComposerMambaLM
from mamba.model.lm import MambaConfig, MambaLMHeadModel

SEQ, BATCH = 32, 8


def windows() -> list[dict]:
    """8 windows of real text (CPython's os.py as bytes: token id = byte value, vocab 256)."""
    data = Path(sysconfig.get_paths()["stdlib"], "os.py").read_bytes()[: BATCH * (SEQ + 1)]
    ids = torch.tensor(list(data), dtype=torch.int64).view(BATCH, SEQ + 1)
    return [{"input_ids": row[:-1], "labels": row[1:]} for row in ids]


def one_step(micro_batch_size: int) -> dict:
    torch.manual_seed(0)
    model = ComposerMambaLM(MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=256)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(windows(), batch_size=BATCH),
        optimizers=torch.optim.SGD(model.parameters(), lr=1.0),
        max_duration="1ba",
        device="cpu",
        precision="fp32",
        device_train_microbatch_size=micro_batch_size,
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )
    trainer.fit()
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters()}


def test_one_batch_of_8_equals_4_micro_batches_of_2():
    whole = one_step(8)
    accumulated = one_step(2)
    assert whole.keys() == accumulated.keys()
    assert sum(u.abs().sum().item() for u in whole.values()) > 0  # the step did move the weights
    for name in whole:
        # fp32 sums in a different order: agreement to ~1e-6 relative, far below any real bug
        # (a missing 1/4 scale or a dropped micro batch changes updates by 25-300%).
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
