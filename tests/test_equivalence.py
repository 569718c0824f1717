"""Equivalence: veralab.fast against veralab.reference (the ground truth) and against PEFT.

Outputs and the gradients of both lambdas (and of the input) are compared with non-zero lambdas, over odd
shapes, ranks from 1 to larger than the layer, 2-D and 3-D inputs, with and without bias, and dtypes.
"""

import copy
import warnings

import peft
import pytest
import torch
from helpers import TINY_MODELS, output_tensor, randomize_lambdas, token_batch
from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import VeraLinear, get_model
from veralab.fast.projections import SharedProjections

SHAPES = [(7, 5), (13, 3), (4, 17), (1, 1), (33, 31)]  # (out, in)
RANKS = [1, 7, 256]  # 256 is larger than every layer here


def fast_and_reference(out_features, in_features, r, bias=True, dtype=torch.float32, conv1d=False, seed=0):
    """The same layer, lambdas and shared projections in veralab.fast and in the reference."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=bias)
    projections = SharedProjections.create(r, in_features + 3, out_features + 2, prng_key=seed)
    shared = ref.SharedProjections(projections.vera_A, projections.vera_B)
    ref_layer = ref.VeraLinear(copy.deepcopy(base), shared, init_weights=False)
    if conv1d:
        fast_base = Conv1D(out_features, in_features)
        fast_base.weight.data.copy_(base.weight.data.T)
        fast_base.bias.data.copy_(base.bias.data)
    else:
        fast_base = copy.deepcopy(base)
    fast = VeraLinear(fast_base.to(dtype), projections, fan_in_fan_out=conv1d)
    fast.update_layer("default", VeraConfig(r=r, init_weights=False))
    fast.set_adapter(["default"])
    with torch.no_grad():
        fast.vera_lambda_d["default"].copy_(ref_layer.vera_lambda_d)
        fast.vera_lambda_b["default"].copy_(ref_layer.vera_lambda_b)
    return fast, ref_layer


def lambda_grads(layer_fast, layer_ref):
    return (
        (layer_fast.vera_lambda_d["default"].grad, layer_ref.vera_lambda_d.grad),
        (layer_fast.vera_lambda_b["default"].grad, layer_ref.vera_lambda_b.grad),
    )


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("input_shape", [(6,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_layer_equals_reference_fp32(out_features, in_features, r, input_shape, bias):
    fast, reference = fast_and_reference(out_features, in_features, r, bias=bias)
    x = torch.randn(*input_shape, in_features)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_ref = fast(x_fast), reference(x_ref)
    torch.testing.assert_close(y_fast, y_ref)
    upstream = torch.randn_like(y_ref)
    y_fast.backward(upstream)
    y_ref.backward(upstream)
    for got, expected in lambda_grads(fast, reference):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x_fast.grad, x_ref.grad)


@pytest.mark.parametrize("out_features, in_features", [(7, 5), (33, 31)])
def test_conv1d_layer_equals_reference(out_features, in_features):
    fast, reference = fast_and_reference(out_features, in_features, r=9, conv1d=True)
    x = torch.randn(3, 4, in_features)
    torch.testing.assert_close(fast(x), reference(x))
    torch.testing.assert_close(fast.delta_weight("default"), reference.delta_weight().detach())


def max_error(got, expected):
    return (got.double() - expected.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_features, in_features", [(33, 31), (13, 3)])
@pytest.mark.parametrize("r", [7, 256])
def test_half_precision_error_bounded_by_torch_own_error(dtype, out_features, in_features, r):
    """In bf16/fp16 the fast layer stays within 2x the error plain PyTorch makes in that dtype (fp32 reference
    as the truth), plus one unit in the last place of the output's magnitude."""
    fast, reference = fast_and_reference(out_features, in_features, r)
    fast.base_layer.to(dtype)
    x = torch.randn(4, 5, in_features)
    truth = reference(x)
    # PyTorch's own error: the reference formula evaluated with every tensor in `dtype`.
    torch_low = ref.vera_forward(
        x.to(dtype),
        reference.base_layer.weight.to(dtype),
        reference.base_layer.bias.to(dtype),
        reference.projections.vera_A.to(dtype),
        reference.projections.vera_B.to(dtype),
        reference.vera_lambda_d.to(dtype),
        reference.vera_lambda_b.to(dtype),
    )
    y = fast(x.to(dtype))
    assert y.dtype == dtype
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    assert max_error(y, truth) <= 2 * max_error(torch_low, truth) + ulp


def test_autocast_output_dtype_follows_input_and_stays_close():
    fast, reference = fast_and_reference(33, 31, r=16)
    x = torch.randn(4, 31)
    truth = reference(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
        torch_autocast = reference(x)  # PyTorch's own error under the same autocast
    assert y.dtype == torch.float32
    ulp = torch.finfo(torch.bfloat16).eps * truth.abs().max().item()
    assert max_error(y, truth) <= 2 * max_error(torch_autocast, truth) + ulp


# ------------------------------------------------------------------ whole models against PEFT


def peft_and_fast(model_name, config_kwargs):
    base = TINY_MODELS[model_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**config_kwargs))
        ours = get_model(copy.deepcopy(base), VeraConfig(**config_kwargs))
    randomize_lambdas(ours)
    # copy our lambdas into PEFT's model (same parameter names after PEFT's "base_model." prefix)
    ours_state = ours.state_dict()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "vera_lambda_" in name:
                param.copy_(ours_state[name.removeprefix("base_model.")])
    return theirs, ours


MODEL_CONFIGS = [
    (
        "llama",
        {
            "r": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
    ),
    ("llama", {"r": 300, "target_modules": None}),  # PEFT's default targets; r larger than every layer
    ("opt", {"r": 8, "target_modules": ["q_proj", "v_proj", "fc1", "fc2"], "projection_prng_key": 5}),
    ("gpt2", {"r": 12, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    ("bert", {"r": 8, "target_modules": ["query", "value", "dense"]}),
    ("roberta", {"r": 4, "target_modules": None}),
]


@pytest.mark.parametrize(
    "model_name, config_kwargs", MODEL_CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(MODEL_CONFIGS)]
)
def test_model_matches_peft(model_name, config_kwargs):
    theirs, ours = peft_and_fast(model_name, config_kwargs)
    assert torch.equal(ours.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.vera_B, theirs.base_model.vera_B["default"])
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.eval()
    ours.eval()
    ids = token_batch()
    y_theirs, y_ours = output_tensor(theirs(ids)), output_tensor(ours(ids))
    torch.testing.assert_close(y_ours, y_theirs)
    upstream = torch.randn_like(y_theirs)
    y_theirs.backward(upstream)
    y_ours.backward(upstream)
    grads_theirs = {
        n.removeprefix("base_model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad
    }
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_theirs.keys()
    for name, grad in grads_ours.items():
        torch.testing.assert_close(grad, grads_theirs[name], msg=name)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_merged_model_matches_peft_merged(model_name):
    kwargs = {"r": 8, "target_modules": ["q_proj", "v_proj"] if model_name == "llama" else ["c_attn"]}
    theirs, ours = peft_and_fast(model_name, kwargs)
    ids = token_batch()
    merged_theirs = theirs.merge_and_unload().eval()
    merged_ours = ours.merge_and_unload().eval()
    assert type(merged_ours) is type(merged_theirs)
    torch.testing.assert_close(merged_ours(ids).logits, merged_theirs(ids).logits)
