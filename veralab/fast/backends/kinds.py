"""The kinds of base layer veralab adapts, each with a way to make one: what checks that must hold for every
kind (no silent merge, above all) iterate over, so a new kind joins them by being registered here or in its
backend's `layer_kinds()`.
"""

from __future__ import annotations

import functools
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
        from_linear: makes a layer of this kind whose (out, in) weight matrix is (a quantization of) a float
            `nn.Linear`'s weight, with its bias where the kind has one; in_features a multiple of 256 fits
            every kind (grouped schemes, kernels of 2 x 2 x 2).
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


def embedding_from_linear(linear: nn.Linear) -> nn.Embedding:
    """An `nn.Embedding` whose table is `linear`'s weight transposed: the same map of one-hot inputs (no
    bias)."""
    embedding = nn.Embedding(linear.in_features, linear.out_features)
    with torch.no_grad():
        embedding.weight.copy_(linear.weight.T)
    return embedding


def conv_from_linear(linear: nn.Linear, dims: int) -> nn.Module:
    """An `nn.Conv{dims}d` with kernel 2 in every dimension whose kernel, as the (out, in · ∏k) matrix, is
    `linear`'s weight (in_features must be a multiple of 2^dims)."""
    kernel = 2**dims
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    conv = conv_type(linear.in_features // kernel, linear.out_features, 2, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.view_as(conv.weight))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


# The plain kinds: a dense weight VeRA reads and writes in place (`VeraLinear`, `VeraEmbedding`, `VeraConv`).
PLAIN_LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", nn.Linear, copy_linear),
    LayerKind("gpt2-conv1d", Conv1D, conv1d_from_linear),
    LayerKind("embedding", nn.Embedding, embedding_from_linear),
    *(
        LayerKind(f"conv{dims}d", conv_type, functools.partial(conv_from_linear, dims=dims))
        for dims, conv_type in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d))
    ),
)
