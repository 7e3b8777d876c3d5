"""Command line of mamba/train.py: a YAML path, then `key=value` overrides."""
from __future__ import annotations

import logging
import sys

import torch

from mamba.config import ConfigError
from mamba.config.load import load_config
from mamba.training.trainer import train

USAGE = "usage: composer -n NPROC mamba/train.py CONFIG.yaml [section.key=value ...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(argv[0], argv[1:])
        trainer = train(cfg)
    except ConfigError as err:  # also the rules that need the world size or the device
        sys.exit(f"config error: {err}")
    # Close the trainer (its loggers and checkpoint writers may still talk to the other ranks),
    # then leave the process group: torch's NCCL backend otherwise warns at every run's exit that
    # destroy_process_group() was not called (seen on an H100).
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
