r"""How a VeRA layer computes its adapters' term in one call: the cost model, and the plan built from it.

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

`plan_forward` applies the rule to one call of a layer and returns a `ForwardPlan`: which active, unmerged
adapters fold into `W + ΔW`, which share one h in activation space, and which read their own dropout(x)
(each in activation space, added on top).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from veralab.fast.functional import autocast_dtype

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


def lambdas_train(lambdas: Iterable[torch.Tensor]) -> bool:
    """Whether this call builds a graph to any of `lambdas` (so they may change before the next call)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in lambdas)


@dataclass(frozen=True)
class AdapterFacts:
    """One active, unmerged adapter of a layer, as `plan_forward` reads it.

    Attributes:
        name: the adapter's name.
        dropout: the probability of the dropout on its input (0 when it has none).
        lambdas: its `λ_d` and `λ_b` (the plan reads whether they require grad).
    """

    name: str
    dropout: float
    lambdas: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ForwardPlan:
    """How one call of a VeRA layer computes the terms of its active, unmerged adapters.

    At most one of `weight_space` and `activation_space` is non-empty: the adapters that read x itself are
    computed together, through one S, on one path.

    Attributes:
        weight_space: the adapters folded into the base matmul, `x (W + ΔW)^T + b`, which replaces the base
            layer's call.
        activation_space: the adapters added to `base(x)` as `h S^T`, sharing one `h = x A_s^T`.
        own_dropout: the adapters whose dropout is active: each reads its own dropout(x) and is added on top,
            in activation space.
        lambdas_train: the call builds a graph to the lambdas of the adapters reading x (`weight_space` or
            `activation_space`): weight space then computes h for their gradients (activation space always
            does).
    """

    weight_space: tuple[str, ...] = ()
    activation_space: tuple[str, ...] = ()
    own_dropout: tuple[str, ...] = ()
    lambdas_train: bool = False

    @property
    def path(self) -> str:
        """WEIGHT_SPACE when some adapters fold into the weight, else ACTIVATION_SPACE (all run there)."""
        return WEIGHT_SPACE if self.weight_space else ACTIVATION_SPACE


def plan_forward(
    x: torch.Tensor,
    adapters: Sequence[AdapterFacts],
    *,
    in_features: int,
    out_features: int,
    r: int,
    base_weight: torch.Tensor,
    base_is_plain_dense: bool,
    training: bool,
    extra_arguments: bool,
    tokens: int | None = None,
    weight_space_with_grad: bool = True,
) -> ForwardPlan:
    """The plan of one call: weight space where exact and cheaper by `path_costs`, activation space otherwise.

    An adapter whose dropout is active (in training, p > 0) reads dropout(x), which no weight can express: it
    is planned apart, in activation space. The others read x and are computed together, in weight space when
    the base layer is a plain dense matmul with a frozen float32/float64 weight, called with x alone, x's
    matmuls run in the weight's dtype (autocast included), and `choose_path` finds weight space cheaper for
    this many tokens and this grad mode.

    Args:
        x: the input, (..., in); its dtype, device (for the autocast dtype), size and requires_grad are read.
        adapters: the layer's active, unmerged adapters, in the order their terms are added.
        in_features: the layer's input size.
        out_features: the layer's output size.
        r: the projections' rank.
        base_weight: the base layer's weight (its dtype and requires_grad are read).
        base_is_plain_dense: the base layer computes exactly `x W^T + b` with a dense W (not a quantized,
            subclassed or hooked layer), so one matmul with `W + ΔW` may replace its call.
        training: the layer is in training mode (dropout active).
        extra_arguments: the base layer is called with more than x (only its own forward can honor them).
        tokens: the rows the layer's matrix multiplies (default: x.numel() // in_features; a convolution's
            is its batch times its output positions).
        weight_space_with_grad: weight space may run when a backward follows (False: only without grad, for
            layer types with no weight-space autograd Function).
    """
    own_dropout = tuple(adapter.name for adapter in adapters if training and adapter.dropout > 0)
    reading_x = [adapter for adapter in adapters if adapter.name not in own_dropout]
    if not reading_x:
        return ForwardPlan(own_dropout=own_dropout)
    names = tuple(adapter.name for adapter in reading_x)
    train = lambdas_train(t for adapter in reading_x for t in adapter.lambdas)
    needs_grad = train or (torch.is_grad_enabled() and x.requires_grad)  # a backward runs through the layer
    tokens = x.numel() // in_features if tokens is None else tokens
    costs = path_costs(tokens, in_features, out_features, r, needs_grad)
    path = choose_path(
        costs,
        weight_dtype=base_weight.dtype,
        input_dtype=autocast_dtype(x.device.type) or x.dtype,  # the dtype x's matmuls run in
        dropout_active=False,
        weight_space_supported=base_is_plain_dense
        and not extra_arguments
        and not base_weight.requires_grad
        and (weight_space_with_grad or not needs_grad),
    )
    if path == WEIGHT_SPACE:
        return ForwardPlan(weight_space=names, own_dropout=own_dropout, lambdas_train=train)
    return ForwardPlan(activation_space=names, own_dropout=own_dropout, lambdas_train=train)
