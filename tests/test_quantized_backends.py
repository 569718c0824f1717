"""VeRA over torchao, optimum-quanto, HQQ and GPTQ/AWQ layers (veralab.fast.backends), checked against the
reference path with error bounds derived from each scheme (as tests/test_bnb.py does for bitsandbytes).

The base is approximate, the adapter exact:

- the adapter term (adapted output minus the base layer's own output) is the reference's to float32 rounding:
  depth in + r, so (in + r + 2) u32 Σ|terms|, plus one rounding of each output for the subtraction;
- the whole layer is the reference on the dequantized weight W̃ within the rounding of a float32 matmul that
  may scale its integer codes before or after summing: (in + 3) u32 (|x| |W̃|ᵀ + |b|);
- lambda gradients are the reference's on W̃ within the depth of backprop, 3 (in + out + r) u32 Σ|terms|;
- a merged weight is within one requantization of W̃ + ΔW. The step of each scheme is derived here from the
  weight written, as the scheme computes it: torchao symmetric int8 s = rowmax / 127.5 and int4 s =
  groupmax / 7.5 (codes [-2^(b-1), 2^(b-1) - 1], s = absmax / ((qmax - qmin) / 2)); quanto qint8
  s = rowmax / 127, qint4 s = (max - min) / 15 per group; HQQ's step (max - min) / (2^b - 1) with the zero
  point its optimizer stored (a value off the grid's span is clamped to its end). Rounding to the nearest
  point errs by s / 2.

Packages missing here skip with the extra that installs them; torchao's GPU int4 layout skips without CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import randomize_lambdas
from torch import nn

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import VeraLinear, VeraModel, get_model
from veralab.fast.backends import layer_kinds
from veralab.fast.backends.quantized import QuantizedVeraLinear
from veralab.fast.errors import MergeNotSupportedError

U32 = torch.finfo(torch.float32).eps / 2
BACKEND_PREFIXES = ("torchao", "quanto", "hqq", "gptq", "awq")
KINDS = {kind.name: kind for kind in layer_kinds() if kind.name.startswith(BACKEND_PREFIXES)}


def kind_params(predicate=lambda kind: True):
    return [
        pytest.param(name, marks=pytest.mark.skipif(bool(kind.unavailable), reason=kind.unavailable or ""))
        for name, kind in KINDS.items()
        if predicate(kind)
    ]


def merging(kind) -> bool:
    return not kind.name.startswith(("gptq", "awq"))


def fp32_forward(kind) -> bool:
    """Kinds whose base forward runs in float32 on float32 inputs (GPTQ/AWQ compute in fp16)."""
    return merging(kind) and kind.name != "torchao-int4"


ALL = kind_params()
MERGEABLE = kind_params(merging)
FORWARD_ONLY = kind_params(lambda kind: not merging(kind))
FP32 = kind_params(fp32_forward)


class Stack(nn.Module):
    """up (256 -> 64) -> tanh -> mid (64 -> 128, not adapted) -> tanh -> down (128 -> 32): shapes every
    grouped scheme accepts (groups of 32, 64 or 128 inputs; 4-bit blocks of 64)."""

    def __init__(self, kind_name: str, shapes=((256, 64), (64, 128), (128, 32))) -> None:
        super().__init__()
        torch.manual_seed(0)
        build = KINDS[kind_name].from_linear
        self.up, self.mid, self.down = (build(nn.Linear(i, o)) for i, o in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def adapted(kind_name: str, r: int = 6) -> VeraModel:
    model = get_model(Stack(kind_name), VeraConfig(r=r, target_modules=["up", "down"]))
    randomize_lambdas(model)
    return model


def dequantized(module: nn.Module) -> torch.Tensor:
    """The dense float32 weight of a quantized layer, read through its VeRA layer class."""
    if isinstance(module, VeraLinear):
        return module.get_base_weight().float()
    projections = get_model(nn.Sequential(module), VeraConfig(r=2, target_modules=["0"])).model[0]
    return projections.get_base_weight().float()


def vera_terms(layer: VeraLinear, model: VeraModel):
    return (
        *ref.slice_projections(model.vera_A, model.vera_B, layer.in_features, layer.out_features),
        layer.vera_lambda_d["default"].detach(),
        layer.vera_lambda_b["default"].detach(),
    )


def reference_adapter_term(x: torch.Tensor, layer: VeraLinear, model: VeraModel):
    A_s, B_s, lambda_d, lambda_b = vera_terms(layer, model)
    zero = torch.zeros(layer.out_features, layer.in_features)
    term = ref.vera_forward(x.float(), zero, None, A_s, B_s, lambda_d, lambda_b)
    magnitude = ref.vera_forward(
        x.float().abs(), zero, None, A_s.abs(), B_s.abs(), lambda_d.abs(), lambda_b.abs()
    )
    return term, (layer.in_features + layer.r["default"] + 2) * U32 * magnitude


def layer_input(layer: VeraLinear, seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(seed))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (actual.float() - expected.float()).abs() - bound
    assert excess.max() <= 0, f"exceeds its bound by {excess.max().item():.3g} (bound max {bound.max():.3g})"


def bias_of(layer: VeraLinear) -> torch.Tensor:
    bias = layer.base_layer.bias
    return torch.zeros(layer.out_features) if bias is None else bias.detach().float()


def matmul_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A float32 x W̃ᵀ + b, codes scaled before or after the sum: (in + 3) u32 (|x| |W̃|ᵀ + |b|)."""
    return (weight.shape[1] + 3) * U32 * (x.abs() @ weight.abs().T + bias.abs())


