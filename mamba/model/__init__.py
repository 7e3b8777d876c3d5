"""The Mamba-1 language model in plain PyTorch (mamba-ssm's parameter names); no Composer here."""
from mamba.model.lm import MambaConfig, MambaLMHeadModel

__all__ = ["MambaConfig", "MambaLMHeadModel"]
