"""Warnings from dependencies that say nothing to a user of this recipe, each filtered precisely.

Every entry names the message (a regex on its start) and the module the warning is attributed to,
so the same text from anywhere else, and every other warning, still shows. Each says why it is
harmless here; drop an entry when the dependency stops warning.
"""
from __future__ import annotations

import warnings

# (message regex, module regex, why it is harmless here)
KNOWN = [
    (r"FSDP2 Config/APIs are experimental", r"composer\.utils\.parallelism",
     "Composer 0.32 marks its FSDP2 support experimental; this recipe uses it and tests it (1 vs 2 "
     "ranks, resharded resume)"),
    (r"TypedStorage is deprecated", r"torch\.distributed\.checkpoint\.",
     "torch's own checkpoint writer calls tensor.storage() while saving; no code of ours does"),
    (r"torch\.distributed is disabled, unavailable or uninitialized", r"torch\.distributed\.checkpoint\.",
     "tools/ read sharded checkpoints in one process on purpose (mamba/runs/checkpoints.py)"),
]


def quiet_known_warnings() -> None:
    """Install the filters (idempotent: warnings.filterwarnings replaces an identical filter)."""
    for message, module, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
