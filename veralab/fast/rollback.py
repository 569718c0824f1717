"""All or nothing for operations that change a model: a snapshot taken before, restored on any failure.

    with all_or_nothing(model) as snapshot:
        ...                                   # inject layers, add parameters, flip requires_grad, ...
        snapshot.keep_values(weight)          # before writing into an existing tensor in place

If the block raises anything, KeyboardInterrupt included, the model is put back exactly as it was, then the
exception propagates. The snapshot is cheap: per module, a shallow copy of its attributes (the dicts of
submodules, parameters and buffers, the `training` flag, plain attributes such as a VeRA layer's adapter
lists) and every parameter's and buffer's `requires_grad`; tensor values are copied only for tensors the
operation announces it will overwrite in place (`keep_values`). Objects created by the failed operation
(new layers, new lambdas) are simply dropped.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

_CONTAINERS = (dict, list, set)


class ModelSnapshot:
    """The state of `roots` (and every module below them) and of `objects`, restorable exactly.

    Args:
        roots: the modules whose whole trees are recorded.
        objects: other objects whose attributes the operation may change (e.g. the shared projections).
    """

    def __init__(self, *roots: nn.Module, objects: tuple[object, ...] = ()) -> None:
        modules: dict[int, nn.Module] = {}
        for root in roots:
            for module in root.modules():
                modules.setdefault(id(module), module)
        self._attributes = [(m, _shallow_copy(vars(m))) for m in modules.values()]
        self._attributes += [(o, _shallow_copy(vars(o))) for o in objects if o is not None]
        tensors: dict[int, torch.Tensor] = {}
        for module in modules.values():
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is not None:
                    tensors.setdefault(id(tensor), tensor)
        self._requires_grad = [(t, t.requires_grad) for t in tensors.values()]
        self._values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep_values(self, tensor: torch.Tensor) -> None:
        """Record `tensor`'s values (a copy in host memory) before the operation overwrites them in place."""
        if id(tensor) not in self._values:
            self._values[id(tensor)] = (tensor, tensor.detach().to("cpu", copy=True))

    def restore(self) -> None:
        """Put every recorded attribute, flag and value back."""
        for owner, attributes in self._attributes:
            state = vars(owner)
            state.clear()
            state.update(_shallow_copy(attributes))
        for tensor, flag in self._requires_grad:
            if tensor.is_leaf or not flag:
                tensor.requires_grad_(flag)
        with torch.no_grad():
            for tensor, values in self._values.values():
                if tensor.shape == values.shape and tensor.dtype == values.dtype:
                    tensor.copy_(values)
                else:  # the operation replaced the storage with another layout
                    tensor.data = values.to(tensor.device)


@contextlib.contextmanager
def all_or_nothing(*roots: nn.Module, objects: tuple[object, ...] = ()) -> Iterator[ModelSnapshot]:
    """Run the block; on any exception (KeyboardInterrupt included) restore `roots` and `objects`, re-raise.

    Args:
        roots: the modules the block may change.
        objects: other objects whose attributes it may change.
    """
    snapshot = ModelSnapshot(*roots, objects=objects)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise


def _shallow_copy(attributes: dict) -> dict:
    """The attributes, with their dicts, lists and sets (hook and module tables, adapter lists) copied."""
    return {k: copy.copy(v) if isinstance(v, _CONTAINERS) else v for k, v in attributes.items()}
