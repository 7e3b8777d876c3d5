"""The error the training data's checks raise, in a module of its own.

`mamba/train.py` reports it like a config error: one line naming the file and what to do, on
every rank, without a traceback (MAMBA_DEBUG=1 shows it), because the fix is in the data, not in
the code.
"""


class DataError(ValueError):
    """Training data that cannot be trained on; the message names the file and how to fix it."""
