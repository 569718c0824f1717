"""VeRA over torchao's weight-only quantized linear layers: an `nn.Linear` whose weight is a torchao tensor
subclass (`quantize_(model, config)`, or transformers' `TorchAoConfig`).

Merging is supported for the weight-only schemes, each requantized with its own tensor type's `from_hp`, the
block size, target dtype and mapping (symmetric when every zero point is 0) of the weight it replaces:

- `Int8Tensor` (`Int8WeightOnlyConfig`, per row or per group): `W ≈ (q - z) s`, q in [-128, 127];
- `IntxUnpackedToInt8Tensor` (`IntxWeightOnlyConfig`, e.g. int4 in groups of 32: runs on a CPU):
  q in [-2^(b-1), 2^(b-1) - 1];
- `Int4Tensor` (`Int4WeightOnlyConfig`, bf16 on a GPU): asymmetric int4 per group, scale and zero in bf16.

Symmetric schemes take s = absmax / ((qmax - qmin) / 2) per block, asymmetric ones s = (max - min) /
(qmax - qmin), so every value of the block lies on the block's grid of step s or within half a step of its
ends: requantizing errs by at most s / 2 (`requantization_bound`, read from the stored scale). Other torchao
weights (float8, activation-quantized, static scales) adapt and train, and refuse merging
(`MergeNotSupportedError`) rather than guess their scheme.
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization import (
    Int4WeightOnlyConfig,
    Int8Tensor,
    Int8WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup, PerRow, PerTensor
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType
from torchao.utils import TorchAOBaseTensor

from veralab.fast.backends.kinds import LayerKind, copy_linear
from veralab.fast.backends.quantized import QuantizedVeraLinear, affine_grid_bound, per_block
from veralab.fast.layer import unit_roundoff
from veralab.targets import LayerGeometry, weight_shape

NAME = "torchao"
LIBRARY = "torchao"
EXTRA = "torchao"

try:  # the GPU int4 layout (Int4WeightOnlyConfig); absent from some torchao builds
    from torchao.quantization import Int4Tensor
except ImportError:  # pragma: no cover - depends on the torchao build
    Int4Tensor = None


class TorchaoLinear(QuantizedVeraLinear):
    """VeRA over an `nn.Linear` holding a torchao quantized weight (see the module docstring). Arguments as
    `QuantizedVeraLinear`."""

    library = "torchao"

    @property
    def supports_merge(self) -> bool:
        return requantizable(self.base_layer.weight)

    def get_base_weight(self) -> torch.Tensor:
        """The dequantized weight, (out, in), in the dtype the layer was quantized from."""
        return self.base_layer.weight.dequantize()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Requantize with the stored weight's own tensor type, block size, target dtype and mapping."""
        self.check_mergeable()
        old = self.base_layer.weight
        self.base_layer.weight = nn.Parameter(requantized(old, weight.to(old.dtype)), requires_grad=False)

    def requantization_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Half the block's step s, or the distance to the block's grid where a value falls outside it (read
        from the scale and zero point now stored), plus the roundings of dequantizing."""
        stored = self.base_layer.weight
        if Int4Tensor is not None and isinstance(stored, Int4Tensor):
            return int4_tensor_bound(stored, weight)
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[target_dtype(stored)]
        block_size = tuple(stored.block_size)
        step = per_block(stored.scale.float(), block_size, weight.shape)
        zero = per_block(zero_points(stored).float(), block_size, weight.shape)
        low, high = (qmin - zero) * step, (qmax - zero) * step
        return affine_grid_bound(weight, step, low, high, stored.dtype, offset=zero * step)


def target_dtype(weight: TorchAOBaseTensor) -> torch.dtype:
    return torch.int8 if isinstance(weight, Int8Tensor) else weight.target_dtype


def zero_points(weight: TorchAOBaseTensor) -> torch.Tensor:
    zero = weight.zero_point
    return torch.zeros_like(weight.scale) if zero is None else zero


def mapping_of(weight: TorchAOBaseTensor) -> MappingType:
    """Symmetric when every zero point is 0 (what the symmetric schemes store), asymmetric otherwise."""
    return MappingType.SYMMETRIC if not zero_points(weight).any() else MappingType.ASYMMETRIC


def requantizable(weight: torch.Tensor) -> bool:
    """Whether `requantized` knows how `weight` was quantized (a weight-only scheme, no static scales)."""
    if isinstance(weight, Int8Tensor):
        return all(
            getattr(weight, name, None) is None
            for name in ("act_quant_scale", "act_pre_scale", "act_quant_kwargs")
        )
    if isinstance(weight, IntxUnpackedToInt8Tensor):
        return weight.activation_quantization is None
    return Int4Tensor is not None and isinstance(weight, Int4Tensor)


def requantized(old: TorchAOBaseTensor, weight: torch.Tensor) -> TorchAOBaseTensor:
    """`weight` quantized exactly as `old` was (see the module docstring)."""
    block_size = tuple(old.block_size)
    if isinstance(old, Int8Tensor):
        return Int8Tensor.from_hp(
            weight,
            granularity(block_size, weight.shape),
            mapping_type=mapping_of(old),
            reduce_range=bool(getattr(old, "reduce_range", False)),
        )
    if isinstance(old, IntxUnpackedToInt8Tensor):
        return IntxUnpackedToInt8Tensor.from_hp(
            weight, block_size, old.target_dtype, mapping_type=mapping_of(old)
        )
    return Int4Tensor.from_hp(weight, list(block_size))


def granularity(block_size: tuple[int, ...], shape: torch.Size):
    """The torchao granularity whose block size is `block_size` for a weight of `shape`."""
    if tuple(block_size) == tuple(shape):
        return PerTensor()
    if block_size[0] == 1 and block_size[1] == shape[1]:
        return PerRow()
    return PerGroup(block_size[1])


def int4_tensor_bound(stored: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`Int4Tensor`: asymmetric int4 per group of `block_size[1]` inputs, min-max: the group's values span its
    16 grid points, so half a step s = (max - min) / 15; scale and zero are stored in bf16, which moves a grid
    point q s + z by up to u_bf16 (|q s| + |z|) <= u_bf16 (15 s + |z|), and the result is bf16 too."""
    group = stored.block_size[-1]
    step = per_block(stored.scale.float().T, (1, group), weight.shape)
    zero = per_block(stored.zero_point.float().T, (1, group), weight.shape)
    u_bf16 = unit_roundoff(torch.bfloat16)
    return step / 2 + u_bf16 * (15 * step + zero.abs()) + u_bf16 * (weight.abs() + step)