# ---------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind_name", ALL)
def test_get_model_wraps_each_quantized_layer_in_its_backends_class_with_its_logical_shape(kind_name):
    model = get_model(Stack(kind_name), VeraConfig(r=4, target_modules="all-linear"))
    layers = dict(model.vera_layers())
    assert set(layers) == {"up", "mid", "down"}
    assert all(isinstance(layer, QuantizedVeraLinear) for layer in layers.values())
    assert (layers["up"].out_features, layers["up"].in_features) == (64, 256)
    assert model.vera_A.shape == (4, 256) and model.vera_B.shape == (128, 4)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "vera_lambda" not in name)


@pytest.mark.fault(
    "model",
    "`fan_in_fan_out=True` on a torchao, quanto, HQQ or GPTQ layer",
    "ValueError: (out, in); pass False",
)
@pytest.mark.parametrize("kind_name", ALL)
def test_fan_in_fan_out_is_refused_for_quantized_layers(kind_name):
    model = get_model(Stack(kind_name), VeraConfig(r=4, target_modules=["up"]))
    layer = model.model.up
    with pytest.raises(ValueError, match="fan_in_fan_out=True does not apply"):
        type(layer)(layer.base_layer, model.projections, fan_in_fan_out=True)


# ---------------------------------------------------------------------------------------------------------
# Forward and gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind_name", ALL)
def test_adapted_output_is_the_base_layers_own_output_plus_the_exact_vera_term(kind_name, mode):
    model = adapted(kind_name)
    model.train(mode == "train")
    for _, layer in model.vera_layers():
        x = layer_input(layer)
        with torch.no_grad():
            output, base = layer(x), layer.base_layer(x)
        term, term_bound = reference_adapter_term(x, layer, model)
        assert_within(output - base, term, term_bound + 2 * U32 * (output.abs() + base.abs()))


@pytest.mark.parametrize("kind_name", FP32)
def test_whole_layer_is_the_reference_on_the_dequantized_weight(kind_name):
    model = adapted(kind_name)
    for _, layer in model.vera_layers():
        x = layer_input(layer)
        with torch.no_grad():
            output = layer(x)
        weight, bias = layer.get_base_weight().float(), bias_of(layer)
        expected = ref.vera_forward(x, weight, bias, *vera_terms(layer, model))
        _, term_bound = reference_adapter_term(x, layer, model)
        assert_within(output, expected, matmul_bound(x, weight, bias) + term_bound + U32 * output.abs())


def reference_gradients(model: VeraModel, x: torch.Tensor, upstream: torch.Tensor, absolute: bool = False):
    """Gradients of Σ upstream ⊙ Stack(x) w.r.t. x and the lambdas, by the reference on the dequantized
    weights; with `absolute`, every input replaced by its absolute value (tanh' by 1): Σ|terms|."""
    x = (x.abs() if absolute else x).clone().requires_grad_()
    lambdas, h = {}, x
    for name in ("up", "mid", "down"):
        module = getattr(model.model, name)
        weight = dequantized(module)
        bias = bias_of(module) if isinstance(module, VeraLinear) else module.bias.detach().float()
        if absolute:
            weight, bias = weight.abs(), bias.abs()
        if isinstance(module, VeraLinear):
            A_s, B_s, lambda_d, lambda_b = vera_terms(module, model)
            if absolute:
                A_s, B_s, lambda_d, lambda_b = (t.abs() for t in (A_s, B_s, lambda_d, lambda_b))
            lambda_d, lambda_b = lambda_d.clone().requires_grad_(), lambda_b.clone().requires_grad_()
            lambdas[name] = (lambda_d, lambda_b)
            h = ref.vera_forward(h, weight, bias, A_s, B_s, lambda_d, lambda_b)
        else:
            h = nn.functional.linear(h, weight, bias)
        if name != "down":
            h = h if absolute else torch.tanh(h)
    (h * (upstream.abs() if absolute else upstream)).sum().backward()
    return x.grad, {name: (d.grad, b.grad) for name, (d, b) in lambdas.items()}


