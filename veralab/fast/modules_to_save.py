"""Modules trained in full next to the VeRA layers (`modules_to_save`, e.g. a classification head).

Each adapter gets its own trainable copy of the module, as in PEFT (same attribute names, so state-dict
keys match): `original_module` stays frozen and serves the base model, `modules_to_save[name]` serves
adapter `name`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from veralab.fast.rows import RowAdapters


class ModulesToSaveWrapper(nn.Module):
    """Routes calls to the active adapter's copy of a module, or to the original when none applies.

    Args:
        module_to_save: the module whose per-adapter copies are trained.
    """

    def __init__(self, module_to_save: nn.Module) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        # Which adapter each row uses during a mixed-adapter batch (set by VeraModel for the batch).
        self.row_adapters: RowAdapters | None = None

    def update(self, adapter_name: str) -> None:
        """Give `adapter_name` its own copy, starting from the original module's weights."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapters = [n for n in adapter_names if n in self.modules_to_save]
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def unwrapped(self, keep_trained_copy: bool) -> nn.Module:
        """The module to put back on unload: the active adapter's copy, or the original."""
        if keep_trained_copy and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.row_adapters is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, **kwargs)
        if self.disable_adapters or not self.active_adapters:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](x, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs):
        """Each row through its own adapter's copy (the original for rows of adapters without one)."""
        rows = self.row_adapters
        index = rows.index.to(x.device)
        pieces, positions = [], []
        for i, name in enumerate(rows.names):
            selected = (index == i).nonzero(as_tuple=True)[0]
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            pieces.append(module(x[selected], *args, **kwargs))
            positions.append(selected)
        out = torch.cat(pieces)
        order = torch.argsort(torch.cat(positions))
        return out[order]
