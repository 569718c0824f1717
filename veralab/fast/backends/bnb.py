"""VeRA over bitsandbytes' quantized linear layers: `Linear8bitLt` (LLM.int8()) and `Linear4bit` (QLoRA
nf4/fp4).

The base stays quantized and frozen; only the lambdas train, so VeRA's few parameters sit on top of a model
that takes a quarter (or an eighth) of its full-precision memory. Each class overrides only the weight seam
of `VeraLinear`:

- `get_base_weight`: dequantize to a dense (out, in) tensor;
- `set_base_weight`: requantize with the layer's own scheme (8-bit: row-wise absmax int8, as bitsandbytes
  quantizes; 4-bit: the same quant type, block size, statistics compression and storage dtype), the layer's
  compute dtype untouched;
- `requantization_bound`: how far the stored weight may be from the one written (int8: half the row's step
  rowmax / 127 after the fp16 cast; 4-bit: half the largest gap between code values times the block's scale);
- `adapter_dtype` (from `QuantizedVeraLinear`): the adapter term is computed in the lambdas' dtype (float32)
  and cast back, as PEFT does, whatever the (fp16 / bf16) activations;
- 4-bit only: `base_forward` first makes sure the weight is in bitsandbytes' standard layout (the CPU
  repacking pitfall, see `keep_standard_layout`).

Merge, unmerge and safe merge are `VeraLinear`'s, written once. Merging rounds: the merged weight is the
requantized `W + ΔW`, so a merged model matches the unmerged one only within the quantization error.

`veralab.fast.backends` consults this backend (its protocol: `layer_class`, `layer_geometry`,
`prepare_model`) once bitsandbytes is imported; veralab works without bitsandbytes installed.
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import torch
from torch import nn

from veralab.fast.backends.kinds import LayerKind
from veralab.fast.backends.quantized import U32, QuantizedVeraLinear
from veralab.fast.layer import unit_roundoff
from veralab.fast.projections import SharedProjections
from veralab.targets import LayerGeometry, weight_shape

NAME = "bitsandbytes"
LIBRARY = "bitsandbytes"
EXTRA = "bnb"


class BitsandbytesVeraLinear(QuantizedVeraLinear):
    """What both bitsandbytes layers share (see `QuantizedVeraLinear`). Arguments as `QuantizedVeraLinear`."""

    library = "bitsandbytes"


class Linear8bitLt(BitsandbytesVeraLinear):
    """VeRA over `bitsandbytes.nn.Linear8bitLt`.

    With `has_fp16_weights=False` (what transformers' `load_in_8bit=True` builds) the weight is int8 `CB`
    with one float32 scale per output row, `SCB = max_i |W[o, i]|`, and `W ≈ CB * SCB[:, None] / 127`.
    With `has_fp16_weights=True` the weight is stored dense (quantized in each forward) and `VeraLinear`'s
    seam applies as is. Arguments as `QuantizedVeraLinear`.
    """

    def get_base_weight(self) -> torch.Tensor:
        """The dequantized weight `CB * SCB / 127`, float32 (out, in)."""
        base = self.base_layer
        if base.state.has_fp16_weights:
            return super().get_base_weight()
        weight = base.weight
        # Before the layer's first forward SCB sits on the weight; afterwards in the layer's matmul state.
        scale = weight.SCB if weight.SCB is not None else base.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scale)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Requantize row-wise to int8 from fp16, exactly as `Int8Params` quantizes a weight (fp16-weight
        layers:
        write the dense weight)."""
        base = self.base_layer
        if base.state.has_fp16_weights:
            super().set_base_weight(weight)
        else:
            CB, SCB, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
            base.weight = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        # Forget the int8 weight cached in the matmul state (fp16-weight layers reuse it in eval mode), in a
        # new state object: undoing a failed model change puts the old one back with the old weight.
        base.state = copy.copy(base.state)
        base.state.reset_grads()

    def in_place_weights(self) -> list[torch.Tensor]:
        """fp16-weight layers write their dense weight in place; int8 ones store a new `Int8Params`."""
        return [self.base_layer.weight] if self.base_layer.state.has_fp16_weights else []

    def requantization_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """int8: the fp16 cast (u16 |W|), then rounding to multiples of the row's rowmax / 127 (half a step);
        fp16-weight layers store the weight dense."""
        if self.base_layer.state.has_fp16_weights:
            return super().requantization_bound(weight)
        u16 = unit_roundoff(torch.float16)
        rowmax = weight.abs().amax(-1, keepdim=True) * (1 + u16)
        return u16 * weight.abs() + rowmax / 254 + 4 * U32 * weight.abs()


class Linear4bit(BitsandbytesVeraLinear):
    """VeRA over `bitsandbytes.nn.Linear4bit` (nf4 or fp4, with or without double quantization).

    The weight is packed two 4-bit codes a byte (shape (out*in/2, 1)); `in_features` / `out_features` give
    the logical (out, in). Every use first puts the weight in bitsandbytes' standard layout
    (see `keep_standard_layout`). Arguments as `QuantizedVeraLinear`.
    """

    def __init__(
        self, base_layer: bnb.nn.Linear4bit, projections: SharedProjections, fan_in_fan_out: bool = False
    ) -> None:
        super().__init__(base_layer, projections, fan_in_fan_out=fan_in_fan_out)
        keep_standard_layout(base_layer)

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        keep_standard_layout(self.base_layer)
        return super().base_forward(x, *args, **kwargs)

    def get_base_weight(self) -> torch.Tensor:
        """The dequantized weight, (out, in), in the dtype it was quantized from."""
        keep_standard_layout(self.base_layer)
        weight = self.base_layer.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Requantize with the same quant type, block size, statistics compression and storage dtype."""
        keep_standard_layout(self.base_layer)
        base = self.base_layer
        old = base.weight
        quant_state = old.quant_state
        base.weight = bnb.nn.Params4bit(
            weight.to(quant_state.dtype).contiguous(),
            requires_grad=False,
            blocksize=quant_state.blocksize,
            compress_statistics=quant_state.nested,
            quant_type=quant_state.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        ).to(old.device)  # quantizes here, and points base.quant_state at the new statistics

    def requantization_bound(self, weight: torch.Tensor) -> torch.Tensor:
        """Each block of the flattened weight is scaled by its absmax s and rounded to the nearest code value:
        |W - s c| <= s * (largest code gap) / 2. The layer dequantizes with its stored scale s' (s' != s under
        double quantization), adding |s - s'|; and the weight is first cast to the layer's storage dtype."""
        quant_state = self.base_layer.weight.quant_state
        blocksize = quant_state.blocksize
        stored = quant_state.absmax.float()
        if quant_state.nested:
            stored = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2).float()
            stored = stored + quant_state.offset
        code = quant_state.code.float().sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        flat = weight.to(quant_state.dtype).float().reshape(-1)
        padded = nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
        true_scale = padded.abs().amax(-1)
        per_block = true_scale * half_gap + (true_scale - stored.to(true_scale.device)).abs()
        per_element = per_block.repeat_interleave(blocksize)[: flat.numel()].view_as(weight)
        return per_element * (1 + 4 * U32) + unit_roundoff(quant_state.dtype) * weight.abs()


def keep_standard_layout(layer: bnb.nn.Linear4bit) -> None:
    """Keep a 4-bit weight in bitsandbytes' standard layout, the one training and dequantizing need.

    On CPUs with AVX-512 bf16, bitsandbytes repacks a `Linear4bit` weight in place into a CPU-only layout the
    first time the layer runs in eval mode on an input that does not require grad (e.g. under
    `torch.no_grad`).
    Afterwards no gradient flows back through the layer (silently: earlier layers' lambdas get wrong
    gradients), a layer with a bias fails in training, dequantizing (merging) returns garbage, and layers
    whose
    out_features is not a multiple of 32 fail outright. This turns the repacking off
    (`support_avx512bf16_for_cpu = False`, which stays off after `unload` / `merge_and_unload`) and undoes it
    where it already happened. The repacked layout keeps the block scales in bf16, so a weight
    repacked before `get_model` comes back with bf16-rounded scales.
    """
    layer.support_avx512bf16_for_cpu = False
    quant_state = layer.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, quant_state)
        if quant_state.absmax.dim() == 2:
            # bitsandbytes (0.50) leaves scales without double quantization in the repacked (blocks per row,
            # rows) bf16 layout, which dequantizes every block with another block's scale.
            quant_state.absmax = quant_state.absmax.T.reshape(-1).float()
        layer.weight.data, layer.weight.quant_state = data, quant_state


def keep_standard_layouts(model: nn.Module) -> None:
    """Put every 4-bit layer of `model` in the standard layout, adapted or not: gradients reach the lambdas of
    earlier layers through the frozen ones."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            keep_standard_layout(module)


