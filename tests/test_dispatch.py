"""veralab.fast.dispatch: the plan of one call of a VeRA layer, from the layer's facts and the input.

Weight space where it is exact and cheaper by the cost model, activation space otherwise; an adapter whose
dropout is active is planned apart. That the layer's forward carries each plan out exactly (against the
reference, on both paths) is checked in test_functional.py.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab import VeraConfig
from veralab.fast import VeraLinear, get_model
from veralab.fast.dispatch import (
    ACTIVATION_SPACE,
    WEIGHT_SPACE,
    AdapterFacts,
    ForwardPlan,
    path_costs,
    plan_forward,
)
from veralab.fast.projections import SharedProjections

IN, OUT, R = 7, 11, 4  # odd sizes
MANY, FEW = 64, 2  # token counts on either side of where the cost model switches paths for these sizes


class NonDenseBaseLinear(VeraLinear):
    """Stands for a layer over a quantized base (bitsandbytes): its weight is no dense matrix to add ΔW to."""

    def base_is_plain_dense(self) -> bool:
        return False


def adapted_layer(
    adapters=("a",), dtype=torch.float32, dropout=None, conv1d=False, layer_cls=VeraLinear
) -> VeraLinear:
    """A VeraLinear over a frozen (IN -> OUT) base with `adapters` active, trainable, in training mode.

    Args:
        dropout: {adapter name: vera_dropout} (0 for the others).
    """
    torch.manual_seed(0)
    base = (Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT)).to(dtype).requires_grad_(False)
    layer = layer_cls(base, SharedProjections.create(R, IN, OUT, prng_key=0), fan_in_fan_out=conv1d)
    dropout = dropout or {}
    for name in adapters:
        layer.update_layer(name, VeraConfig(r=R, vera_dropout=dropout.get(name, 0.0)))
    layer.set_adapter(list(adapters))
    return layer.train()


def tokens(count: int, dtype=torch.float32, requires_grad=True) -> torch.Tensor:
    return torch.empty(count, IN, dtype=dtype, requires_grad=requires_grad)


def test_the_token_counts_used_here_sit_on_either_side_of_the_crossover():
    for needs_grad in (True, False):
        for count, cheaper in ((MANY, WEIGHT_SPACE), (FEW, ACTIVATION_SPACE)):
            costs = path_costs(count, IN, OUT, R, needs_grad)
            assert min(costs, key=costs.get) == cheaper


def test_a_float32_linear_over_many_tokens_folds_every_adapter_into_the_weight():
    layer = adapted_layer(adapters=("a", "b"))
    assert layer.plan(tokens(MANY)) == ForwardPlan(weight_space=("a", "b"), lambdas_train=True)


def test_a_float32_conv1d_over_many_tokens_folds_into_the_weight_too():
    layer = adapted_layer(conv1d=True)
    assert layer.plan(tokens(MANY)) == ForwardPlan(weight_space=("a",), lambdas_train=True)


def test_few_tokens_plan_activation_space():
    layer = adapted_layer(adapters=("a", "b"))
    assert layer.plan(tokens(FEW)) == ForwardPlan(activation_space=("a", "b"), lambdas_train=True)


def add_forward_hook(layer: VeraLinear) -> None:
    layer.base_layer.register_forward_hook(lambda module, args, output: output)


def add_forward_pre_hook(layer: VeraLinear) -> None:
    layer.base_layer.register_forward_pre_hook(lambda module, args: None)


def train_base_weight(layer: VeraLinear) -> None:
    layer.base_layer.weight.requires_grad_(True)


INEXACT_IN_WEIGHT_SPACE = [
    # (id, adapted_layer kwargs, change to the layer, x dtype, extra forward arguments, autocast dtype)
    ("bf16 weight", {"dtype": torch.bfloat16}, None, torch.bfloat16, False, None),
    ("fp16 weight", {"dtype": torch.float16}, None, torch.float16, False, None),
    ("extra forward arguments", {}, None, torch.float32, True, None),
    ("forward hook on the base", {}, add_forward_hook, torch.float32, False, None),
    ("forward pre-hook on the base", {}, add_forward_pre_hook, torch.float32, False, None),
    ("trained base weight", {}, train_base_weight, torch.float32, False, None),
    ("non-dense (quantized-like) base", {"layer_cls": NonDenseBaseLinear}, None, torch.float32, False, None),
    ("autocast to bf16", {}, None, torch.float32, False, torch.bfloat16),
    ("float64 input, float32 weight", {}, None, torch.float64, False, None),
]


@pytest.mark.parametrize(
    "kwargs, change, x_dtype, extra_arguments, autocast",
    [case[1:] for case in INEXACT_IN_WEIGHT_SPACE],
    ids=[case[0] for case in INEXACT_IN_WEIGHT_SPACE],
)
def test_where_weight_space_is_not_exact_every_adapter_plans_activation_space(
    kwargs, change, x_dtype, extra_arguments, autocast
):
    layer = adapted_layer(adapters=("a", "b"), **kwargs)
    if change is not None:
        change(layer)
    x = tokens(MANY, dtype=x_dtype)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        plan = layer.plan(x, extra_arguments=extra_arguments)
    assert plan == ForwardPlan(activation_space=("a", "b"), lambdas_train=True)
    assert plan.path == ACTIVATION_SPACE


def test_an_adapter_with_active_dropout_is_planned_apart_from_the_others():
    layer = adapted_layer(adapters=("a", "b", "c"), dropout={"b": 0.3})
    assert layer.plan(tokens(MANY)) == ForwardPlan(
        weight_space=("a", "c"), own_dropout=("b",), lambdas_train=True
    )
    assert layer.plan(tokens(FEW)) == ForwardPlan(
        activation_space=("a", "c"), own_dropout=("b",), lambdas_train=True
    )
    with torch.no_grad():
        layer.eval()  # dropout is the identity in eval: b reads x again, with the others
        assert layer.plan(tokens(MANY, requires_grad=False)) == ForwardPlan(weight_space=("a", "b", "c"))


def test_when_every_adapter_drops_its_input_none_is_computed_together():
    layer = adapted_layer(adapters=("a", "b"), dropout={"a": 0.1, "b": 0.2})
    plan = layer.plan(tokens(MANY))
    assert plan == ForwardPlan(own_dropout=("a", "b"))
    assert plan.path == ACTIVATION_SPACE


def test_merged_and_inactive_adapters_are_not_planned():
    layer = adapted_layer(adapters=("a", "b", "c"))
    layer.set_adapter(["a", "b"])
    layer.merge(["a"])
    assert layer.plan(tokens(MANY)) == ForwardPlan(weight_space=("b",), lambdas_train=True)
    layer.merge(["b"])
    assert layer.plan(tokens(MANY)) == ForwardPlan()


def test_lambdas_train_only_with_grad_enabled_and_trainable_lambdas():
    layer = adapted_layer(adapters=("a", "b"))
    with torch.no_grad():
        assert layer.plan(tokens(MANY)) == ForwardPlan(weight_space=("a", "b"))
    layer.requires_grad_(False)  # frozen lambdas (an adapter loaded for inference)
    # A backward still runs (x requires grad), but to no lambda: weight space needs no h.
    assert layer.plan(tokens(MANY)) == ForwardPlan(weight_space=("a", "b"))


def test_a_frozen_adapter_reading_x_does_not_train_because_a_dropout_adapter_does():
    layer = adapted_layer(adapters=("a", "b"), dropout={"b": 0.3})
    layer.vera_lambda_d["a"].requires_grad_(False)
    layer.vera_lambda_b["a"].requires_grad_(False)
    assert layer.plan(tokens(MANY)) == ForwardPlan(weight_space=("a",), own_dropout=("b",))


def test_inference_switches_at_the_inference_crossover():
    # Without a backward weight space costs no h at all, so it takes over from fewer tokens than in training.
    costs = {n: path_costs(n, IN, OUT, R, needs_grad=False) for n in range(1, MANY)}
    crossover = next(n for n, c in costs.items() if c[WEIGHT_SPACE] < c[ACTIVATION_SPACE])
    layer = adapted_layer().eval()
    with torch.no_grad():
        assert layer.plan(tokens(crossover - 1, requires_grad=False)).path == ACTIVATION_SPACE
        assert layer.plan(tokens(crossover, requires_grad=False)).path == WEIGHT_SPACE


def test_plan_forward_reads_only_the_facts_it_is_given():
    lambda_d, lambda_b = torch.ones(R), torch.ones(OUT)
    facts = [AdapterFacts("z", 0.0, (lambda_d, lambda_b)), AdapterFacts("y", 0.5, (lambda_d, lambda_b))]
    common = dict(
        in_features=IN, out_features=OUT, r=R, base_weight=torch.empty(OUT, IN), extra_arguments=False
    )
    x = tokens(MANY, requires_grad=False)
    assert plan_forward(x, facts, base_is_plain_dense=True, training=True, **common) == ForwardPlan(
        weight_space=("z",), own_dropout=("y",)
    )
    assert plan_forward(x, facts, base_is_plain_dense=True, training=False, **common) == ForwardPlan(
        weight_space=("z", "y")  # in the order given
    )
    assert plan_forward(x, facts, base_is_plain_dense=False, training=False, **common) == ForwardPlan(
        activation_space=("z", "y")
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_layers_plan_activation_space_even_over_a_float32_weight(bits):
    bnb = pytest.importorskip("bitsandbytes")
    if bits == 8:  # int8 matmul, but the weight is stored as a dense float32 tensor
        base = bnb.nn.Linear8bitLt(IN + 1, OUT, has_fp16_weights=True)
    else:
        base = bnb.nn.Linear4bit(IN + 1, OUT, compute_dtype=torch.float32)
    config = VeraConfig(r=R, target_modules=["proj"])
    model = get_model(nn.Sequential(OrderedDict(proj=base.to("cpu"))), config)
    _, layer = next(model.vera_layers())
    assert not layer.base_is_plain_dense()
    assert layer.plan(torch.empty(MANY, IN + 1, requires_grad=True)).path == ACTIVATION_SPACE
