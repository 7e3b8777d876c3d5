"""Command line of mamba/train.py: a YAML path, then `key=value` overrides."""
from __future__ import annotations

import logging
import sys

from mamba.config.load import ConfigError, load_config
from mamba.training.trainer import train

USAGE = "usage: composer -n NPROC mamba/train.py CONFIG.yaml [section.key=value ...]"


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(argv[0], argv[1:])
        train(cfg)
    except ConfigError as err:  # also the rules that need the world size or the device
        sys.exit(f"config error: {err}")