def layer_class(module: nn.Module) -> type[BitsandbytesVeraLinear] | None:
    """The VeRA layer for a bitsandbytes `Linear8bitLt` / `Linear4bit`; None for any other module."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return Linear8bitLt
    if isinstance(module, bnb.nn.Linear4bit):
        return Linear4bit
    return None


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    """The logical (out, in) of a bitsandbytes layer (a 4-bit weight is stored packed, two codes a byte)."""
    if layer_class(module) is None:
        return None
    return LayerGeometry(*weight_shape(module), linear=True)


def prepare_model(model: nn.Module) -> None:
    """Every 4-bit layer of a model being adapted in the standard layout (`keep_standard_layouts`)."""
    keep_standard_layouts(model)


def quantized_copy(linear: nn.Linear, bits: int, quant_type: str = "nf4", has_fp16_weights: bool = False):
    """A bitsandbytes copy of `linear`, quantized as it moves to the CPU (as transformers does).

    Args:
        linear: the float layer.
        bits: 8 (`Linear8bitLt`) or 4 (`Linear4bit`, float32 compute dtype, no double quantization).
        quant_type: "nf4" or "fp4" for 4 bits.
        has_fp16_weights: 8 bits: keep the weight dense and quantize it in every forward.
    """
    bias = linear.bias is not None
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=has_fp16_weights
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=torch.float32,
            quant_type=quant_type,
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def layer_kinds() -> list[LayerKind]:
    """int8 (quantized and fp16-weight), nf4 and fp4."""
    return [
        LayerKind("bnb-int8", bnb.nn.Linear8bitLt, lambda linear: quantized_copy(linear, 8)),
        LayerKind(
            "bnb-int8-dense",
            bnb.nn.Linear8bitLt,
            lambda linear: quantized_copy(linear, 8, has_fp16_weights=True),
        ),
        LayerKind("bnb-nf4", bnb.nn.Linear4bit, lambda linear: quantized_copy(linear, 4, "nf4")),
        LayerKind("bnb-fp4", bnb.nn.Linear4bit, lambda linear: quantized_copy(linear, 4, "fp4")),
    ]
