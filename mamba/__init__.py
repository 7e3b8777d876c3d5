"""Recipe for pretraining Mamba language models: packing data, the model, and Composer training.

Importing the package itself is cheap on purpose (no torch, no composer): tools such as
tools/pack.py import `mamba.data` and should start in well under a second.
"""

import os
import sys

__version__ = "0.1.0"

# `composer -n 8 mamba/train.py` runs a file of this package as a script, and Python then puts this
# folder first on sys.path: config/, data/, model/, runs/ ... would shadow installed top-level
# modules of the same names for the whole run. The package is imported by its full name, so the
# folder is never needed there; drop it before anything else is imported.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
