"""veralab.fast: the production VeRA path (PEFT's API and names; `get_model` replaces `get_peft_model`)."""

from veralab.fast.functional import (
    ACTIVATION_SPACE,
    WEIGHT_SPACE,
    activation_space_vera,
    choose_path,
    mixed_batch_vera,
    path_costs,
    weight_space_vera,
)
from veralab.fast.layer import VeraLinear
from veralab.fast.model import VeraModel, get_model
from veralab.fast.projections import SharedProjections, find_max_dims, init_projections, kaiming_init

__all__ = [
    "ACTIVATION_SPACE",
    "WEIGHT_SPACE",
    "SharedProjections",
    "VeraLinear",
    "VeraModel",
    "activation_space_vera",
    "choose_path",
    "find_max_dims",
    "get_model",
    "init_projections",
    "kaiming_init",
    "mixed_batch_vera",
    "path_costs",
    "weight_space_vera",
]
