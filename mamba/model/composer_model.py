"""Adapts the plain `MambaLMHeadModel` to Composer: loss, metrics, FLOPs and FSDP2 wrapping.

The model itself never imports Composer; everything Composer needs to know lives here. Nor does
this module know the loader's batch format: the trainer hands it the loader's `batch_shape`.
"""
from __future__ import annotations

from typing import Callable

import torch
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from mamba.layout import IGNORE_INDEX
from mamba.model.flops import flops_per_token
from mamba.model.lm import MambaLMHeadModel


def input_ids_shape(batch: dict) -> tuple[int, int]:
    """(B, L) of a decoded batch's input_ids (B, L)."""
    batch_size, seq_len = batch["input_ids"].shape
    return batch_size, seq_len


class ComposerMambaLM(ComposerModel):
    """A causal LM objective around `MambaLMHeadModel`.

    Batches are dicts from `mamba.data`: input_ids, labels and position_ids, each (B, L) int64.

    Training never builds the full (B, L, V) logits: `forward` returns the loss itself, computed
    inside the model's forward (so FSDP has gathered the head) chunk by chunk (mamba/model/loss.py);
    `loss` passes it on. Evaluation returns logits for Composer's metrics, sliced to the real
    vocabulary (`config.vocab_size`): the head's padded rows are not tokens, so neither the
    training loss nor the eval metrics see them; the loss's chunk size is the model's
    (`MambaConfig.loss_chunk_size`).
    No training metrics: they would need the logits training avoids; the loss itself is logged.
    Which submodules become FSDP units is decided by mamba/training/parallel.py.
    """

    def __init__(self, model: MambaLMHeadModel, batch_shape: Callable[[dict], tuple[int, int]] = input_ids_shape):
        """batch_shape(batch) -> (batch size, tokens per sequence the model sees), for
        `flops_per_batch`: the trainer passes mamba.data.loader.batch_shape, which also reads the
        loader's undecoded batches; the default reads a decoded batch's input_ids."""
        super().__init__()
        self.model = model
        self.batch_shape = batch_shape
        self.eval_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the tokens whose loss bit is set (a scalar)."""
        return self.model(batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"])

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        return outputs  # forward already computed it

    def eval_forward(self, batch: dict, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, vocab_size) over the real vocabulary (padded head rows sliced off)."""
        logits = self.model(batch["input_ids"], position_ids=batch.get("position_ids"))
        return logits[..., : self.model.config.vocab_size]

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        metric.update(outputs, batch["labels"])

    def flops_per_batch(self, batch: dict) -> int:
        """Training FLOPs (forward + backward, no recomputation) for this batch; feeds MFU.

        Composer passes the whole batch as the loader gives it; `batch_shape` reads its size.
        """
        batch_size, seq_len = self.batch_shape(batch)
        # L also caps Mamba-2's SSD chunk length in the formula.
        return flops_per_token(self.model.config, seq_len=seq_len) * batch_size * seq_len
