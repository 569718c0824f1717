"""The kinds of base layer veralab adapts, each with a way to make one: what checks that must hold for every
kind (no silent merge, above all) iterate over, so a new kind joins them by being registered here or in its
backend's `layer_kinds()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class LayerKind:
    """One kind of base layer.

    Args:
        name: a short name, e.g. "linear", "torchao-int8".
        layer_type: the class of the layers of this kind.
        from_linear: makes a layer of this kind holding (a quantization of) a float `nn.Linear`'s weight and
            bias; its in_features may need to be a multiple of 256 for grouped schemes.
        unavailable: why no such layer can be made here (a package or a device missing), or None.
    """

    name: str
    layer_type: type[nn.Module]
    from_linear: Callable[[nn.Linear], nn.Module]
    unavailable: str | None = None


def copy_linear(linear: nn.Linear) -> nn.Linear:
    """A fresh `nn.Linear` with `linear`'s weight and bias."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    copy.load_state_dict(linear.state_dict())
    return copy


def conv1d_from_linear(linear: nn.Linear) -> Conv1D:
    """transformers' GPT-2 `Conv1D` computing what `linear` computes (its weight stored as (in, out))."""
    conv = Conv1D(linear.out_features, linear.in_features)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    return conv


# The plain kinds: a dense weight VeRA reads and writes in place (`VeraLinear`).
PLAIN_LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", nn.Linear, copy_linear),
    LayerKind("conv1d", Conv1D, conv1d_from_linear),
)
