"""VeRA over GPTQ and AWQ layers, as GPT-QModel (`gptqmodel`) holds them: the quantized linear layers
transformers loads GPTQ and AWQ checkpoints into (`GPTQConfig`, `AwqConfig`), each a `BaseQuantLinear`
subclass picked for the device (on a CPU: the pure-PyTorch `TorchLinear` and `AwqTorchLinear`).

Forward and training of the lambdas only, as in PEFT: GPTQ and AWQ weights come out of a calibrated
quantization that needs calibration data and the model's activations, so a merged weight cannot be written
back by requantizing one layer. Merging raises `MergeNotSupportedError` before any weight changes; the adapter
runs exactly on top of the quantized base, and can be merged into the unquantized base model instead.

The dequantized weight (`get_base_weight`) is read for checks and diagnostics: `dequantize_weight()` for GPTQ
layers, the AWQ GEMM layout's own dequantization for AWQ layers.
"""

from __future__ import annotations

import torch
from gptqmodel.nn_modules.qlinear import AWQuantLinear, BaseQuantLinear
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from torch import nn

from veralab.fast.backends.kinds import LayerKind, copy_linear
from veralab.fast.backends.quantized import ForwardOnlyVeraLinear
from veralab.targets import LayerGeometry

NAME = "gptqmodel"
LIBRARY = "gptqmodel"
EXTRA = "gptq"


class GptqLinear(ForwardOnlyVeraLinear):
    """VeRA over a GPT-QModel GPTQ or AWQ layer (see the module docstring). Arguments as
    `QuantizedVeraLinear`."""

    library = "GPTQ/AWQ (gptqmodel)"

    def base_device(self) -> torch.device:
        return self.base_layer.qweight.device

    def get_base_weight(self) -> torch.Tensor:
        """The dequantized weight, (out, in), in the layer's storage dtype (fp16 or bf16)."""
        base = self.base_layer
        if isinstance(base, AWQuantLinear):
            weight = dequantize_gemm(base.qweight, base.qzeros, base.scales, base.bits, base.group_size)
        else:
            weight = base.dequantize_weight()
        return weight.T  # both store (in, out)


def layer_class(module: nn.Module) -> type[GptqLinear] | None:
    """`GptqLinear` for a GPT-QModel quantized linear layer; None for any other module."""
    return GptqLinear if isinstance(module, BaseQuantLinear) else None


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    if layer_class(module) is None:
        return None
    return LayerGeometry(module.out_features, module.in_features, linear=True)


def prepare_model(model: nn.Module) -> None:
    """Nothing to prepare: GPT-QModel's layers are ready as transformers loads them."""


def quantized_copy(
    linear: nn.Linear, method: str = "gptq", bits: int = 4, group_size: int = 32
) -> BaseQuantLinear:
    """A GPT-QModel layer in the GPTQ or AWQ storage format holding `linear`'s weights rounded to the nearest
    point of each group's asymmetric min-max grid (round-to-nearest, no calibration: a GPTQ or AWQ *layer*
    for checks and examples, not a calibrated GPTQ or AWQ quantization of a model).

    Args:
        linear: the float layer; in_features a multiple of `group_size`, out_features of 8.
        method: "gptq" (`TorchLinear`) or "awq" (`AwqTorchLinear`).
        bits: bits per weight.
        group_size: inputs per group.
    """
    out_features, in_features = linear.weight.shape
    grouped = linear.weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = grouped.amin(-1), grouped.amax(-1)
    top = 2**bits - 1
    scales = ((high - low) / top).clamp(min=torch.finfo(torch.float16).tiny)  # (out, groups)
    zeros = torch.round(-low / scales).clamp(0, top).to(torch.int32)
    half = copy_linear(linear).half()
    options = {"bits": bits, "group_size": group_size, "sym": False, "desc_act": False}
    options.update(in_features=in_features, out_features=out_features, bias=linear.bias is not None)
    if method == "awq":
        layer = AwqTorchLinear(**options, register_buffers=False)
        layer.pack(half, scales.half(), zeros)
    else:
        layer = TorchLinear(**options, register_buffers=True)
        layer.pack_original(
            half, scales.half(), zeros, torch.arange(in_features, dtype=torch.int32) // group_size
        )
    layer.optimized = True  # keep GPT-QModel from torch.compile-ing its dequantization (minutes on a CPU)
    layer.post_init()
    return layer.eval()


def layer_kinds() -> list[LayerKind]:
    """GPTQ and AWQ 4-bit layers in groups of 32 (forward-only kinds)."""
    return [
        LayerKind("gptq-4bit", TorchLinear, lambda linear: quantized_copy(linear, "gptq")),
        LayerKind("awq-4bit", AwqTorchLinear, lambda linear: quantized_copy(linear, "awq")),
    ]
