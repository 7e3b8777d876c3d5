"""Training config: schema (one dataclass per section) and strict loading."""
from mamba.config.load import ConfigError, load_config, to_dict
from mamba.config.schema import TrainConfig

__all__ = ["ConfigError", "TrainConfig", "load_config", "to_dict"]
