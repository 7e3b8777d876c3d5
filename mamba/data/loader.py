"""The training DataLoader: packed windows, split across ranks by a seeded DistributedSampler."""
from __future__ import annotations

import torch
from composer.utils import dist

from mamba.config.schema import DataConfig
from mamba.data.dataset import PackedDataset


def build_train_dataloader(cfg: DataConfig, batch_size: int, vocab_size: int, seed: int):
    """A DataLoader yielding per-rank batches of `batch_size` windows.

    Each batch is a dict of (batch_size, seq_len) int64 tensors: input_ids, labels, position_ids.
    Every rank builds the same sampler permutation from `seed` and takes its own slice, so the
    global sample order depends only on the seed; Composer calls `sampler.set_epoch` each epoch
    and, on resume, skips the batches already seen in the epoch.
    """
    dataset = PackedDataset(cfg.train, cfg.seq_len)
    dataset.check_vocab(vocab_size)
    per_step = batch_size * dist.get_world_size()
    if len(dataset) < per_step:
        raise ValueError(
            f"{cfg.train}: only {len(dataset)} windows of data.seq_len={cfg.seq_len}+1 tokens, fewer "
            f"than one global batch ({per_step}); pack more text or lower the batch size / seq_len"
        )
    sampler = dist.get_sampler(dataset, shuffle=cfg.shuffle, drop_last=True, seed=seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
    )
