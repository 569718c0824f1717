"""What every VeRA layer over a quantized base shares, whatever the library: `QuantizedVeraLinear`.

A backend's layer class subclasses it and implements the weight seam for its library (`get_base_weight`,
`set_base_weight`, `requantization_bound`; `base_forward` and `base_device` where the defaults do not fit).
Shared here: the adapter term is computed in the lambdas' dtype (float32) and cast back, as PEFT does,
whatever the (fp16 / bf16) activations; the base is never a plain dense matmul (activation space always); a
merge warns that it requantizes; a forward-only layer (`supports_merge = False`) refuses merging before
anything changes.

The bound most schemes' `requantization_bound` is built from (`affine_grid_bound`): rounding a value to the
nearest point of a uniform grid of step s errs by at most s / 2 inside the grid, and by the distance to the
grid's end outside it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from veralab.fast.layer import VeraLinear, unit_roundoff
from veralab.fast.projections import SharedProjections

U32 = unit_roundoff(torch.float32)


class QuantizedVeraLinear(VeraLinear):
    """VeRA over a frozen quantized linear layer (see the module docstring).

    Args:
        base_layer: the frozen quantized layer.
        projections: the model's shared `vera_A` / `vera_B`.
        fan_in_fan_out: must be False: quantized layers store their weight as (out, in).
    """

    library = "a quantization library"  # named in messages

    def __init__(
        self, base_layer: nn.Module, projections: SharedProjections, fan_in_fan_out: bool = False
    ) -> None:
        if fan_in_fan_out:
            raise ValueError(
                f"fan_in_fan_out=True does not apply to {type(base_layer).__name__}: {self.library} layers "
                "store their weight as (out, in) (transformers converts GPT-2's Conv1D when quantizing); "
                "pass False"
            )
        super().__init__(base_layer, projections)

    def base_is_plain_dense(self) -> bool:
        return False  # the quantized weight is no dense matrix a matmul could take with ΔW added

    def adapter_dtype(self, x: torch.Tensor) -> torch.dtype:
        # The lambdas are float32; the base may run in fp16/bf16, the small adapter term should not.
        return next(iter(self.vera_lambda_d.values())).dtype

    def in_place_weights(self) -> list[torch.Tensor]:
        return []  # a requantizing write stores new tensors (undone with the module's attributes)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapters into the quantized weight: dequantize, add ΔW, requantize (see
        `VeraLinear.merge`), with a warning that this rounds."""
        names = [n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters]
        if names:
            self.check_mergeable()
            warnings.warn(
                f"merging VeRA adapter(s) {names} into a {type(self.base_layer).__name__} layer requantizes "
                "its weight: outputs differ from the unmerged model by up to the quantization error, and "
                "unmerging rounds again (it does not restore the original weight bit for bit).",
                UserWarning,
                stacklevel=2,
            )
        super().merge(adapter_names, safe_merge=safe_merge)


class ForwardOnlyVeraLinear(QuantizedVeraLinear):
    """VeRA over a quantized layer whose weight cannot be written back (GPTQ, AWQ): forward and training of
    the lambdas work; merge and unmerge raise `MergeNotSupportedError` before anything changes."""

    supports_merge = False

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.check_mergeable()


def affine_grid_bound(
    weight: torch.Tensor,
    step: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    dtype: torch.dtype,
    offset: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Bound on |Q(w) - w| where Q rounds w to the nearest point of the uniform grid low, low + step, ...,
    high (clamping outside it), each point computed as `q * step - offset` and returned in `dtype`.

    Within [low, high] rounding errs by at most half a step; outside, by the distance to the nearer end.
    Computing a point rounds its product (|q step| <= |w| + step + |offset|) and its difference, each by a
    unit roundoff of the dtype computed in (float32, then `dtype`).

    Args:
        weight: the values quantized, (out, in).
        step: each block's step, spread over `weight`'s shape (as `low`, `high` and `offset`).
        low: the grid's lowest point.
        high: the grid's highest point.
        dtype: the dtype the grid points are computed and returned in.
        offset: the constant subtracted from `q * step` (0 for symmetric grids).
    """
    outside = (low - weight).clamp(min=0) + (weight - high).clamp(min=0)
    magnitude = weight.abs() + step + torch.as_tensor(offset).abs()
    return torch.maximum(step / 2, outside) + 2 * (4 * U32 + unit_roundoff(dtype)) * magnitude


def per_block(values: torch.Tensor, block_size: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """One value per block, (out / rows, in / cols) or anything reshapeable to it, spread over `shape`."""
    rows, cols = block_size
    grid = values.reshape(shape[0] // rows, shape[1] // cols)
    return grid.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
