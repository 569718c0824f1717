"""veralab.fast's autograd Functions and cost-model dispatch: exact on every branch, lean, and never stale.

Every dispatch branch is checked against veralab.reference (outputs, lambda gradients, input gradients), the
whole model against PEFT, each Function by gradcheck in float64, and the caches (shared h, scaled projection,
sliced forms) for sharing what they should and noticing every change they must.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from helpers import randomize_lambdas, tiny_llama, token_batch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import VeraLinear, get_model
from veralab.fast.diagnostics import layers_sharing_inputs, saved_activation_bytes, saved_activations
from veralab.fast.dispatch import ACTIVATION_SPACE, WEIGHT_SPACE, choose_path, path_costs
from veralab.fast.functional import (
    activation_space_vera,
    mixed_batch_vera,
    scaled_projection,
    weight_space_vera,
)
from veralab.fast.projections import DerivedCache, SharedProjections
from veralab.fast.rows import RowAdapters

# Odd sizes on purpose; the projections are sized larger than the layer so that slicing matters.
IN, OUT, R = 7, 11, 5
# float64 results: beyond round-off (a few thousand eps of float64 over these short reductions) is a bug.
ROUNDOFF = dict(rtol=1e4 * torch.finfo(torch.float64).eps, atol=1e4 * torch.finfo(torch.float64).eps)
FUNCTION_NAMES = {"WeightSpaceVeraBackward": WEIGHT_SPACE, "ActivationSpaceVeraBackward": ACTIVATION_SPACE}


class NoWeightSpaceLinear(VeraLinear):
    """Stands for a quantized subclass (the bitsandbytes layers): its weight is no dense matrix to add ΔW
    to."""

    def base_is_plain_dense(self) -> bool:
        return False


def make_layer(
    dtype=torch.float32,
    adapters=("a",),
    dropout=0.0,
    conv1d=False,
    bias=True,
    train_bias=False,
    layer_cls=VeraLinear,
    seed=0,
) -> VeraLinear:
    """A VeraLinear over a frozen (IN -> OUT) base, random non-zero lambdas, every adapter active.

    float64 converts the whole layer (lambdas included); a bf16/fp16 base keeps float32 lambdas, as
    `get_model` does for a model loaded in half precision.
    """
    torch.manual_seed(seed)
    base = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT, bias=bias)
    base.requires_grad_(False)
    if train_bias:
        base.bias.requires_grad_(True)
    if dtype != torch.float64:
        base.to(dtype)
    projections = SharedProjections.create(R, IN + 3, OUT + 2, prng_key=0)
    layer = layer_cls(base, projections, fan_in_fan_out=conv1d)
    for name in adapters:
        layer.update_layer(name, VeraConfig(r=R, init_weights=False, vera_dropout=dropout))
    layer.set_adapter(list(adapters))
    if dtype == torch.float64:
        layer.double()
        projections.replace(projections.vera_A.double(), projections.vera_B.double())
    return layer


def reference_run(layer: VeraLinear, x: torch.Tensor, grad_output, dtype: torch.dtype, seed: int = 0):
    """Output and gradients of `veralab.reference` with the layer's tensors, computed in `dtype`.

    Returns (y, grad_x, {name: grad_lambda_d}, {name: grad_lambda_b}, grad_bias or None); with
    grad_output=None, no backward is run and the gradients are None.
    """
    weight = layer.get_base_weight().to(dtype)
    bias = layer.base_layer.bias
    bias = None if bias is None else bias.detach().to(dtype).requires_grad_(bias.requires_grad)
    pair = layer.projections_of(layer.active_adapters[0])
    vera_A, vera_B = (t.to(dtype) for t in (pair.vera_A, pair.vera_B))
    x = x.detach().to(dtype).requires_grad_(True)
    names = layer.active_adapters
    lambdas_d = {n: layer.vera_lambda_d[n].detach().to(dtype).requires_grad_(True) for n in names}
    lambdas_b = {n: layer.vera_lambda_b[n].detach().to(dtype).requires_grad_(True) for n in names}
    torch.manual_seed(seed)
    y = F.linear(x, weight, bias)
    for n in names:
        dropout = layer.vera_dropout[n]
        # The reference's adapter term alone: its forward over a zero weight.
        y = y + ref.vera_forward(
            x, torch.zeros_like(weight), None, vera_A, vera_B, lambdas_d[n], lambdas_b[n], dropout=dropout
        )
    if grad_output is not None:
        y.backward(grad_output.to(dtype))
    return (
        y.detach(),
        x.grad,
        {n: t.grad for n, t in lambdas_d.items()},
        {n: t.grad for n, t in lambdas_b.items()},
        None if bias is None else bias.grad,
    )


def path_taken(y: torch.Tensor) -> str:
    """The VeRA Function that produced y (through the cast back to x's dtype under autocast)."""
    node = y.grad_fn
    if type(node).__name__ == "ToCopyBackward0":
        node = node.next_functions[0][0]
    return FUNCTION_NAMES[type(node).__name__]


def fast_run(layer: VeraLinear, x: torch.Tensor, grad_output: torch.Tensor, seed: int):
    """The same as `reference_run` through the layer itself, plus the path its forward took."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    path = path_taken(y)
    y.backward(grad_output.to(y.dtype))
    bias = layer.base_layer.bias
    return (
        y.detach(),
        x.grad,
        {n: layer.vera_lambda_d[n].grad for n in layer.active_adapters},
        {n: layer.vera_lambda_b[n].grad for n in layer.active_adapters},
        None if bias is None or not bias.requires_grad else bias.grad,
        path,
    )


def assert_close_to_truth(
    fast: torch.Tensor, same_dtype_reference: torch.Tensor, truth: torch.Tensor, dtype, length
):
    """fast's error against the float64 truth is at most twice the error the reference makes in `dtype`.

    The floor, eps(dtype) x |truth| x the reduction length, covers a reference that happens to be exact.
    """
    truth = truth.double()
    fast_error = (fast.double() - truth).abs().max().item()
    reference_error = (same_dtype_reference.double() - truth).abs().max().item()
    floor = torch.finfo(dtype).eps * truth.abs().max().item() * length
    assert fast_error <= 2 * reference_error + floor, (fast_error, reference_error, floor)


BRANCHES = [
    # (id, make_layer kwargs, leading shape of x, expected path)
    ("weight space", {}, (4, 9), WEIGHT_SPACE),
    ("weight space, float64", {"dtype": torch.float64}, (4, 9), WEIGHT_SPACE),
    ("weight space, Conv1D", {"conv1d": True}, (4, 9), WEIGHT_SPACE),
    ("weight space, two adapters", {"adapters": ("a", "b")}, (36,), WEIGHT_SPACE),
    ("weight space, trained bias", {"train_bias": True}, (4, 9), WEIGHT_SPACE),
    ("weight space, no bias", {"bias": False}, (4, 9), WEIGHT_SPACE),
    ("activation space, few tokens", {}, (1, 2), ACTIVATION_SPACE),
    ("activation space, few tokens, two adapters", {"adapters": ("a", "b")}, (2,), ACTIVATION_SPACE),
    ("activation space, dropout", {"dropout": 0.4, "dtype": torch.float64}, (4, 9), ACTIVATION_SPACE),
    ("activation space, bf16 base", {"dtype": torch.bfloat16}, (4, 9), ACTIVATION_SPACE),
    ("activation space, fp16 base", {"dtype": torch.float16}, (4, 9), ACTIVATION_SPACE),
    ("activation space, quantized-like base", {"layer_cls": NoWeightSpaceLinear}, (4, 9), ACTIVATION_SPACE),
]


@pytest.mark.parametrize(
    "kwargs, lead, expected_path", [b[1:] for b in BRANCHES], ids=[b[0] for b in BRANCHES]
)
def test_every_dispatch_branch_matches_the_reference(kwargs, lead, expected_path):
    layer = make_layer(**kwargs)
    layer.train()
    dtype = layer.base_layer.weight.dtype
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, IN, generator=generator).to(dtype)
    grad_output = torch.randn(*lead, OUT, generator=generator)

    y, grad_x, grads_d, grads_b, grad_bias, path = fast_run(layer, x, grad_output, seed=5)
    assert path == expected_path == layer.plan(x.requires_grad_()).path
    low = reference_run(layer, x, grad_output, dtype, seed=5)
    truth = reference_run(layer, x, grad_output, torch.float64, seed=5)

    length = IN + R + x.numel() // IN  # the longest reduction: over in, r, or the tokens (lambda grads)
    assert y.dtype == dtype
    assert_close_to_truth(y, low[0], truth[0], dtype, length)
    assert_close_to_truth(grad_x, low[1], truth[1], dtype, length)
    for name in layer.active_adapters:
        assert grads_d[name].dtype == layer.vera_lambda_d[name].dtype
        assert_close_to_truth(grads_d[name], low[2][name], truth[2][name], dtype, length)
        assert_close_to_truth(grads_b[name], low[3][name], truth[3][name], dtype, length)
    if kwargs.get("train_bias"):
        assert_close_to_truth(grad_bias, low[4], truth[4], dtype, length)


def test_inference_takes_the_cheapest_path_and_matches_the_reference():
    layer = make_layer(adapters=("a", "b")).eval()
    x = torch.randn(3, 40, IN)
    with torch.no_grad():
        assert layer.plan(x).path == WEIGHT_SPACE  # many tokens: ΔW costs less than h S^T
        assert layer.plan(x[:1, :1]).path == ACTIVATION_SPACE  # one token (generation)
        for inputs in (x, x[:1, :1]):
            truth = reference_run(layer, inputs, None, torch.float64)[0]
            low = reference_run(layer, inputs, None, torch.float32)[0]
            assert_close_to_truth(layer(inputs), low, truth, torch.float32, IN + R)


def test_autocast_takes_activation_space_and_stays_within_autocasts_own_error():
    layer = make_layer(adapters=("a", "b"))
    x = torch.randn(4, 9, IN)
    grad_output = torch.randn(4, 9, OUT)
    truth = reference_run(layer, x, grad_output, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.plan(x.requires_grad_()).path == ACTIVATION_SPACE  # bf16 matmuls drop ΔW
        y, grad_x, grads_d, grads_b, _, path = fast_run(layer, x, grad_output, seed=0)
        low = reference_run(
            layer, x, grad_output, torch.float32
        )  # PyTorch's own error under the same autocast
    assert path == ACTIVATION_SPACE and y.dtype == torch.float32
    length = IN + R + 36
    assert_close_to_truth(y, low[0], truth[0], torch.bfloat16, length)
    assert_close_to_truth(grad_x, low[1], truth[1], torch.bfloat16, length)
    for name in ("a", "b"):
        assert_close_to_truth(grads_d[name], low[2][name], truth[2][name], torch.bfloat16, length)
        assert_close_to_truth(grads_b[name], low[3][name], truth[3][name], torch.bfloat16, length)


def test_a_dropout_adapter_adds_in_activation_space_over_a_weight_space_adapter():
    layer = make_layer(dtype=torch.float64, adapters=("a", "b"))
    layer.vera_dropout["b"] = nn.Dropout(0.5)  # only b drops its input
    layer.train()
    x = torch.randn(4, 9, IN, dtype=torch.float64)
    grad_output = torch.randn(4, 9, OUT, dtype=torch.float64)
    y, grad_x, grads_d, grads_b, _, path = fast_run(layer, x, grad_output, seed=3)
    assert path == ACTIVATION_SPACE  # b, added last
    plan = layer.plan(x.requires_grad_())
    assert plan.path == WEIGHT_SPACE and plan.weight_space == ("a",)  # a, underneath
    assert plan.own_dropout == ("b",)
    truth = reference_run(layer, x, grad_output, torch.float64, seed=3)
    torch.testing.assert_close(y, truth[0], **ROUNDOFF)
    torch.testing.assert_close(grad_x, truth[1], **ROUNDOFF)
    for name in ("a", "b"):
        torch.testing.assert_close(grads_d[name], truth[2][name], **ROUNDOFF)
        torch.testing.assert_close(grads_b[name], truth[3][name], **ROUNDOFF)


def test_inference_mode_inputs_work_without_the_shared_h_cache():
    layer = make_layer().eval()
    x = torch.randn(1, 2, IN)
    with torch.no_grad():
        expected = layer(x)
    cached = len(layer.projections_of("a")._hidden)
    with torch.inference_mode():
        inference_x = x.clone()  # an inference tensor: it has no version counter to check h against
        torch.testing.assert_close(layer(inference_x), expected)
    assert len(layer.projections_of("a")._hidden) == cached  # nothing cached for it


def test_merged_layer_costs_exactly_the_base_layer():
    layer = make_layer()
    x = torch.randn(4, 9, IN, requires_grad=True)
    expected = layer(x).detach()
    layer.merge()
    y = layer(x)
    assert type(y.grad_fn).__name__ not in FUNCTION_NAMES  # no adapter term left to compute
    assert torch.equal(y, layer.base_layer(x))
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------ the Functions themselves, by gradcheck


def float64_projections(r, in_features, out_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    A_s = torch.randn(r, in_features, generator=generator, dtype=torch.float64)
    B_s = torch.randn(out_features, r, generator=generator, dtype=torch.float64)
    return A_s, B_s


@pytest.mark.fault(
    "numerics",
    "gradcheck (float64) of the weight-space autograd Function",
    "analytic gradients match finite differences",
)
@pytest.mark.parametrize("out_features, in_features, r, adapters", [(5, 3, 4, 1), (2, 6, 3, 2), (1, 1, 1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_space_function_passes_gradcheck(out_features, in_features, r, adapters, with_bias):
    A_s, B_s = float64_projections(r, in_features, out_features)
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    x = torch.randn(2, 3, in_features, dtype=torch.float64, requires_grad=True)
    lambda_d = torch.randn(adapters, r, dtype=torch.float64, requires_grad=True)
    lambda_b = torch.randn(adapters, out_features, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_features, dtype=torch.float64, requires_grad=True) if with_bias else None

    def function(x, lambda_d, lambda_b, bias):
        with torch.no_grad():  # h follows the perturbed x, as the layer computes it
            h = F.linear(x, A_s)
        S = scaled_projection(B_s, lambda_d, lambda_b)
        return weight_space_vera(x, h, S, weight, bias, A_s, B_s, lambda_d, lambda_b)

    assert torch.autograd.gradcheck(function, (x, lambda_d, lambda_b, bias))


@pytest.mark.fault(
    "numerics",
    "gradcheck (float64) of the activation-space autograd Function",
    "analytic gradients match finite differences",
)
@pytest.mark.parametrize("out_features, in_features, r, adapters", [(5, 3, 4, 1), (2, 6, 3, 2), (1, 1, 1, 1)])
def test_activation_space_function_passes_gradcheck(out_features, in_features, r, adapters):
    A_s, B_s = float64_projections(r, in_features, out_features)
    base_weight = torch.randn(out_features, in_features, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, in_features, dtype=torch.float64, requires_grad=True)
    lambda_d = torch.randn(adapters, r, dtype=torch.float64, requires_grad=True)
    lambda_b = torch.randn(adapters, out_features, dtype=torch.float64, requires_grad=True)

    def function(x, base_weight, lambda_d, lambda_b):
        with torch.no_grad():
            h = F.linear(x, A_s)
        S = scaled_projection(B_s, lambda_d, lambda_b)
        # base_output carries its own graph (here back to the base weight and x): its gradient passes through.
        return activation_space_vera(F.linear(x, base_weight), x, h, S, A_s, B_s, lambda_d, lambda_b)

    assert torch.autograd.gradcheck(function, (x, base_weight, lambda_d, lambda_b))


@pytest.mark.fault(
    "numerics",
    "gradcheck (float64) of the mixed-batch autograd Function",
    "analytic gradients match finite differences",
)
def test_mixed_batch_function_passes_gradcheck():
    A_s, B_s = float64_projections(3, 4, 5)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    lambda_d_rows = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    lambda_b_rows = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def function(x, lambda_d_rows, lambda_b_rows):
        base = x.sum(-1, keepdim=True).expand(3, 2, 5)
        return mixed_batch_vera(base, F.linear(x, A_s), B_s, lambda_d_rows, lambda_b_rows)

    assert torch.autograd.gradcheck(function, (x, lambda_d_rows, lambda_b_rows))


# ------------------------------------------------------------------ the cost model and the dispatch


def test_path_costs_follow_the_cost_model():
    tokens, in_features, out_features, r = 4096, 512, 1376, 256
    costs = path_costs(tokens, in_features, out_features, r, needs_grad=True)
    build = out_features * in_features * (r + 1)
    assert costs[WEIGHT_SPACE] == tokens * r * (in_features + out_features) + 2 * build
    assert costs[ACTIVATION_SPACE] == tokens * r * (2 * in_features + 3 * out_features)
    # the cost model (docs/design.md): weight space costs about half of activation space at this size
    assert 0.35 < costs[WEIGHT_SPACE] / costs[ACTIVATION_SPACE] < 0.55
    inference = path_costs(tokens, in_features, out_features, r, needs_grad=False)
    assert inference == {WEIGHT_SPACE: build, ACTIVATION_SPACE: tokens * r * (in_features + out_features)}


CHOICES = [
    # (id, overrides of the default arguments, expected path)
    ("fp32, many tokens", {}, WEIGHT_SPACE),
    ("fp64", {"weight_dtype": torch.float64, "input_dtype": torch.float64}, WEIGHT_SPACE),
    ("few tokens", {"tokens": 8}, ACTIVATION_SPACE),
    ("one token, inference", {"tokens": 1, "needs_grad": False}, ACTIVATION_SPACE),
    ("dropout", {"dropout_active": True}, ACTIVATION_SPACE),
    ("bf16 weight", {"weight_dtype": torch.bfloat16, "input_dtype": torch.bfloat16}, ACTIVATION_SPACE),
    ("fp16 weight", {"weight_dtype": torch.float16, "input_dtype": torch.float16}, ACTIVATION_SPACE),
    ("input dtype differs", {"input_dtype": torch.bfloat16}, ACTIVATION_SPACE),
    ("quantized base", {"weight_space_supported": False}, ACTIVATION_SPACE),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CHOICES], ids=[c[0] for c in CHOICES])
def test_choose_path(overrides, expected):
    layer = dict(tokens=4096, in_features=512, out_features=512, r=256, needs_grad=True)
    conditions = dict(
        weight_dtype=torch.float32,
        input_dtype=torch.float32,
        dropout_active=False,
        weight_space_supported=True,
    )
    costs = path_costs(**{**layer, **{k: v for k, v in overrides.items() if k in layer}})
    assert (
        choose_path(costs, **{**conditions, **{k: v for k, v in overrides.items() if k in conditions}})
        == expected
    )


def test_layer_dispatch_respects_trained_base_weight_hooks_and_extra_arguments():
    layer = make_layer()
    x = torch.randn(4, 9, IN, requires_grad=True)
    assert layer.plan(x).path == WEIGHT_SPACE
    assert layer.plan(x, extra_arguments=True).path == ACTIVATION_SPACE
    handle = layer.base_layer.register_forward_hook(lambda module, args, output: output)
    assert layer.plan(x).path == ACTIVATION_SPACE  # the hook must still run
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert layer.plan(x).path == ACTIVATION_SPACE  # the base weight's own gradient is needed


# ------------------------------------------------------------------ whole models: PEFT, sharing,
# checkpointing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCKS = tiny_llama().config.num_hidden_layers
LLAMA_R = 16
# (batch, sequence) for which every layer of helpers.tiny_llama takes each path in training (see path_costs).
TOKENS = {WEIGHT_SPACE: (2, 24), ACTIVATION_SPACE: (2, 3)}


def veralab_llama(base=None, seed=1) -> torch.nn.Module:
    """helpers.tiny_llama in float64 with VeRA on every block linear and random non-zero lambdas."""
    base = copy.deepcopy(base or tiny_llama()).double()
    model = get_model(base, VeraConfig(r=LLAMA_R, target_modules=TARGETS)).double()
    randomize_lambdas(model, seed=seed)
    return model


def embeds_for(model, shape, seed=2):
    ids = token_batch(*shape, seed=seed)
    return ids, model.get_input_embeddings()(ids).detach().requires_grad_(True)


def loss_and_grads(model, shape):
    ids, embeds = embeds_for(model, shape)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n.split("base_model.")[-1]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), embeds.grad, grads


@pytest.mark.parametrize("path", [WEIGHT_SPACE, ACTIVATION_SPACE])
def test_llama_matches_peft_outputs_and_gradients(path):
    peft = pytest.importorskip("peft")
    base = tiny_llama().double()
    ours = veralab_llama(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.VeraConfig(r=LLAMA_R, target_modules=TARGETS)
        ).double()
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                their_params[f"base_model.{name}"].copy_(param)
    assert torch.equal(ours.vera_A, theirs.base_model.vera_A["default"].double())

    shape = TOKENS[path]
    paths = {
        layer.plan(torch.empty(*shape, layer.in_features, dtype=torch.float64, requires_grad=True)).path
        for _, layer in ours.vera_layers()
    }
    assert paths == {path}
    our_logits, our_input_grad, our_grads = loss_and_grads(ours, shape)
    their_logits, their_input_grad, their_grads = loss_and_grads(theirs, shape)
    torch.testing.assert_close(our_logits, their_logits, **ROUNDOFF)
    torch.testing.assert_close(our_input_grad, their_input_grad, **ROUNDOFF)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 2 * 7 * BLOCKS
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], **ROUNDOFF)


def saved_tensors_of_one_forward(model, shape):
    """{storage pointer: SavedStorage} of the activations autograd saves in one training forward, and the
    loss."""
    ids, embeds = embeds_for(model, shape)
    return saved_activations(model, lambda: model(inputs_embeds=embeds, labels=ids).loss)


@pytest.mark.parametrize("path", [WEIGHT_SPACE, ACTIVATION_SPACE])
def test_layers_reading_one_input_share_one_h(path):
    model = veralab_llama()
    batch, seq = TOKENS[path]
    saved, loss = saved_tensors_of_one_forward(model, (batch, seq))
    hidden = [s for s in saved.values() if s.shape == (batch, seq, LLAMA_R)]
    # per block: one h for q, k and v; one for o; one for gate and up; one for down
    assert len(hidden) == 4 * BLOCKS
    assert len(model.projections._hidden) == 0  # every cached h died with its input, before the backward
    loss.backward()


def test_saved_activations_add_only_the_shared_h_to_the_frozen_model():
    model = veralab_llama()
    shape = TOKENS[WEIGHT_SPACE]
    adapted, _ = saved_tensors_of_one_forward(model, shape)
    with model.disable_adapter():
        frozen, _ = saved_tensors_of_one_forward(model, shape)

    def activation_bytes(saved):
        return sum(storage.nbytes for storage in saved.values())

    h_bytes = 4 * BLOCKS * shape[0] * shape[1] * LLAMA_R * 8  # float64
    extra = activation_bytes(adapted) - activation_bytes(frozen)
    widest = max(layer.out_features for _, layer in model.vera_layers())
    small = 8 * (LLAMA_R + widest) * 7 * BLOCKS * 4  # the stacked lambdas (one copy each, float64)
    slices = sum(t.untyped_storage().nbytes() for t in model.projections._cache.values())
    assert h_bytes <= extra <= h_bytes + small + slices


def test_layers_sharing_inputs_groups_q_k_v_and_gate_up():
    model = veralab_llama()
    ids, _ = embeds_for(model, (1, 8))
    groups = layers_sharing_inputs(model, lambda: model(input_ids=ids))
    suffixes = [[name.rsplit(".", 1)[-1] for name, _ in group] for group in groups]
    assert (
        suffixes
        == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * BLOCKS
    )
    assert all(
        not layer._forward_pre_hooks for _, layer in model.vera_layers()
    )  # the recording hooks are gone


def test_saved_activation_bytes_counts_each_storage_once_and_frees_the_graph():
    layer = nn.Linear(6, 5)
    x = torch.randn(4, 6, requires_grad=True)

    def loss():
        y = x * 2  # (4, 6); a product with a constant saves nothing
        # The linear layer saves y (its weight is a parameter: not counted); the product saves layer(y) and
        # y[:, :5], a view of y's storage, which is counted once.
        return (layer(y) * y[:, :5]).sum()

    assert saved_activation_bytes(layer, loss) == (4 * 6 + 4 * 5) * 4  # y's storage and layer(y), float32
    assert layer.weight.grad is None and x.grad is not None  # backward ran, the model's gradients were reset


def test_shared_h_is_tied_to_no_graph_so_sibling_layers_can_train_one_after_the_other():
    model = veralab_llama()
    attention = model.model.model.layers[0].self_attn
    x = torch.randn(2, 24, attention.q_proj.in_features, dtype=torch.float64, requires_grad=True)
    attention.q_proj(x).sum().backward()
    grad_after_q = x.grad.clone()
    attention.k_proj(x).sum().backward()  # reuses q's h: it carries no graph that q's backward freed
    layer = attention.k_proj
    truth = reference_run(layer, x, torch.ones(2, 24, layer.out_features), torch.float64)
    torch.testing.assert_close(x.grad - grad_after_q, truth[1], **ROUNDOFF)
    torch.testing.assert_close(layer.vera_lambda_b["default"].grad, truth[3]["default"], **ROUNDOFF)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    base = tiny_llama()
    plain, checkpointed = veralab_llama(base), veralab_llama(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of the method name
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    plain.train(), checkpointed.train()
    _, plain_input_grad, plain_grads = loss_and_grads(plain, TOKENS[WEIGHT_SPACE])
    _, input_grad, grads = loss_and_grads(checkpointed, TOKENS[WEIGHT_SPACE])
    torch.testing.assert_close(input_grad, plain_input_grad, **ROUNDOFF)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, **ROUNDOFF)


def test_torch_compile_traces_the_functions_and_the_sharing():
    model = veralab_llama()
    attention = model.model.model.layers[0].self_attn
    projections = torch.nn.ModuleList([attention.q_proj, attention.k_proj, attention.v_proj])

    def qkv(x):
        return sum(p(x).sum() for p in projections)

    x = torch.randn(2, 24, attention.q_proj.in_features, dtype=torch.float64, requires_grad=True)
    expected = qkv(x)
    expected.backward()
    expected_grad = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(qkv, backend="eager", fullgraph=False)
    result = compiled(x)
    result.backward()
    torch.testing.assert_close(result, expected, **ROUNDOFF)
    torch.testing.assert_close(x.grad, expected_grad, **ROUNDOFF)


# ------------------------------------------------------------------ the caches never serve a stale form


def test_shared_h_is_recomputed_when_the_input_or_the_projections_change_and_dies_with_the_input():
    projections = SharedProjections.create(R, IN, OUT, prng_key=0)
    A_s = projections.sliced_A(IN, torch.float32, torch.device("cpu"))
    A_before = A_s.clone()  # (A_s may be vera_A itself when the slice is the whole matrix)
    x = torch.randn(3, IN)
    h = projections.hidden(x, A_s)
    assert projections.hidden(x, A_s) is h  # shared
    assert projections.hidden(x.clone(), A_s) is not h  # another tensor, another h
    x.mul_(2)  # written in place: the cached h is stale
    h_after_write = projections.hidden(x, A_s)
    torch.testing.assert_close(h_after_write, x @ A_s.T)
    projections.vera_A.add_(1.0)  # the projections written in place (load_state_dict does this)
    A_new = projections.sliced_A(IN, torch.float32, torch.device("cpu"))
    assert not torch.equal(A_new, A_before)
    torch.testing.assert_close(projections.hidden(x, A_new), x @ A_new.T)
    del x, h, h_after_write
    gc.collect()
    assert len(projections._hidden) == 0


def test_scaled_projection_follows_lambda_updates_and_replacements():
    layer = make_layer(adapters=("a", "b")).eval()
    x = torch.randn(1, 2, IN)  # few tokens: activation space, where the cached S is used directly

    def check():
        with torch.no_grad():
            truth = reference_run(layer, x, None, torch.float64)[0]
            low = reference_run(layer, x, None, torch.float32)[0]
            assert_close_to_truth(layer(x), low, truth, torch.float32, IN + R)

    check()
    with torch.no_grad():
        layer.vera_lambda_b["a"].mul_(-3.0)  # an optimizer step writes in place
    check()
    layer.vera_lambda_d["b"] = nn.Parameter(torch.randn(R))  # a new tensor (load_state_dict(assign=True))
    check()
    layer.set_adapter(["a"])  # another set of adapters
    check()


def test_caches_follow_dtype_and_device():
    layer = make_layer()
    x = torch.randn(4, 9, IN, dtype=torch.float64)
    layer.double()
    pair = layer.projections_of("a")
    pair.replace(pair.vera_A.double(), pair.vera_B.double())
    with torch.no_grad():
        truth = reference_run(layer, x, None, torch.float64)[0]
        torch.testing.assert_close(layer(x), truth, **ROUNDOFF)

    projections = layer.projections_of("a")
    meta = torch.device("meta")
    cpu_A = projections.sliced_A(IN, torch.float64, torch.device("cpu"))
    assert projections.sliced_A(IN, torch.float64, meta).device == meta
    assert projections.sliced_A(IN, torch.float32, torch.device("cpu")).dtype == torch.float32
    assert projections.sliced_A(IN, torch.float64, torch.device("cpu")) is cpu_A  # still cached


def test_derived_cache_rebuilds_when_a_source_or_the_key_changes():
    cache = DerivedCache()
    builds = []

    def build():
        builds.append(1)
        return torch.zeros(1)

    lambda_d, lambda_b = torch.randn(R), torch.randn(OUT)
    value = cache.get([lambda_d, lambda_b], key=torch.float32, build=build)
    assert cache.get([lambda_d, lambda_b], key=torch.float32, build=build) is value and len(builds) == 1
    changes = [
        ([lambda_d, lambda_b], torch.float64),  # another dtype
        ([lambda_d, lambda_b], (torch.float64, torch.device("meta"))),  # another device
        ([lambda_d.clone(), lambda_b], (torch.float64, torch.device("meta"))),  # a replaced lambda
        ([lambda_d], (torch.float64, torch.device("meta"))),  # another set of adapters
    ]
    for count, (sources, key) in enumerate(changes, start=2):
        cache.get(sources, key=key, build=build)
        assert len(builds) == count
    lambda_d.add_(1.0)  # written in place
    cache.get([lambda_d], key=(torch.float64, torch.device("meta")), build=build)
    assert len(builds) == len(changes) + 2


def test_model_copies_start_with_empty_caches():
    model = veralab_llama()
    shape = TOKENS[WEIGHT_SPACE]
    ids, embeds = embeds_for(model, shape)
    with torch.no_grad():
        expected = model(inputs_embeds=embeds).logits
    clone = copy.deepcopy(model)
    assert clone.projections is not model.projections and not clone.projections._cache
    with torch.no_grad():
        torch.testing.assert_close(clone(inputs_embeds=embeds).logits, expected, **ROUNDOFF)


# ------------------------------------------------------------------ mixed batches


def test_mixed_batch_matches_each_rows_own_adapter():
    layer = make_layer(adapters=("a", "b", "c")).eval()
    model_rows = ["a", "c", "__base__", "b", "a"]
    names = list(dict.fromkeys(model_rows))
    layer.row_adapters = RowAdapters(names=names, index=torch.tensor([names.index(n) for n in model_rows]))
    x = torch.randn(5, 3, IN)
    with torch.no_grad():
        mixed = layer(x)
    layer.row_adapters = None
    for row, name in enumerate(model_rows):
        with torch.no_grad():
            if name == "__base__":
                expected = layer.base_layer(x[row])
            else:
                layer.set_adapter([name])
                expected = layer(x[row])
        torch.testing.assert_close(mixed[row], expected)
