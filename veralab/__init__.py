"""veralab: VeRA (Vector-based Random Matrix Adaptation), taught by a reference path and shipped by a fast
one.

`veralab.reference` is the readable ground truth; `veralab.fast` is the production path
(`veralab.fast.get_model`); `veralab.app` is the `veralab` command, an application built on them.
Importing `veralab` stays light: only the config is loaded here.
"""

from veralab.config import VeraConfig

__all__ = ["VeraConfig"]
__version__ = "0.1.0"
