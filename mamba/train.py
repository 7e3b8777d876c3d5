"""Launcher: `composer -n 8 mamba/train.py config.yaml [key=value ...]`.

Run as a script, Python puts this file's folder (mamba/) first on sys.path, where the package's
own subfolders (config/, data/, model/...) would shadow installed top-level modules of the same
name for the whole run. Drop it and import the package by its full name instead.
"""
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))  # the repository root, so `mamba` imports uninstalled

from mamba.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
