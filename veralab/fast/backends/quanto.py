"""VeRA over optimum-quanto's quantized linear layer, `QLinear` (`quantize(model, weights=qint8 / qint4)`
and `freeze(model)`, or transformers' `QuantoConfig`).

`QLinear` subclasses `nn.Linear`, but its frozen weight is a quanto tensor that ignores in-place writes: a
merge through the plain `nn.Linear` seam would leave the weight unchanged and lose the adapter without a word.
This backend reads the weight through `qweight.dequantize()` and writes a merged weight by giving the layer a
float weight again and freezing it, which requantizes it with the layer's own qtype, group size and optimizer.

The bound (`requantization_bound`) comes from the layer's own optimizer applied to the weight written:
qint8 (`AbsmaxOptimizer`) rounds to multiples of s = rowmax / 127, codes in [-128, 127]; qint4
(`MaxOptimizer`) to the grid `q s - shift`, q in [0, 15], s = (max - min) / 15 and shift = -min per group of
the layer's group size (per row for rows of at most 128 inputs). Either way at most half a step.
"""

from __future__ import annotations

import torch
from optimum.quanto import QLinear, freeze, qint4, qint8, quantize
from optimum.quanto.tensor.optimizers import SymmetricOptimizer
from torch import nn

from veralab.fast.backends.kinds import LayerKind, copy_linear
from veralab.fast.backends.quantized import QuantizedVeraLinear, affine_grid_bound, per_block
from veralab.targets import LayerGeometry, weight_shape

NAME = "optimum-quanto"
LIBRARY = "optimum.quanto"
EXTRA = "quanto"


class QuantoLinear(QuantizedVeraLinear):
    """VeRA over a quanto `QLinear` (see the module docstring). Arguments as `QuantizedVeraLinear`."""

    library = "optimum-quanto"

    def get_base_weight(self) -> torch.Tensor:
        """The dequantized weight, (out, in), in the layer's float dtype."""
        return self.base_layer.qweight.dequantize()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` as the layer's float weight, then freeze it again (requantizing it)."""
        base = self.base_layer
        frozen = base.frozen
        base.weight = nn.Parameter(weight.to(base.qweight.dtype).contiguous(), requires_grad=False)
        if frozen:
            base.freeze()
            base.weight.requires_grad_(False)

    def requantization_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Half a step of the grid the layer's optimizer picks for `weight` (see the module docstring)."""
        base = self.base_layer
        qtype, dtype = base.weight_qtype, base.qweight.dtype
        source = weight.to(dtype)
        codes = 2**qtype.bits
        if isinstance(base.optimizer, SymmetricOptimizer):
            scale = base.optimizer(source, qtype=qtype, axis=0).float()
            step = per_block(scale, (1, weight.shape[1]), weight.shape)
            return affine_grid_bound(weight, step, -(codes // 2) * step, (codes // 2 - 1) * step, dtype)
        group = base.weight_group_size or weight.shape[1]
        # QLinear calls its optimizer with a float shift (no integer zero point): points are q s - shift.
        scale, shift = base.optimizer(source, qtype=qtype, axis=0, group_size=base.weight_group_size)
        step = per_block(scale.float(), (1, group), weight.shape)
        shift = per_block(shift.float(), (1, group), weight.shape)
        return affine_grid_bound(weight, step, -shift, (codes - 1) * step - shift, dtype, offset=shift)


def layer_class(module: nn.Module) -> type[QuantoLinear] | None:
    """`QuantoLinear` for a quanto `QLinear` that quantizes its weight; None for any other module."""
    if isinstance(module, QLinear) and module.weight_qtype is not None:
        return QuantoLinear
    return None


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    if layer_class(module) is None:
        return None
    return LayerGeometry(*weight_shape(module), linear=True)


def prepare_model(model: nn.Module) -> None:
    """Nothing to prepare: quanto layers are ready once frozen (or quantize their float weight on the fly)."""


def quantized_copy(linear: nn.Linear, weights) -> QLinear:
    """A frozen quanto `QLinear` holding `linear`'s weights quantized to `weights` (`qint8` or `qint4`)."""
    model = nn.Sequential(copy_linear(linear))
    quantize(model, weights=weights)
    freeze(model)
    return model[0]


def layer_kinds() -> list[LayerKind]:
    """qint8 (per row) and qint4 (per group of up to 128)."""
    return [
        LayerKind("quanto-qint8", QLinear, lambda linear: quantized_copy(linear, qint8)),
        LayerKind("quanto-qint4", QLinear, lambda linear: quantized_copy(linear, qint4)),
    ]
