"""Command line of mamba/train.py: a YAML path, then `key=value` overrides."""
from __future__ import annotations

import logging
import os
import sys

from mamba.config import ConfigError
from mamba.config.load import load_config
from mamba.data.errors import DataError
from mamba.known_warnings import quiet_known_warnings
from mamba.training.rank_process import die_with_launcher, report_failure

USAGE = "usage: composer -n NPROC mamba/train.py CONFIG.yaml [section.key=value ...]"


def main(argv: list[str]) -> None:
    die_with_launcher()  # first of all: a rank must never outlive `composer` (rank_process.py)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_known_warnings()
    # Imported only now: torch and Composer take seconds to import, and until the line above a
    # killed launcher would leave this rank running.
    import torch

    from mamba.training.run_lock import RunLocked, release_held
    from mamba.training.trainer import train
    try:
        cfg = load_config(argv[0], argv[1:])
        trainer = train(cfg)
    except BaseException as err:
        release_held()  # a failed launch leaves the save folder free (run_lock.py)
        # A config error (also the rules that need the world size or the device), a data error or
        # a refused save folder says what to do: one line, no traceback (MAMBA_DEBUG=1 shows it).
        # Any error is named with its rank, after the one another rank raised first (rank_process.py).
        clear = isinstance(err, (ConfigError, DataError, RunLocked)) and not os.environ.get("MAMBA_DEBUG")
        if isinstance(err, ConfigError):
            summary = f"config error: {err}"
        elif isinstance(err, DataError):
            summary = f"data error: {err}"
        else:
            summary = str(err) if isinstance(err, RunLocked) else f"{type(err).__name__}: {err}"
        line = report_failure(err, summary, found_here=clear)
        if clear:
            sys.exit(line or summary)
        if line:
            print(line, file=sys.stderr, flush=True)
        raise
    # Close the trainer (its loggers and checkpoint writers may still talk to the other ranks),
    # then leave the process group: torch's NCCL backend otherwise warns at every run's exit that
    # destroy_process_group() was not called (seen on an H100).
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
