"""The error every config rule raises, in a module of its own.

Rules that can only run at training time (the world size, the device) live beside the code that
knows those facts (mamba/training/parallel.py) and raise the same type, so `mamba/train.py`
reports them like a loading error without that code importing the loader.
"""


class ConfigError(ValueError):
    """A config that cannot be trained on; the message says which key and how to fix it."""