@pytest.mark.parametrize("kind_name", FP32)
def test_gradients_of_the_lambdas_and_the_input_are_the_references_on_the_dequantized_weights(kind_name):
    model = adapted(kind_name).train()
    x = layer_input(model.model.up).requires_grad_()
    upstream = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    (model(x) * upstream).sum().backward()
    expected_x, expected = reference_gradients(model, x.detach(), upstream)
    magnitude_x, magnitude = reference_gradients(model, x.detach(), upstream, absolute=True)
    tolerance = 3 * (256 + 128 + 6) * U32
    assert_within(x.grad, expected_x, tolerance * magnitude_x)
    for name, layer in model.vera_layers():
        for got, want, size in zip(
            (layer.vera_lambda_d["default"].grad, layer.vera_lambda_b["default"].grad),
            expected[name],
            magnitude[name],
            strict=True,
        ):
            assert got.abs().max() > 0
            assert_within(got, want, tolerance * size)


@pytest.mark.parametrize("kind_name", FORWARD_ONLY)
def test_lambda_gradients_over_a_forward_only_base_are_the_references(kind_name):
    # d(Σ G ⊙ y)/dλ of the last layer depends on its input and G only: exact whatever the fp16 base.
    model = adapted(kind_name).train()
    layer = model.model.down
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    (layer(x) * upstream).sum().backward()
    A_s, B_s, lambda_d, lambda_b = vera_terms(layer, model)
    d, b = lambda_d.clone().requires_grad_(), lambda_b.clone().requires_grad_()
    zero = torch.zeros(32, 128)
    (ref.vera_forward(x, zero, None, A_s, B_s, d, b) * upstream).sum().backward()
    size_d, size_b = d.abs().detach().clone().requires_grad_(), b.abs().detach().clone().requires_grad_()
    (
        ref.vera_forward(x.abs(), zero, None, A_s.abs(), B_s.abs(), size_d, size_b) * upstream.abs()
    ).sum().backward()
    tolerance = (128 + 32 + 6) * U32
    assert_within(layer.vera_lambda_d["default"].grad, d.grad, tolerance * size_d.grad)
    assert_within(layer.vera_lambda_b["default"].grad, b.grad, tolerance * size_b.grad)


