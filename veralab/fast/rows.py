"""Mixed-adapter batches: which adapter each row of a batch uses.

`model(**batch, adapter_names=[...])` gives every row its own adapter. For the length of that call the model
hands each VeRA layer and each modules-to-save wrapper a `RowAdapters` (their `row_adapters` attribute);
a row tagged `BASE_ROW` uses no adapter at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# A row of a mixed batch that uses no adapter at all (the base model) is tagged with this name.
BASE_ROW = "__base__"


@dataclass
class RowAdapters:
    """Which adapter each row of a mixed batch uses: the distinct names and a (batch,) index into them."""

    names: list[str]
    index: torch.Tensor

    @classmethod
    def for_batch(cls, adapter_names: list[str], adapters: Iterable[str]) -> RowAdapters:
        """The rows of `adapter_names` (one name per row), each an adapter of `adapters` or `BASE_ROW`.

        Raises:
            ValueError: `adapter_names` is not a list of names, or names an adapter the model lacks.
        """
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError("adapter_names must be a list with one adapter name per row of the batch")
        known = list(adapters)
        unknown = sorted({n for n in adapter_names if n not in known and n != BASE_ROW})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapter(s) {unknown}; this model has {known} (use {BASE_ROW!r} "
                "for rows that should use the base model)"
            )
        names = list(dict.fromkeys(adapter_names))
        return cls(names=names, index=torch.tensor([names.index(n) for n in adapter_names], dtype=torch.long))
