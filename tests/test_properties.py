"""Properties over random layer shapes, ranks, batch shapes and dtypes (hypothesis)."""

import copy
import math
import tempfile
import warnings

import pytest
import torch
from helpers import tiny_llama, token_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import VeraLinear, VeraModel, get_model
from veralab.fast.projections import SharedProjections

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

dims = st.integers(min_value=1, max_value=40)
ranks = st.integers(min_value=1, max_value=64)
batch_shapes = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3)


def build(out_features, in_features, r, bias, conv1d, seed, extra_in=2, extra_out=3):
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias)
    projections = SharedProjections.create(r, in_features + extra_in, out_features + extra_out, prng_key=seed)
    shared = ref.SharedProjections(projections.vera_A, projections.vera_B)
    reference = ref.VeraLinear(copy.deepcopy(base), shared, init_weights=False)
    if conv1d:
        fast_base = Conv1D(out_features, in_features)
        with torch.no_grad():
            fast_base.weight.copy_(base.weight.T)
            fast_base.bias.copy_(base.bias if bias else torch.zeros(out_features))
        if not bias:
            reference.base_layer.bias = None
    else:
        fast_base = copy.deepcopy(base)
    fast = VeraLinear(fast_base, projections, fan_in_fan_out=conv1d)
    fast.update_layer("default", VeraConfig(r=r, init_weights=False))
    fast.set_adapter(["default"])
    with torch.no_grad():
        fast.vera_lambda_d["default"].copy_(reference.vera_lambda_d)
        fast.vera_lambda_b["default"].copy_(reference.vera_lambda_b)
    return fast, reference


@SETTINGS
@given(
    out_features=dims,
    in_features=dims,
    r=ranks,
    batch_shape=batch_shapes,
    bias=st.booleans(),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_equals_reference_outputs_and_gradients(
    out_features, in_features, r, batch_shape, bias, conv1d, seed
):
    fast, reference = build(out_features, in_features, r, bias, conv1d, seed)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_ref = fast(x_fast), reference(x_ref)
    torch.testing.assert_close(y_fast, y_ref)
    upstream = torch.randn_like(y_ref)
    y_fast.backward(upstream)
    y_ref.backward(upstream)
    torch.testing.assert_close(fast.vera_lambda_d["default"].grad, reference.vera_lambda_d.grad)
    torch.testing.assert_close(fast.vera_lambda_b["default"].grad, reference.vera_lambda_b.grad)
    torch.testing.assert_close(x_fast.grad, x_ref.grad)


@SETTINGS
@given(
    out_features=dims,
    in_features=dims,
    r=ranks,
    batch_shape=batch_shapes,
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_half_precision_within_twice_torch_error(out_features, in_features, r, batch_shape, dtype, seed):
    fast, reference = build(out_features, in_features, r, True, False, seed)
    fast.base_layer.to(dtype)
    x = torch.randn(*batch_shape, in_features, generator=torch.Generator().manual_seed(seed))
    truth = reference(x).detach().double()
    shared = reference.projections
    low = [
        t.to(dtype)
        for t in (
            x,
            reference.base_layer.weight,
            reference.base_layer.bias,
            shared.vera_A,
            shared.vera_B,
            reference.vera_lambda_d,
            reference.vera_lambda_b,
        )
    ]
    torch_error = (ref.vera_forward(*low).double() - truth).abs().max().item()
    y = fast(x.to(dtype))
    assert y.dtype == dtype
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    assert (y.detach().double() - truth).abs().max().item() <= 2 * torch_error + ulp


@SETTINGS
@given(out_features=dims, in_features=dims, r=ranks, conv1d=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_then_unmerge_restores_weight(out_features, in_features, r, conv1d, seed):
    fast, _ = build(out_features, in_features, r, True, conv1d, seed)
    original = fast.get_base_weight().clone()
    delta = fast.delta_weight("default")
    fast.merge()
    torch.testing.assert_close(fast.get_base_weight(), (original + delta))
    fast.unmerge()
    # two float32 roundings, each of a value no larger than |W| + |ΔW|
    bound = 2 * torch.finfo(torch.float32).eps * (original.abs() + delta.abs())
    assert torch.all((fast.get_base_weight() - original).abs() <= bound)


@SETTINGS
@given(out_features=dims, in_features=dims, r=ranks, batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_merged_forward_equals_unmerged(out_features, in_features, r, batch, seed):
    fast, _ = build(out_features, in_features, r, True, False, seed)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        unmerged = fast(x)
        fast.merge()
        merged = fast(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


@pytest.mark.fault(
    "numerics",
    "100 training steps at lr 2e-2 with dropout, fp32 and bf16",
    "loss and lambdas stay finite and the loss goes down",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_training_stays_finite(dtype):
    """100 AdamW steps at VeRA's usual (high) learning rate on a tiny Llama: loss and lambdas stay finite."""
    model = get_model(tiny_llama().to(dtype), VeraConfig(r=16, target_modules="all-linear", vera_dropout=0.1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = token_batch(batch=4, seq=8)
    model.train()
    losses = []
    for _ in range(100):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "vera_lambda_" in n)
    assert losses[-1] < losses[0]


@settings(max_examples=15, deadline=None, derandomize=True)
@pytest.mark.fault(
    "numerics",
    "save then load, for random layer shapes, ranks and both save_projection settings",
    "outputs restored bit for bit",
)
@given(
    shapes=st.lists(st.tuples(dims, dims), min_size=1, max_size=3),
    r=ranks,
    save_projection=st.booleans(),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_save_then_load_restores_outputs(shapes, r, save_projection, batch, seed):
    torch.manual_seed(seed)
    layers = {
        f"layer{i}": nn.Linear(in_features, out_features)
        for i, (out_features, in_features) in enumerate(shapes)
    }

    class Parallel(nn.Module):  # layers of unrelated shapes side by side: every one reads its own input
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict(copy.deepcopy(layers))

        def forward(self, inputs):
            return [self.layers[name](x) for name, x in zip(self.layers, inputs, strict=True)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = VeraConfig(
            r=r, target_modules=list(layers), save_projection=save_projection, init_weights=False
        )
        model = get_model(Parallel(), config, adapter_name="default")
    inputs = [torch.randn(batch, layer.in_features) for layer in layers.values()]
    with torch.no_grad():
        expected = model(inputs)
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
        loaded = VeraModel.from_pretrained(Parallel(), directory)
    with torch.no_grad():
        for got, want in zip(loaded(inputs), expected, strict=True):
            assert torch.equal(got, want)
