"""Which VeRA layer adapts a base layer: plain dense layers here, quantized layers by their backend.

`vera_layer_class(module)` is the one place that decides. Plain `nn.Linear` and transformers' `Conv1D` get
`VeraLinear`, `nn.Embedding` `VeraEmbedding`, `nn.Conv1d/2d/3d` `VeraConv`; a quantized layer gets the
class of the backend that knows its library. A backend is a module
of this package exposing two functions:

- `layer_class(module)`: the VeRA layer class for `module`, or None when the module is not one of its layers;
- `prepare_model(model)`: put the whole model (adapted layers or not) in the state VeRA needs, once, when
  it is adapted.

A backend is consulted only when its library is already imported: a model can hold a library's layers only
after that library was imported, so this costs nothing (and imports nothing) for models without them, and
does not depend on the order in which anything was imported. Nothing here changes shared state on import.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab.fast.conv import VeraConv
from veralab.fast.embedding import VeraEmbedding
from veralab.fast.layer import VeraLayer, VeraLinear
from veralab.targets import CONV_TYPES, LayerGeometry, unadaptable_reason
from veralab.targets import layer_geometry as plain_layer_geometry

# (library the layers come from, the veralab module that adapts them). Quantized layers are matched before
# the plain ones: most subclass nn.Linear.
BACKENDS: tuple[tuple[str, str], ...] = (("bitsandbytes", "veralab.fast.backends.bnb"),)


def loaded_backends() -> Iterator[ModuleType]:
    """The backends whose library is imported (the only ones whose layers a model can hold)."""
    for library, module in BACKENDS:
        if sys.modules.get(library) is not None:
            yield importlib.import_module(module)


def vera_layer_class(module: nn.Module) -> type[VeraLayer] | None:
    """The VeRA layer class that adapts `module`, or None when VeRA cannot adapt it."""
    for backend in loaded_backends():
        layer_class = backend.layer_class(module)
        if layer_class is not None:
            return layer_class
    if isinstance(module, (nn.Linear, Conv1D)):
        return VeraLinear
    if isinstance(module, nn.Embedding) and unadaptable_reason(module) is None:
        return VeraEmbedding
    if isinstance(module, CONV_TYPES) and unadaptable_reason(module) is None:
        return VeraConv
    return None


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    """`veralab.targets.layer_geometry` for the layers veralab.fast adapts (quantized ones included)."""
    if vera_layer_class(module) is None:
        return None
    return plain_layer_geometry(module)


def prepare_model(model: nn.Module) -> None:
    """Let every loaded backend prepare `model` for adaptation (see the module docstring)."""
    for backend in loaded_backends():
        backend.prepare_model(model)
