"""Launcher: `composer -n 8 mamba/train.py config.yaml [key=value ...]`; the work is in
mamba.training.cli.

Run as a script, Python puts this file's folder (mamba/) first on sys.path, where the package's
subfolders (config/, data/, model/...) would shadow installed top-level modules of those names.
Importing the package drops that folder again (mamba/__init__.py) before anything else loads.
"""
import sys

try:
    from mamba.training.cli import main
except ModuleNotFoundError as err:
    if err.name != "mamba":
        raise
    sys.exit("mamba/train.py: the mamba package is not installed in this Python; "
             "run `pip install -e .` in the checkout (README's setup does)")

if __name__ == "__main__":
    main(sys.argv[1:])
