"""veralab.fast: the production VeRA path, PEFT's API and names (`get_model` replaces `get_peft_model`).

    from veralab import VeraConfig
    from veralab.fast import get_model, VeraModel

    model = get_model(base_model, VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained("adapter/")
    model = VeraModel.from_pretrained(base_model, "adapter/")

These names are the public API. The modules under veralab.fast are documented too (the cost model in
`veralab.fast.dispatch`, the autograd Functions in `veralab.fast.functional`, the measurements in
`veralab.fast.diagnostics`, ...); import their other names from the module that defines them.
"""

from veralab.fast.conv import VeraConv
from veralab.fast.embedding import VeraEmbedding
from veralab.fast.errors import AdapterLoadError, ProjectionMismatchError
from veralab.fast.layer import VeraLayer, VeraLinear
from veralab.fast.model import VeraModel, get_model
from veralab.fast.rows import BASE_ROW

__all__ = [
    "BASE_ROW",
    "AdapterLoadError",
    "ProjectionMismatchError",
    "VeraConv",
    "VeraEmbedding",
    "VeraLayer",
    "VeraLinear",
    "VeraModel",
    "VeraTrainer",
    "VeraTrainerMixin",
    "get_model",
]


def __getattr__(name: str):
    # The Trainer integration imports transformers.Trainer (and accelerate): loaded only when asked for.
    if name in ("VeraTrainer", "VeraTrainerMixin"):
        from veralab.fast import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'veralab.fast' has no attribute {name!r}")
