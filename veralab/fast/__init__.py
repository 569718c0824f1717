"""veralab.fast: the production VeRA path (PEFT's API and names; `get_model` replaces `get_peft_model`)."""

from veralab.fast.functional import adapter_delta, mixed_adapter_delta
from veralab.fast.io import AdapterLoadError, ProjectionMismatchError
from veralab.fast.layer import VeraLinear
from veralab.fast.model import VeraModel, get_model
from veralab.fast.projections import SharedProjections, find_max_dims, init_projections, kaiming_init

__all__ = [
    "AdapterLoadError",
    "ProjectionMismatchError",
    "SharedProjections",
    "VeraLinear",
    "VeraModel",
    "VeraTrainer",
    "VeraTrainerMixin",
    "adapter_delta",
    "find_max_dims",
    "get_model",
    "init_projections",
    "kaiming_init",
    "mixed_adapter_delta",
]


def __getattr__(name: str):
    # The Trainer integration imports transformers.Trainer (and accelerate): loaded only when asked for.
    if name in ("VeraTrainer", "VeraTrainerMixin"):
        from veralab.fast import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'veralab.fast' has no attribute {name!r}")
