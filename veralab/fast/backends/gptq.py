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
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from torch import nn

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
