"""Training config: schema (one dataclass per section), strict loading, and the error type.

    schema.py   the dataclasses; their defaults are the default (1.6b) recipe
    load.py     YAML / dict + overrides -> validated TrainConfig
    errors.py   ConfigError, raised by every config rule (also the training-time ones)
    presets.py  model shapes and recipe sizes for create_mamba_config.py
    memory.py   the memory model: bytes per rank from the model built on the meta device
    planner.py  batch layout and durations from it (memory.py and planner.py import mamba.model:
                import them explicitly, never from here, so that mamba.model may import
                mamba.config.schema)
"""
from mamba.config.errors import ConfigError
from mamba.config.schema import TrainConfig

# The loader (omegaconf, and the data mixture's weight rule) is imported from mamba.config.load by
# those who load: the model imports mamba.config.schema, and so this package, and must not pull in
# mamba.data with it.
__all__ = ["ConfigError", "TrainConfig"]
