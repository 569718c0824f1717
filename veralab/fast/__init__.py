"""veralab.fast: the production VeRA path (PEFT's API and names; `get_model` replaces `get_peft_model`)."""

from veralab.fast.diagnostics import (
    SavedStorage,
    layers_sharing_inputs,
    saved_activation_bytes,
    saved_activations,
)
from veralab.fast.dispatch import ACTIVATION_SPACE, WEIGHT_SPACE, choose_path, path_costs
from veralab.fast.errors import AdapterLoadError, ProjectionMismatchError
from veralab.fast.functional import activation_space_vera, mixed_batch_vera, weight_space_vera
from veralab.fast.layer import VeraLinear
from veralab.fast.model import VeraModel, get_model
from veralab.fast.projections import SharedProjections, find_max_dims, init_projections, kaiming_init

__all__ = [
    "ACTIVATION_SPACE",
    "WEIGHT_SPACE",
    "AdapterLoadError",
    "ProjectionMismatchError",
    "SavedStorage",
    "SharedProjections",
    "VeraLinear",
    "VeraModel",
    "VeraTrainer",
    "VeraTrainerMixin",
    "activation_space_vera",
    "choose_path",
    "find_max_dims",
    "get_model",
    "init_projections",
    "kaiming_init",
    "layers_sharing_inputs",
    "mixed_batch_vera",
    "path_costs",
    "saved_activation_bytes",
    "saved_activations",
    "weight_space_vera",
]


def __getattr__(name: str):
    # The Trainer integration imports transformers.Trainer (and accelerate): loaded only when asked for.
    if name in ("VeraTrainer", "VeraTrainerMixin"):
        from veralab.fast import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'veralab.fast' has no attribute {name!r}")
