"""Which VeRA layer adapts a base layer: plain dense layers here, quantized layers by their backend.

`vera_layer_class(module)` is the one place that decides. Plain `nn.Linear` and transformers' `Conv1D` get
`VeraLinear`, `nn.Embedding` `VeraEmbedding`, `nn.Conv1d/2d/3d` `VeraConv`; a quantized layer gets the
class of the backend that knows its library.

**The backend protocol.** A backend is one module of this package per quantization library (listed in
`BACKENDS`), which imports its library at the top and nothing else happens on import. It has the attributes
and functions of `Backend`:

- `NAME`, `LIBRARY` (the import name whose presence makes the backend count), `EXTRA` (the pip extra that
  installs it: `pip install 'veralab[EXTRA]'`);
- `layer_class(module)`: the VeRA layer class for `module`, or None when the module is not one of its layers;
- `layer_geometry(module)`: the (out, in) shape of one of its layers as a `LayerGeometry` (needed for layers
  that are no `nn.Linear` subclass, such as HQQ's), None for other modules;
- `prepare_model(model)`: put the whole model (adapted layers or not) in the state VeRA needs, once, when it
  is adapted;
- `layer_kinds()`: the kinds of layer it adapts (`veralab.fast.backends.kinds.LayerKind`), each with a way to
  make one from a float `nn.Linear`, so that checks over every kind (`layer_kinds()` here) include its own.

Its layer classes subclass `QuantizedVeraLinear` (`veralab.fast.backends.quantized`) and implement the
per-layer half, `QuantizedLayer`: read the dequantized weight, run the quantized base forward, write a merged
weight back by requantizing it with the layer's own scheme and say how far the stored weight may then be from
the one written (`requantization_bound`), or refuse merging (`supports_merge = False`: forward and training
only). Merge, unmerge, safe merge and the read-back check that no merge is silent are `VeraLayer`'s, written
once for every layer type.

A backend is consulted only when its library is already imported: a model can hold a library's layers only
after that library was imported, so this costs nothing (and imports nothing) for models without them, and
does not depend on the order in which anything was imported. Nothing here changes shared state on import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab.fast.backends.kinds import PLAIN_LAYER_KINDS, LayerKind
from veralab.fast.conv import VeraConv
from veralab.fast.embedding import VeraEmbedding
from veralab.fast.layer import VeraLayer, VeraLinear
from veralab.targets import CONV_TYPES, LayerGeometry, unadaptable_reason
from veralab.targets import layer_geometry as plain_layer_geometry


class QuantizedLayer(Protocol):
    """The per-layer half of a backend: what a VeRA layer over a quantized base overrides of `VeraLinear`."""

    supports_merge: bool  # False: forward and training only; merge raises MergeNotSupportedError

    def get_base_weight(self) -> torch.Tensor:
        """The dequantized weight, a dense (out, in) tensor."""

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The quantized base layer's own output for `x`."""

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Requantize a dense (out, in) weight with the layer's own scheme and store it."""

    def requantization_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """After `set_base_weight(weight)`: elementwise bound on |dequantized stored weight - weight|, derived
        from the scheme's quantization step."""

    def base_device(self) -> torch.device:
        """Where the quantized weight lives."""


class Backend(Protocol):
    """The module interface of one backend (see the module docstring)."""

    NAME: str
    LIBRARY: str
    EXTRA: str

    def layer_class(self, module: nn.Module) -> type[VeraLayer] | None: ...

    def layer_geometry(self, module: nn.Module) -> LayerGeometry | None: ...

    def prepare_model(self, model: nn.Module) -> None: ...

    def layer_kinds(self) -> list[LayerKind]: ...