def layer_class(module: nn.Module) -> type[TorchaoLinear] | None:
    """`TorchaoLinear` for an `nn.Linear` whose weight is a torchao tensor; None for any other module."""
    if isinstance(module, nn.Linear) and isinstance(module.weight, TorchAOBaseTensor):
        return TorchaoLinear
    return None


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    if layer_class(module) is None:
        return None
    return LayerGeometry(*weight_shape(module), linear=True)


def prepare_model(model: nn.Module) -> None:
    """Nothing to prepare: torchao layers are ready as transformers loads them."""


def quantized_copy(linear: nn.Linear, config) -> nn.Linear:
    """A copy of `linear` quantized by torchao's `quantize_` with `config` (e.g. `Int8WeightOnlyConfig()`)."""
    layer = copy_linear(linear)
    quantize_(layer, config)
    return layer


def layer_kinds() -> list[LayerKind]:
    """int8 per row, int4 in groups of 32 on the CPU layout (`IntxWeightOnlyConfig`), and the GPU int4 layout
    (`Int4WeightOnlyConfig`, bf16 on CUDA)."""
    int4_unavailable = None if torch.cuda.is_available() else "Int4WeightOnlyConfig needs a CUDA GPU"
    return [
        LayerKind("torchao-int8", nn.Linear, lambda linear: quantized_copy(linear, Int8WeightOnlyConfig())),
        LayerKind(
            "torchao-intx4",
            nn.Linear,
            lambda linear: quantized_copy(
                linear, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
            ),
        ),
        LayerKind(
            "torchao-int4",
            nn.Linear,
            lambda linear: quantized_copy(
                linear.to("cuda", torch.bfloat16), Int4WeightOnlyConfig(group_size=32)
            ),
            unavailable=int4_unavailable,
        ),
    ]
