"""Gradient accumulation: one step over 8 windows equals 4 micro batches of 2, and both equal the
gradient of the plain mean cross-entropy over the step's loss-bearing tokens, to fp32 tolerance.

The windows carry uneven loss masks (as chat data does: only some tokens are trained on), so the
micro batches hold different numbers of counted tokens; weighting each micro batch's mean by its
token share (Composer's accumulate_train_batch_on_tokens with mamba.data.loader.count_tokens, as
mamba/training/trainer.py sets it up) is what makes the step exact. A real single-rank Composer
Trainer does the micro-batching and the on-device decode of the packed words. SGD with lr=1 and
no momentum makes the update equal to minus the accumulated gradient, so the comparison sees the
gradient itself (Adam's first step, ~lr * sign(g), would hide a wrong scale).
"""
import sysconfig
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from composer import Trainer
from torch.utils.data import DataLoader

from mamba import layout
from mamba.data.dataset import decode_windows
from mamba.data.loader import as_data_spec
from mamba.layout import IGNORE_INDEX
from mamba.model.composer_model import ComposerMambaLM
from mamba.model.lm import MambaConfig, MambaLMHeadModel

SEQ, BATCH = 32, 8


def words() -> torch.Tensor:
    """8 packed windows (8, SEQ + 1) of real text (CPython's os.py as bytes, vocab 256): windows 0
    and 1 train on every token, the others only on their last 4 (micro batches of 2 then hold 64,
    8, 8 and 8 targets)."""
    data = Path(sysconfig.get_paths()["stdlib"], "os.py").read_bytes()[: BATCH * (SEQ + 1)]
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64).reshape(BATCH, SEQ + 1)
    positions = np.tile(np.arange(SEQ + 1), (BATCH, 1))
    loss = np.zeros((BATCH, SEQ + 1), dtype=bool)
    loss[:2] = True
    loss[2:, -4:] = True
    flat = layout.encode(ids.ravel(), positions.ravel(), loss.ravel())  # encode takes 1-D arrays
    return torch.from_numpy(flat.reshape(BATCH, SEQ + 1))


def new_model() -> ComposerMambaLM:
    torch.manual_seed(0)
    return ComposerMambaLM(MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=256)))


def one_step(micro_batch_size: int) -> dict:
    model = new_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model,
        train_dataloader=as_data_spec(DataLoader([{"words": w} for w in words()], batch_size=BATCH)),
        optimizers=torch.optim.SGD(model.parameters(), lr=1.0),
        max_duration="1ba",
        device="cpu",
        precision="fp32",
        device_train_microbatch_size=micro_batch_size,
        accumulate_train_batch_on_tokens=True,
        progress_bar=False,
        log_to_console=False,
        seed=0,
    )
    trainer.fit()
    return {n: (p.detach() - before[n]) for n, p in model.named_parameters()}


def plain_gradient() -> dict:
    """Minus the gradient of F.cross_entropy's mean over all counted tokens of the whole batch."""
    model = new_model()
    batch = decode_windows(words())
    assert (batch["labels"] != IGNORE_INDEX).sum() == 2 * SEQ + 6 * 4
    logits = model.model(batch["input_ids"], batch["position_ids"])[..., :256]
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return {n: -p.grad for n, p in model.named_parameters()}


def test_one_batch_of_8_equals_4_micro_batches_of_2_equals_the_token_mean():
    whole = one_step(8)
    accumulated = one_step(2)
    reference = plain_gradient()
    assert whole.keys() == accumulated.keys() == reference.keys()
    assert sum(u.abs().sum().item() for u in whole.values()) > 0  # the step did move the weights
    for name in whole:
        # fp32 sums in a different order: agreement to ~1e-6 relative, far below any real bug
        # (a missing scale, per-sample instead of per-token weights (here 4x off for the first
        # micro batch) or a dropped micro batch changes updates by 25-300%).
        torch.testing.assert_close(whole[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