@pytest.mark.parametrize("kind_name", ALL)
def test_training_changes_only_the_lambdas_and_lowers_the_loss(kind_name):
    model = adapted(kind_name)
    before = {name: dequantized(module).clone() for name, module in model.model.named_children()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.Adam(trainable, lr=2e-2)
    generator = torch.Generator().manual_seed(6)
    x, target = torch.randn(16, 256, generator=generator), torch.randn(16, 32, generator=generator)
    losses = []
    for _ in range(10):
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, module in model.model.named_children():
        assert torch.equal(dequantized(module), before[name])


# ---------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------


def scheme_step(kind_name: str, layer: VeraLinear, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, distance outside the grid's span) for each element of `weight` as the layer's scheme quantizes
    it (see the module docstring)."""
    out_features, in_features = weight.shape

    def per_group(values: torch.Tensor, group: int) -> torch.Tensor:
        return values.repeat_interleave(group, -1)

    if kind_name in ("torchao-int8", "quanto-qint8"):
        levels = 127.5 if kind_name.startswith("torchao") else 127.0
        return (weight.abs().amax(-1, keepdim=True) / levels).expand_as(weight), torch.zeros_like(weight)
    if kind_name == "torchao-intx4":
        groups = weight.reshape(out_features, -1, 32)
        return per_group(groups.abs().amax(-1) / 7.5, 32), torch.zeros_like(weight)
    if kind_name == "quanto-qint4":
        group = layer.base_layer.weight_group_size or in_features
        groups = weight.reshape(out_features, -1, group)
        return per_group((groups.amax(-1) - groups.amin(-1)) / 15, group), torch.zeros_like(weight)
    if kind_name.startswith("hqq"):
        meta = layer.base_layer.meta
        group, top = meta["group_size"], 2 ** meta["nbits"] - 1
        groups = weight.reshape(-1, group)
        step = ((groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / top).expand_as(groups)
        zero = meta["zero"].float().reshape(-1, 1)
        low, high = -zero * step, (top - zero) * step
        outside = (low - groups).clamp(min=0) + (groups - high).clamp(min=0)
        return step.reshape(weight.shape), outside.reshape(weight.shape)
    raise AssertionError(f"no scheme for {kind_name}")


def requantization_error(kind_name: str, layer: VeraLinear, weight: torch.Tensor) -> torch.Tensor:
    """Half a step (or the clamping distance), plus float32 roundings of scaling and dequantizing (8 u32 of
    |w| + step + |grid end|, the grid's end bounding the terms a point is computed from)."""
    step, outside = scheme_step(kind_name, layer, weight)
    return torch.maximum(step / 2, outside) + 8 * U32 * (weight.abs() + 2**8 * step)


@pytest.mark.fault(
    "numerics",
    "merging into a torchao, quanto or HQQ weight (requantization rounds)",
    "UserWarning; the merged weight is within one requantization of W̃ + ΔW, unmerging within two",
)
@pytest.mark.parametrize("kind_name", MERGEABLE)
def test_merge_writes_the_delta_within_one_requantization_and_unmerge_within_two(kind_name):
    model = adapted(kind_name).eval()
    originals = {name: layer.get_base_weight().float().clone() for name, layer in model.vera_layers()}
    deltas = {name: layer.delta_weight("default") for name, layer in model.vera_layers()}
    inputs = {name: layer_input(layer) for name, layer in model.vera_layers()}
    with torch.no_grad():
        unmerged = {name: layer(inputs[name]) for name, layer in model.vera_layers()}
    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    merged, merge_errors = {}, {}
    for name, layer in model.vera_layers():
        target = originals[name] + deltas[name]
        merge_error = merge_errors[name] = requantization_error(kind_name, layer, target)
        merged[name] = layer.get_base_weight().float().clone()
        assert_within(merged[name], target, merge_error)
        # y_m - y_u = x (Q(W') - W')ᵀ, plus the roundings of both forwards, of the adapter term, and of W'
        # itself (ΔW formed in float32 through r products, then added to W̃)
        x = inputs[name]
        with torch.no_grad():
            output = layer(x)
        _, term_bound = reference_adapter_term(x, layer, model)
        A_s, B_s, lambda_d, lambda_b = vera_terms(layer, model)
        delta_size = (lambda_b.abs()[:, None] * B_s.abs()) @ (lambda_d.abs()[:, None] * A_s.abs())
        target_error = merge_error + (layer.r["default"] + 3) * U32 * delta_size + U32 * target.abs()
        bias = bias_of(layer)
        bound = x.abs() @ target_error.T + matmul_bound(x, merged[name], bias)
        assert_within(output, unmerged[name], bound + matmul_bound(x, originals[name], bias) + term_bound)
    model.unmerge_adapter()
    for name, layer in model.vera_layers():
        # Q(Q(W') - ΔW) - W̃ = [Q(Q(W') - ΔW) - (Q(W') - ΔW)] + [Q(W') - W']
        unmerge_error = requantization_error(kind_name, layer, merged[name] - deltas[name])
        assert not layer.merged
        assert_within(
            layer.get_base_weight(),
            originals[name],
            merge_errors[name] + unmerge_error + 2 * U32 * merged[name].abs(),
        )


@pytest.mark.parametrize("kind_name", MERGEABLE)
def test_merge_keeps_the_layer_type_and_merge_and_unload_returns_the_quantized_base(kind_name):
    model = adapted(kind_name)
    base_type = type(model.model.up.base_layer)
    weight_type = type(getattr(model.model.up.base_layer, "weight", None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merged = model.merge_and_unload()
    assert type(merged.up) is base_type and type(getattr(merged.up, "weight", None)) is weight_type
    assert not any(isinstance(m, VeraLinear) for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())


@pytest.mark.fault(
    "model",
    "merging into a GPTQ or AWQ layer",
    "MergeNotSupportedError before any weight changes (as PEFT); the adapter keeps working unmerged",
)
@pytest.mark.parametrize("kind_name", FORWARD_ONLY)
def test_merge_into_a_forward_only_base_is_refused_before_anything_changes(kind_name):
    model = adapted(kind_name)
    x = layer_input(model.model.up)
    with torch.no_grad():
        before = model(x)
    buffers = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(MergeNotSupportedError, match="cannot merge into a .* nothing was merged"):
            merge()
    assert model.merged_adapters == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, buffers[name]), name
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert isinstance(model.unload().up, type(model.model.up))  # unload (no merge) still works
