"""Recipe for pretraining Mamba language models: packing data, the model, and Composer training.

Importing the package itself is cheap on purpose (no torch, no composer): tools such as
tools/pack.py import `mamba.data` and should start in well under a second.
"""

__version__ = "0.1.0"
