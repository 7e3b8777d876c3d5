"""Adapts the plain `MambaLMHeadModel` to Composer: loss, metrics, FLOPs and FSDP2 wrapping.

The model itself never imports Composer; everything Composer needs to know lives here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel

from mamba.model.block import Block
from mamba.model.flops import flops_per_token
from mamba.model.lm import MambaLMHeadModel

IGNORE_INDEX = -100  # labels with this value (loss bit 0 in the shard) contribute no loss


class ComposerMambaLM(ComposerModel):
    """A causal LM objective around `MambaLMHeadModel`.

    Batches are dicts from `mamba.data`: input_ids, labels and position_ids, each (B, L) int64.
    """

    def __init__(self, model: MambaLMHeadModel):
        super().__init__()
        self.model = model
        # Composer's FSDP2 policy asks the ComposerModel's direct child which submodules become
        # their own FSDP unit and which get activation checkpointing: one unit per Mamba block,
        # so at most one block's full parameters are gathered at a time. Embedding, final norm
        # and (tied) head stay in the root unit, which keeps weight tying intact.
        model.fsdp_wrap_fn = lambda module: isinstance(module, Block)
        model.activation_checkpointing_fn = lambda module: isinstance(module, Block)
        self._flops_per_token = flops_per_token(model.config)
        self.train_metrics = {"LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX)}
        self.eval_metrics = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "LanguagePerplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }

    def forward(self, batch: dict) -> torch.Tensor:
        """Returns logits (B, L, padded_vocab)."""
        return self.model(batch["input_ids"], position_ids=batch.get("position_ids"))

    def loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the tokens whose loss bit is set."""
        return F.cross_entropy(
            outputs.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX
        )

    def eval_forward(self, batch: dict, outputs: torch.Tensor | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict, outputs: torch.Tensor, metric) -> None:
        metric.update(outputs, batch["labels"])

    def flops_per_batch(self, batch: dict) -> int:
        """Training FLOPs (forward + backward, no recomputation) for this batch; feeds MFU."""
        return self._flops_per_token * batch["input_ids"].numel()
