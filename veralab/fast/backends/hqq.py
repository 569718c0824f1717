"""VeRA over HQQ's quantized linear layer, `hqq.core.quantize.HQQLinear` (Half-Quadratic Quantization; on a
CPU with its PyTorch backend). transformers 5 refuses `HqqConfig` on a CPU, so quantize with hqq's own API
(`AutoHQQHFModel.quantize_model`, or `HQQLinear(linear, BaseQuantizeConfig(...))` per layer).

`HQQLinear` is no `nn.Linear` subclass and has no `weight`: its geometry is its `in_features` /
`out_features`, its weight `dequantize()`, and a merged weight is requantized in place with the layer's own
`quant_config` (`HQQLinear.quantize`).

HQQ rounds each group of the weight to `W_q = clamp(round(W / s + z), 0, 2^b - 1)` and dequantizes to
`(W_q - z) s`, with s from the group's min and max and the zero point z tuned by its half-quadratic
optimizer. Whatever z the optimizer picks, a value within the grid's span is at most s / 2 from its point and
a value outside it is clamped to the nearer end (`requantization_bound`, read from the stored s and z).
"""

from __future__ import annotations

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab.fast.backends.kinds import LayerKind, copy_linear
from veralab.fast.backends.quantized import QuantizedVeraLinear, affine_grid_bound
from veralab.targets import LayerGeometry

NAME = "hqq"
LIBRARY = "hqq"
EXTRA = "hqq"


class HqqLinear(QuantizedVeraLinear):
    """VeRA over an `HQQLinear` (see the module docstring). Arguments as `QuantizedVeraLinear`."""

    library = "hqq"

    @property
    def supports_merge(self) -> bool:
        # Quantized scales or zero points (scale_quant_params / zero_quant_params) add a second rounding this
        # backend does not bound: such layers adapt and train, and refuse merging.
        meta = self.base_layer.meta
        return not (meta.get("quant_scale") or meta.get("quant_zero"))

    def base_device(self) -> torch.device:
        return self.base_layer.W_q.device

    def get_base_weight(self) -> torch.Tensor:
        """The dequantized weight, (out, in), in the layer's compute dtype."""
        return self.base_layer.dequantize()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Requantize in place with the layer's own quant_config (bits, group size, axis, optimizer)."""
        self.check_mergeable()
        base = self.base_layer
        config = {key: value for key, value in base.quant_config.items() if key != "offload_meta"}
        del base.W_q  # quantize() stores a new one, and refuses to overwrite a registered parameter
        base.quantize(weight.to(base.compute_dtype), **config)

    def requantization_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Half a step, or the distance to the grid's end outside it, per group (see the module docstring)."""
        meta = self.base_layer.meta
        step, zero = spread(meta["scale"], meta), spread(meta["zero"], meta)
        top = 2 ** meta["nbits"] - 1
        offset = zero * step
        return affine_grid_bound(
            weight, step, -offset, top * step - offset, meta["compute_dtype"], offset=offset
        )


def spread(values: torch.Tensor, meta: dict) -> torch.Tensor:
    """A per-group quantity of an HQQ layer, as one value per weight element, shaped like the weight."""
    shape = meta["shape"]
    group = meta["group_size"]
    numel = shape[0] * shape[1]
    if group is None:  # channel-wise: one value per row (axis 1) or per column (axis 0)
        grouped = shape
    else:
        grouped = (numel // group, group) if meta["axis"] == 1 else (group, numel // group)
    return torch.broadcast_to(values.float(), grouped).reshape(shape)


def layer_class(module: nn.Module) -> type[HqqLinear] | None:
    """`HqqLinear` for an `HQQLinear`; None for any other module."""
    return HqqLinear if isinstance(module, HQQLinear) else None


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    if layer_class(module) is None:
        return None
    return LayerGeometry(module.out_features, module.in_features, linear=True)


def prepare_model(model: nn.Module) -> None:
    """Nothing to prepare: HQQ layers are ready once quantized."""


def quantized_copy(linear: nn.Linear, nbits: int = 4, group_size: int | None = 64) -> HQQLinear:
    """An `HQQLinear` holding `linear`'s weights (float32 compute dtype, on the CPU), quantized by HQQ with
    its defaults (`BaseQuantizeConfig`: zero-point optimization on, groups along the input axis)."""
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size)
    return HQQLinear(copy_linear(linear), config, compute_dtype=torch.float32, device="cpu")


# How many of HQQ's rows of codes (groups) its bit packing puts together, by bits per weight.
PACKED_PER_ROW = {8: 1, 4: 2, 3: 10, 2: 4, 1: 8}


def quantize_model(
    model: nn.Module, nbits: int = 4, group_size: int = 64, skip: tuple[str, ...] = ("lm_head",)
) -> nn.Module:
    """Quantize `model` in place with HQQ, layer by layer, on the CPU: what `HqqConfig` would do where
    transformers accepts it, for any architecture (hqq's `AutoHQQHFModel` knows Llama-like layouts only).

    Every `nn.Linear`, and every GPT-2 `Conv1D` (as the linear layer it computes, as transformers converts it
    for bitsandbytes), becomes an `HQQLinear` with float32 compute dtype, except the modules whose name ends
    with one of `skip`.

    Args:
        model: the float model.
        nbits: bits per weight.
        group_size: weights per group (HQQ groups the flattened weight), halved for a layer whose size it
            does not divide into groups HQQ can pack; one group per row where no multiple of 8 does.
        skip: name suffixes of the layers kept in float (the output head by default, as HQQ does).

    Returns:
        The same model.
    """
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and not name.endswith(skip):
            replacements.append((name, module))
    for name, module in replacements:
        linear = module if isinstance(module, nn.Linear) else linear_of_conv1d(module)
        # HQQ groups the flattened weight in multiples of 8, and packs PACKED_PER_ROW[nbits] groups together
        group, numel = group_size, linear.weight.numel()
        while group >= 8 and numel % (group * PACKED_PER_ROW[nbits]):
            group //= 2
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantized_copy(linear, nbits, group if group >= 8 else None))
    return model


def linear_of_conv1d(conv: Conv1D) -> nn.Linear:
    """The `nn.Linear` computing what GPT-2's `Conv1D` computes (its weight stored as (out, in))."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return linear


def layer_kinds() -> list[LayerKind]:
    """4 bits and 8 bits, in groups of 64."""
    return [
        LayerKind("hqq-4bit", HQQLinear, lambda linear: quantized_copy(linear, 4)),
        LayerKind("hqq-8bit", HQQLinear, lambda linear: quantized_copy(linear, 8)),
    ]
