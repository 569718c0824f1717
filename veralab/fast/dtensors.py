"""Full tensors from sharded ones and back: the one seam adapter files and merging use under FSDP2.

A model sharded with `torch.distributed.fsdp.fully_shard` (see `veralab.fast.fsdp`) holds its parameters as
DTensors: each rank keeps a slice. Saving needs the whole tensor (`full_tensor`, a collective every rank
must call), loading writes a whole tensor into each rank's slice (`copy_full_into`, no communication: every
rank read the same file), and merging needs whole weights (`check_not_sharded` says so clearly instead of a
DTensor error deep in a matmul). Plain tensors pass through unchanged, so the callers need no second path.

torch.distributed is imported only when asked for: builds without it see plain tensors only.
"""

from __future__ import annotations

import torch
from torch import nn


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (a parameter sharded, or replicated, over processes)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (the model went through `fully_shard`)."""
    return any(is_dtensor(param) for param in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective: every rank must call it in the
    same order), `tensor` itself otherwise."""
    if is_dtensor(tensor):
        return tensor.full_tensor()
    return tensor


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor `full` into `target`, which may be a DTensor: then each rank keeps its own slice
    of `full`, cut locally (nothing is sent; every rank must hold the same `full`).

    Args:
        target: a model tensor (plain or DTensor), written in place.
        full: the whole value, of `target`'s global shape (cast to `target`'s dtype).
    """
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(
            full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
        )
    target.copy_(full)


def check_not_sharded(model: nn.Module, operation: str) -> None:
    """Refuse `operation` on a sharded model: it needs every layer's whole weight on one process.

    Args:
        model: the model.
        operation: what was asked, e.g. "merge_adapter".

    Raises:
        ValueError: the model is sharded.
    """
    if is_sharded(model):
        raise ValueError(
            f"{operation} needs each layer's whole weight, but this model is sharded over processes "
            "(FSDP2): its weights are slices. Save the adapter (save_pretrained gathers it to the main "
            "process) and merge it into an unsharded base model, e.g. `veralab merge --adapter DIR`."
        )