# (library the layers come from, the veralab module that adapts them). Quantized layers are matched before
# the plain ones: most subclass nn.Linear.
BACKENDS: tuple[tuple[str, str], ...] = (
    ("bitsandbytes", "veralab.fast.backends.bnb"),
    ("torchao", "veralab.fast.backends.torchao"),
    ("optimum.quanto", "veralab.fast.backends.quanto"),
    ("hqq", "veralab.fast.backends.hqq"),
    ("gptqmodel", "veralab.fast.backends.gptq"),
)
# The pip extra that installs each library (`pip install 'veralab[EXTRA]'`); each backend says it too (EXTRA).
EXTRAS: dict[str, str] = {
    "bitsandbytes": "bnb",
    "torchao": "torchao",
    "optimum.quanto": "quanto",
    "hqq": "hqq",
    "gptqmodel": "gptq",
}

# The layer types VeRA adapts without a backend (a dense weight it reads and writes in place): linear ones
# (`VeraLinear`), embeddings and convolutions. Each has a registered kind in
# `veralab.fast.backends.kinds.PLAIN_LAYER_KINDS` (a test checks it).
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
PLAIN_LAYER_TYPES: tuple[type[nn.Module], ...] = (*LINEAR_TYPES, nn.Embedding, *CONV_TYPES)


def loaded_backends() -> Iterator[ModuleType]:
    """The backends whose library is imported (the only ones whose layers a model can hold)."""
    for library, module in BACKENDS:
        if sys.modules.get(library) is not None:
            yield importlib.import_module(module)


def installed_backends() -> Iterator[ModuleType]:
    """Every backend whose library is installed and imports, importing it (for tools that list or compare
    backends)."""
    for library, module in BACKENDS:
        if unavailable_reason(library) is None:
            yield importlib.import_module(module)


def is_installed(library: str) -> bool:
    """Whether `library` (a dotted import name) can be imported, without importing it (parents aside)."""
    try:
        return importlib.util.find_spec(library) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def layer_kinds() -> list[LayerKind]:
    """Every kind of base layer veralab adapts: the plain ones, then each backend's (importing its library),
    a backend whose library is missing as one kind saying which extra installs it."""
    kinds = list(PLAIN_LAYER_KINDS)
    for library, module in BACKENDS:
        reason = unavailable_reason(library)
        if reason is None:
            kinds.extend(importlib.import_module(module).layer_kinds())
        else:
            kinds.append(LayerKind(module.rpartition(".")[2], nn.Module, _not_installed(reason), reason))
    return kinds


def unavailable_reason(library: str) -> str | None:
    """Why a backend's `library` cannot be used here (not installed, or installed but failing to import, e.g.
    built for another torch), naming the extra that installs it; None when its backend imports."""
    install = f"pip install 'veralab[{EXTRAS[library]}]'"
    if not is_installed(library):
        return f"{library} is not installed: {install}"
    module = dict(BACKENDS)[library]
    try:
        importlib.import_module(module)
    except Exception as error:  # any failure inside a third-party import
        return f"{library} is installed but does not import here ({type(error).__name__}: {error}); {install}"
    return None


def _not_installed(reason: str):
    def build(linear: nn.Linear) -> nn.Module:
        raise ModuleNotFoundError(reason)

    return build


def vera_layer_class(module: nn.Module) -> type[VeraLayer] | None:
    """The VeRA layer class that adapts `module`, or None when VeRA cannot adapt it."""
    for backend in loaded_backends():
        layer_class = backend.layer_class(module)
        if layer_class is not None:
            return layer_class
    if isinstance(module, LINEAR_TYPES):
        return VeraLinear
    if isinstance(module, nn.Embedding) and unadaptable_reason(module) is None:
        return VeraEmbedding
    if isinstance(module, CONV_TYPES) and unadaptable_reason(module) is None:
        return VeraConv
    return None


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    """`veralab.targets.layer_geometry` for the layers veralab.fast adapts (quantized ones included)."""
    for backend in loaded_backends():
        if backend.layer_class(module) is not None:
            return backend.layer_geometry(module)
    if vera_layer_class(module) is None:
        return None
    return plain_layer_geometry(module)


def prepare_model(model: nn.Module) -> None:
    """Let every loaded backend prepare `model` for adaptation (see the module docstring)."""
    for backend in loaded_backends():
        backend.prepare_model(model)
