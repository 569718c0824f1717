r"""How a VeRA layer computes its adapters' term: the cost model that picks weight or activation space.

The rule: **weight space where it is exact and cheaper by the cost model, activation space otherwise.**

Notation as in `veralab.fast.functional`: x (N x in), W (out x in), A_s (r x in), B_s (out x r), h = x A_s^T
(N x r), and S the scaled projection (out x r) of the adapters computed together. The two exact paths:

- activation space (`activation_space_vera`): `y = base(x) + h S^T`, over any base layer (quantized ones
  included), in any dtype, with or without dropout on the adapter's input;
- weight space (`weight_space_vera`): `y = x (W + S A_s)^T + b`, one base-sized matmul that replaces the base
  layer's call. Exact only where the base layer is a plain dense matmul whose weight keeps the small ΔW
  (float32/float64, frozen, no hooks or extra forward arguments, no autocast to another dtype) and the
  adapters read x itself (no active dropout).

Their extra multiply-adds per layer (the cost model in docs/design.md), h included:

    training,  activation space:  N·r·(2·in + 3·out)                 h, h S^T; G S, (G S) A_s, G^T h
    training,  weight space:      N·r·(in + out) + 2·out·in·(r + 1)  h, G^T h; W + S A_s forward and backward
    inference, activation space:  N·r·(in + out)                     h, h S^T
    inference, weight space:      out·in·(r + 1)                     W + S A_s (no h at all)

so weight space is the cheaper one past a number of tokens set by the layer's shape: for a square layer
(in = out) about 2·in/3 in training and in/2 in inference. A training step or a prompt's prefill over many
tokens takes weight space; generating one token at a time stays in activation space.
"""

from __future__ import annotations

import torch

WEIGHT_SPACE = "weight space"
ACTIVATION_SPACE = "activation space"

# Weight dtypes in which W + ΔW keeps ΔW's low bits: a bf16/fp16 weight would round most of a small ΔW away.
DELTA_KEEPING_DTYPES = (torch.float32, torch.float64)


def path_costs(tokens: int, in_features: int, out_features: int, r: int, needs_grad: bool) -> dict[str, int]:
    """Multiply-adds one adapted layer adds to the base layer on each path, h = x A_s^T included.

    Training: activation space computes h and h S^T forward, G S, G^T h and the input gradient (G S) A_s
    backward; weight space computes h, W + S A_s forward and again backward, and G^T h. Without a backward,
    weight space needs no h at all. (The cost model in docs/design.md.)

    Args:
        tokens: N, the number of rows the layer sees (batch x sequence).
        in_features: the layer's input size.
        out_features: the layer's output size.
        r: the projections' rank.
        needs_grad: whether a backward pass will run through the layer.
    """
    build_weight = out_features * in_features * (r + 1)  # S A_s, then the add
    if needs_grad:
        activation = tokens * r * (2 * in_features + 3 * out_features)
        weight = tokens * r * (in_features + out_features) + 2 * build_weight
    else:
        activation = tokens * r * (in_features + out_features)
        weight = build_weight
    return {ACTIVATION_SPACE: activation, WEIGHT_SPACE: weight}


def choose_path(
    costs: dict[str, int],
    *,
    weight_dtype: torch.dtype,
    input_dtype: torch.dtype,
    dropout_active: bool,
    weight_space_supported: bool,
) -> str:
    """Weight space where it is exact and cheaper by `costs`, activation space otherwise.

    Args:
        costs: `path_costs(...)` of the layer and its input.
        weight_dtype: the base weight's dtype; only float32/float64 keep ΔW exactly.
        input_dtype: the dtype x's matmuls run in (the autocast dtype under autocast); weight space runs the
            matmul in the weight's dtype, so they must agree.
        dropout_active: the adapter reads dropout(x), which no weight can express.
        weight_space_supported: the base layer is a plain dense layer whose weight the matmul may replace
            (False for quantized layers, layers with hooks or extra forward arguments).
    """
    exact = (
        weight_space_supported
        and not dropout_active
        and weight_dtype in DELTA_KEEPING_DTYPES
        and input_dtype == weight_dtype
    )
    return WEIGHT_SPACE if exact and costs[WEIGHT_SPACE] < costs[ACTIVATION_SPACE] else ACTIVATION_SPACE
