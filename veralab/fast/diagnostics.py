"""Measuring what an adapted model keeps and shares: saved activations, the layers that share one h, and
the bytes a (quantized) base's weights take.

The benchmarks, the tests and notebook 09 check the cost model (docs/design.md) with these two measurements:

- `saved_activations` records every tensor autograd saves for the backward during one forward, seen through
  `torch.autograd.graph.saved_tensors_hooks`, each storage counted once (a tensor and its views share one),
  the model's parameters and buffers left out (they exist whether or not anything is saved);
- `layers_sharing_inputs` groups the adapted layers by the input tensor each receives in one forward (q, k
  and v; gate and up), the groups for which `SharedProjections.hidden` computes and keeps h once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

Result = TypeVar("Result")


@dataclass(frozen=True)
class SavedStorage:
    """One storage autograd saved: the shape of the first tensor saved from it, and its size in bytes."""

    shape: tuple[int, ...]
    nbytes: int


def saved_activations(
    model: nn.Module, forward: Callable[[], Result]
) -> tuple[dict[int, SavedStorage], Result]:
    """Run `forward()` and record the storages autograd saves for the backward, parameters and buffers
    excluded.

    The saved tensors stay alive with the graph of `forward`'s result, which is returned: back-propagate or
    drop it.

    Args:
        model: the model whose parameters and buffers are not counted.
        forward: runs one forward with grad enabled, e.g. `lambda: model(**batch).loss`.

    Returns:
        ({storage pointer: SavedStorage}, what `forward()` returned).
    """
    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, SavedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in resident and pointer not in saved:
            saved[pointer] = SavedStorage(tuple(tensor.shape), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return saved, result


def saved_activation_bytes(model: nn.Module, loss: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves during one training forward (`saved_activations`), then frees them by a backward.

    Args:
        model: the model whose parameters and buffers are not counted; its gradients are reset afterwards.
        loss: runs one forward and returns a scalar loss, e.g. `lambda: model(**batch).loss`.
    """
    saved, value = saved_activations(model, loss)
    value.backward()
    model.zero_grad(set_to_none=True)
    return sum(storage.nbytes for storage in saved.values())


def layers_sharing_inputs(
    model: nn.Module, forward: Callable[[], object]
) -> list[list[tuple[str, nn.Module]]]:
    """The model's VeRA layers grouped by the input tensor each receives in one `forward()` (run without
    grad).

    Args:
        model: a `VeraModel`.
        forward: runs one forward of it, e.g. `lambda: model(input_ids=ids)`.

    Returns:
        Groups of (module name, layer) in the order the layers first ran; layers that did not run are absent.
    """
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    inputs = []  # kept alive so that no tensor id is reused during the forward

    def recorder(name: str, layer: nn.Module):
        def record(_module, args):
            inputs.append(args[0])
            groups.setdefault(id(args[0]), []).append((name, layer))

        return record

    handles = [layer.register_forward_pre_hook(recorder(name, layer)) for name, layer in model.vera_layers()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return list(groups.values())


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao's, quanto's) at the tensors they store
    (codes, scales, zero points) rather than at the dense shape they stand for."""
    if type(tensor) is not nn.Parameter and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers as stored, quantized codes and statistics included (HQQ
    layers keep their scales and zero points in a `meta` dict; bitsandbytes' packed 4-bit codes are their
    parameters' bytes, their block scales left out)."""
    tensors = [p.data if isinstance(p, nn.Parameter) else p for p in model.parameters()]
    tensors += list(model.buffers())
    for module in model.modules():
        meta = getattr(module, "meta", None)
        if isinstance(meta, dict):
            tensors += [value for value in meta.values() if isinstance(value, torch.Tensor)]
    return sum(stored_bytes(t) for t in tensors)
