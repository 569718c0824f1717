"""VeRA over bitsandbytes Linear8bitLt / Linear4bit (veralab.fast.backends.bnb), checked against the reference
path.

The base is approximate (quantized), the adapter is exact: the adapter term must equal the reference's to fp32
rounding, while whole-layer outputs and merged weights are compared within bounds derived from the
quantization scheme (int8 row-wise absmax: rounding <= scale/2 = rowmax/254; 4-bit blockwise: half the largest
gap between adjacent code values times the block's absmax) and from the rounding of each dtype
(|fl(Σ) - Σ| <= n u Σ|terms|, u the unit roundoff).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from helpers import (  # noqa: E402
    eval_loss,
    lm_batch,
    randomize_lambdas,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    train_lambdas,
)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from veralab import VeraConfig  # noqa: E402
from veralab import reference as ref  # noqa: E402
from veralab.fast import VeraLinear, VeraModel, get_model  # noqa: E402
from veralab.fast.backends.bnb import Linear4bit, Linear8bitLt, keep_standard_layouts  # noqa: E402
from veralab.fast.projections import SharedProjections  # noqa: E402

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_GPU)]
U32 = torch.finfo(torch.float32).eps / 2


# ---------------------------------------------------------------------------------------------------------
# Quantized base layers
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quant:
    """One bitsandbytes configuration of a base layer."""

    name: str
    bits: int
    quant_type: str = ""
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    has_fp16_weights: bool = False

    def __str__(self) -> str:
        return self.name


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
INT8 = Quant("int8", 8)
FOUR_BIT = [
    Quant(f"{quant_type}{'-dq' if double else ''}-{DTYPE_NAMES[dtype]}", 4, quant_type, double, dtype)
    for quant_type in ("nf4", "fp4")
    for double in (False, True)
    for dtype in DTYPE_NAMES
]
ALL_QUANTS = [INT8, Quant("int8-fp16-weights", 8, has_fp16_weights=True), *FOUR_BIT]
# One of each kind, for the slower tests.
MAIN_QUANTS = [INT8, Quant("nf4-dq-fp32", 4, "nf4", True), Quant("fp4-bf16", 4, "fp4", False, torch.bfloat16)]
FP32_QUANTS = [q for q in ALL_QUANTS if q.compute_dtype == torch.float32 and not q.has_fp16_weights]
# Where backprop matches the reference on exact activations: on a GPU, int8 layers quantize x in training too.
EXACT_BACKPROP = [pytest.param(q, "cpu", id=f"{q}-cpu") for q in FP32_QUANTS] + [
    pytest.param(q, "cuda", id=f"{q}-cuda", marks=NEEDS_GPU) for q in FP32_QUANTS if q.bits == 4
]


def quantize(linear: nn.Linear, quant: Quant, device: str) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weights, quantized on `device` (as transformers does)."""
    bias = linear.bias is not None
    if quant.bits == 8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias,
            has_fp16_weights=quant.has_fp16_weights,
            threshold=6.0,
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=quant.compute_dtype,
            compress_statistics=quant.double_quant,
            quant_type=quant.quant_type,
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)


class QuantizedStack(nn.Module):
    """Three quantized layers (in, out) of different shapes: `up` and `down` get adapted (the shared
    projections
    are sliced for them), `mid` stays plain and gradients must flow through it to `up`.

    in_features are even on purpose: for odd ones bitsandbytes' CPU dequantization falls back to a
    torch.compile'd function that recompiles for every shape (seconds each).
    """

    def __init__(self, quant: Quant, device: str, shapes=((38, 54), (54, 42), (42, 29))) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.mid, self.down = (quantize(nn.Linear(i, o), quant, device) for i, o in shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def adapted(quant: Quant, device: str = "cpu", r: int = 6, **kwargs) -> VeraModel:
    """QuantizedStack with `up` and `down` adapted, and non-zero lambdas."""
    model = get_model(QuantizedStack(quant, device, **kwargs), VeraConfig(r=r, target_modules=["up", "down"]))
    randomize_lambdas(model)
    return model


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def accumulation_roundoff(compute_dtype: torch.dtype, device: torch.device) -> float:
    """Matmuls sum their products in fp32, except where PyTorch lets cuBLAS reduce in fp16/bf16."""
    reduced = {
        torch.float16: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        torch.bfloat16: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
    }
    if device.type == "cuda" and reduced.get(compute_dtype, False):
        return unit_roundoff(compute_dtype)
    return U32


# ---------------------------------------------------------------------------------------------------------
# Error bounds, each derived from the scheme it bounds
# ---------------------------------------------------------------------------------------------------------


def activation_error(x: torch.Tensor, quant: Quant) -> torch.Tensor:
    """Elementwise bound on |x̃ - x| for the x̃ the base layer multiplies with.

    8-bit: x may be cast to fp16 (u16 |x|) and quantized row-wise to int8 with scale rowmax/127 (rounding
    <= rowmax/254); 4-bit: x is rounded to the compute dtype.
    """
    if quant.bits == 8:
        u16 = unit_roundoff(torch.float16)
        rowmax = x.abs().amax(-1, keepdim=True) * (1 + u16)
        return u16 * x.abs() + rowmax / 254
    return unit_roundoff(quant.compute_dtype) * x.abs()


def int8_rowwise_error(weight: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |Q(W) - W| for bitsandbytes' int8 quantization: cast to fp16, then round to
    multiples of rowmax/127 (error <= rowmax/254)."""
    u16 = unit_roundoff(torch.float16)
    rowmax = weight.abs().amax(-1, keepdim=True) * (1 + u16)
    return u16 * weight.abs() + rowmax / 254 + 4 * U32 * weight.abs()


def four_bit_error(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Elementwise bound on |Q(W) - W| for the 4-bit weight `layer` now stores for target `weight`.

    Each block of the flattened weight is scaled by its absmax s (so values lie in [-1, 1]) and rounded to the
    nearest code value c: |W - s c| <= s * max_gap / 2. The layer dequantizes with its stored scale s'
    (s' != s under double quantization), adding |s - s'| |c| <= |s - s'|.
    """
    quant_state = layer.weight.quant_state
    blocksize = quant_state.blocksize
    stored = quant_state.absmax.float()
    if quant_state.nested:
        stored = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2).float()
        stored = stored + quant_state.offset
    code = quant_state.code.float().sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    flat = weight.to(quant_state.dtype).float().reshape(-1)
    padded = nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize)
    true_scale = padded.abs().amax(-1)  # (blocks,)
    per_block = true_scale * half_gap + (true_scale - stored).abs()
    per_element = per_block.repeat_interleave(blocksize)[: flat.numel()].view_as(weight)
    dtype_rounding = (
        unit_roundoff(quant_state.dtype) * weight.abs() if quant_state.dtype != torch.float32 else 0
    )
    return per_element * (1 + 4 * U32) + dtype_rounding


def requantization_error(weight: torch.Tensor, layer: nn.Module, quant: Quant) -> torch.Tensor:
    """Elementwise bound on how far the weight `layer` stores is from `weight`, the one it was given."""
    if quant.has_fp16_weights:
        return U32 * weight.abs()  # stored dense (fp32 here); quantized only in the forward
    return int8_rowwise_error(weight) if quant.bits == 8 else four_bit_error(weight, layer)


def forward_weight_error(weight: torch.Tensor, quant: Quant) -> torch.Tensor:
    """Error the base forward adds on the weight it holds: fp16-weight int8 layers quantize it on the fly;
    4-bit layers dequantize it in the compute dtype."""
    if quant.has_fp16_weights:
        return int8_rowwise_error(weight)
    if quant.bits == 4:
        return unit_roundoff(quant.compute_dtype) * weight.abs()
    return torch.zeros_like(weight)


def base_error_bound(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, quant: Quant
) -> torch.Tensor:
    """Bound on |base(x) - (x Wᵀ + b)| for a base layer holding `weight`.

    With x̃ = x + e_x and W̃ = W + e_W what the layer multiplies: x̃ W̃ᵀ - x Wᵀ = x̃ e_Wᵀ + e_x Wᵀ, then the
    products are accumulated in fp32 over `in` terms and the output rounded to the compute dtype.
    """
    delta_x = activation_error(x, quant)
    error_w = forward_weight_error(weight, quant)
    x_hat, w_hat = x.abs() + delta_x, weight.abs() + error_w
    compute_dtype = quant.compute_dtype if quant.bits == 4 else torch.float32
    u_out, u_sum = unit_roundoff(compute_dtype), accumulation_roundoff(compute_dtype, x.device)
    bound = (
        x_hat @ error_w.T + delta_x @ weight.abs().T + (u_out + weight.shape[1] * u_sum) * (x_hat @ w_hat.T)
    )
    if bias is not None:
        bound = bound + 2 * u_out * bias.abs()
    return bound


def vera_terms(layer: VeraLinear, vera_A: torch.Tensor, vera_B: torch.Tensor):
    return (
        *ref.slice_projections(vera_A, vera_B, layer.in_features, layer.out_features),
        layer.vera_lambda_d["default"].detach(),
        layer.vera_lambda_b["default"].detach(),
    )


def reference_adapter_term(
    x: torch.Tensor, layer: VeraLinear, model: VeraModel
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's adapter term in fp32, and its rounding bound: depth in + r, so (in + r) u32
    Σ|terms|."""
    A_s, B_s, lambda_d, lambda_b = vera_terms(layer, model.vera_A.float(), model.vera_B.float())
    zero = torch.zeros(layer.out_features, layer.in_features, device=x.device)
    term = ref.vera_forward(x.float(), zero, None, A_s, B_s, lambda_d, lambda_b)
    magnitude = ref.vera_forward(
        x.float().abs(), zero, None, A_s.abs(), B_s.abs(), lambda_d.abs(), lambda_b.abs()
    )
    return term, (layer.in_features + layer.r["default"] + 2) * U32 * magnitude


def layer_input(layer: VeraLinear, device: str, batch=(3, 5), seed=2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, layer.in_features, generator=generator).to(device)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    excess = (actual.float() - expected.float()).abs() - bound
    assert excess.max() <= 0, (
        f"exceeds its bound by {excess.max().item():.3g} (bound max {bound.max().item():.3g})"
    )


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, VeraLinear) else module


def stored_bytes(module: nn.Module) -> torch.Tensor:
    return base_of(module).weight.data.clone()


# ---------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", [INT8, FOUR_BIT[0]], ids=str)
def test_get_model_picks_the_quantized_layer_for_bitsandbytes_layers(quant):
    model = get_model(QuantizedStack(quant, "cpu"), VeraConfig(r=4, target_modules="all-linear"))
    expected = Linear8bitLt if quant.bits == 8 else Linear4bit
    layers = dict(model.vera_layers())
    assert set(layers) == {"up", "mid", "down"}
    assert all(type(layer) is expected for layer in layers.values())
    # the logical shape, not the packed one
    assert (layers["down"].out_features, layers["down"].in_features) == (29, 42)
    assert model.vera_A.shape == (4, 54) and model.vera_B.shape == (54, 4)


@pytest.mark.fault(
    "model",
    "`fan_in_fan_out=True` on a bitsandbytes layer",
    "ValueError: bitsandbytes stores (out, in); pass False",
)
@pytest.mark.parametrize("quant", [INT8, FOUR_BIT[0]], ids=str)
def test_fan_in_fan_out_is_refused_for_bitsandbytes_layers(quant):
    layer = quantize(nn.Linear(64, 32), quant, "cpu")
    layer_cls = Linear8bitLt if quant.bits == 8 else Linear4bit
    with pytest.raises(ValueError, match=f"fan_in_fan_out=True does not apply to {type(layer).__name__}"):
        layer_cls(layer, SharedProjections.create(4, 64, 32, prng_key=0), fan_in_fan_out=True)


def test_import_veralab_fast_does_not_need_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"  # makes `import bitsandbytes` fail
        "import torch; from torch import nn\nfrom veralab import VeraConfig; from veralab.fast import "
        "get_model\nmodel = get_model(nn.Sequential(nn.Linear(4, 3)), VeraConfig(r=2, "
        "target_modules=['0']))\nassert model(torch.randn(2, 4)).shape == (2, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant", ALL_QUANTS, ids=str)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_adapter_term_is_the_references_and_output_is_within_the_base_error(quant, mode, device):
    model = adapted(quant, device)
    model.train(mode == "train")
    for _, layer in model.vera_layers():
        x = layer_input(layer, device)
        with torch.no_grad():
            output, base = layer(x), layer.base_layer(x)
        term, term_bound = reference_adapter_term(x, layer, model)
        # The adapter is exact over the approximate base: output - base cancels in fp32, add both roundings.
        assert_within(output - base, term, term_bound + 2 * U32 * (output.abs() + base.abs()))
        # The whole layer is the reference on the dequantized weight, within the base's quantization error.
        weight, bias = layer.get_base_weight().float(), layer.base_layer.bias.float()
        A_s, B_s, lambda_d, lambda_b = vera_terms(layer, model.vera_A, model.vera_B)
        expected = ref.vera_forward(x, weight, bias, A_s, B_s, lambda_d, lambda_b)
        assert_within(output, expected, base_error_bound(x, weight, bias, quant) + term_bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant", [INT8, FOUR_BIT[0]], ids=str)
def test_adapter_term_is_computed_in_float32_and_cast_back_for_half_inputs(quant, dtype):
    model = adapted(quant)
    layer = model.model.down
    x = layer_input(layer, "cpu").to(dtype)
    assert layer.adapter_dtype(x) == torch.float32
    with torch.no_grad():
        output, base = layer(x), layer.base_layer(x)
    assert output.dtype == dtype
    expected, bound = reference_adapter_term(x, layer, model)
    # two roundings to `dtype`: the fp32 term cast back, then the sum
    u = unit_roundoff(dtype)
    assert_within(output, base.float() + expected, bound + u * expected.abs() + u * output.float().abs())


@pytest.mark.parametrize("quant", [INT8, FOUR_BIT[0]], ids=str)
def test_mixed_adapter_batch_rows_equal_each_adapter_alone(quant):
    model = adapted(quant).eval()
    model.add_adapter("second", VeraConfig(r=6, target_modules=["up", "down"], init_weights=False))
    x = torch.randn(4, 38, generator=torch.Generator().manual_seed(10))
    names = ["second", "default", "__base__", "second"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(x[row : row + 1])
            else:
                model.set_adapter(name)
                alone = model(x[row : row + 1])
            torch.testing.assert_close(mixed[row : row + 1], alone)


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


def reference_gradients(model: VeraModel, x: torch.Tensor, upstream: torch.Tensor, absolute: bool = False):
    """Gradients of Σ upstream ⊙ QuantizedStack(x) w.r.t. x and each adapted layer's lambdas, computed by the
    reference on the dequantized weights. With `absolute`, every input is replaced by its absolute value
    (and tanh' by its bound 1): the sums of |terms|, for the rounding bound."""
    modules = model.model
    x = (x.abs() if absolute else x).clone().requires_grad_()
    lambdas = {}
    h = x
    for name in ("up", "mid", "down"):
        module = getattr(modules, name)
        if isinstance(module, VeraLinear):
            A_s, B_s, lambda_d, lambda_b = vera_terms(module, model.vera_A, model.vera_B)
            weight, bias = module.get_base_weight().float(), module.base_layer.bias.float()
            if absolute:
                A_s, B_s, lambda_d, lambda_b, weight, bias = (
                    t.abs() for t in (A_s, B_s, lambda_d, lambda_b, weight, bias)
                )
            lambda_d, lambda_b = lambda_d.clone().requires_grad_(), lambda_b.clone().requires_grad_()
            lambdas[name] = (lambda_d, lambda_b)
            h = ref.vera_forward(h, weight, bias, A_s, B_s, lambda_d, lambda_b)
        else:
            weight = bnb_dequantized(module)
            h = nn.functional.linear(
                h, weight.abs() if absolute else weight, module.bias.abs() if absolute else module.bias
            )
        if name != "down":
            h = h if absolute else torch.tanh(h)
    (h * (upstream.abs() if absolute else upstream)).sum().backward()
    return x.grad, {name: (d.grad, b.grad) for name, (d, b) in lambdas.items()}


def bnb_dequantized(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    scale = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scale)


def train_gradients(model: VeraModel, x: torch.Tensor, upstream: torch.Tensor):
    model.train()
    x = x.clone().requires_grad_()
    model.zero_grad()
    (model(x) * upstream).sum().backward()
    layers = dict(model.vera_layers())
    return x.grad, {
        n: (lay.vera_lambda_d["default"].grad, lay.vera_lambda_b["default"].grad) for n, lay in layers.items()
    }


def assert_gradients_match_the_reference(model: VeraModel, x: torch.Tensor, upstream: torch.Tensor) -> None:
    grad_x, grad_lambdas = train_gradients(model, x, upstream)
    expected_x, expected_lambdas = reference_gradients(model, x, upstream)
    magnitude_x, magnitude_lambdas = reference_gradients(model, x, upstream, absolute=True)
    # backprop depth: 3 layers of at most (in + out + r) terms each
    r, max_in, max_out = model.vera_A.shape[0], model.vera_A.shape[1], model.vera_B.shape[0]
    tolerance = 3 * (max_in + max_out + r) * U32
    assert_within(grad_x, expected_x, tolerance * magnitude_x)
    for name, (grad_d, grad_b) in grad_lambdas.items():
        assert grad_d.abs().max() > 0 and grad_b.abs().max() > 0
        assert_within(grad_d, expected_lambdas[name][0], tolerance * magnitude_lambdas[name][0])
        assert_within(grad_b, expected_lambdas[name][1], tolerance * magnitude_lambdas[name][1])


@pytest.mark.parametrize(("quant", "device"), EXACT_BACKPROP)
def test_gradients_reach_the_lambdas_and_the_input_and_match_the_reference(quant, device):
    model = adapted(quant, device)
    x = layer_input(model.model.up, device)
    upstream = torch.randn(3, 5, 29, generator=torch.Generator().manual_seed(3)).to(device)
    assert_gradients_match_the_reference(model, x, upstream)


@pytest.mark.parametrize("quant", MAIN_QUANTS, ids=str)
def test_base_stays_frozen_while_the_lambdas_train(quant):
    model = adapted(quant)
    before = {name: stored_bytes(module) for name, module in model.model.named_children()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    x = layer_input(model.model.up, "cpu")
    model(x).square().mean().backward()
    optimizer.step()
    for name, module in model.model.named_children():
        base = base_of(module)
        assert base.weight.grad is None and not base.weight.requires_grad
        assert torch.equal(base.weight.data, before[name])


@pytest.mark.parametrize("quant", [INT8, FOUR_BIT[3]], ids=str)
def test_bitsandbytes_8bit_optimizer_trains_the_lambdas(quant):
    model = adapted(quant, shapes=((38, 300), (300, 300), (300, 29)))  # λ_b of `up`: 300 entries
    trainable = [p for p in model.parameters() if p.requires_grad]
    # min_8bit_size: the default (4096) would keep 32-bit states for these lambdas
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-2, min_8bit_size=256)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(16, 38, generator=generator)
    with torch.no_grad():  # a reachable target: the same model with other lambdas
        shifts = [0.2 * torch.randn(p.shape, generator=generator) for p in trainable]
        for p, shift in zip(trainable, shifts, strict=True):
            p.add_(shift)
        target = model(x)
        for p, shift in zip(trainable, shifts, strict=True):
            p.sub_(shift)
    losses = []
    for _ in range(15):
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    lambda_b_up = model.model.up.vera_lambda_b["default"]
    assert optimizer.state[lambda_b_up]["state1"].dtype == torch.uint8  # really an 8-bit state
    assert optimizer.state[lambda_b_up]["state2"].dtype == torch.uint8


# ---------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.fault(
    "numerics",
    "merging into an 8-bit or 4-bit bitsandbytes weight (requantization rounds)",
    "UserWarning; merged outputs stay within the bound derived from the quantization scheme",
)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant", ALL_QUANTS, ids=str)
def test_merged_output_matches_unmerged_within_the_requantization_error(quant, device):
    model = adapted(quant, device).eval()
    inputs = {name: layer_input(layer, device) for name, layer in model.vera_layers()}
    with torch.no_grad():
        unmerged = {name: layer(inputs[name]) for name, layer in model.vera_layers()}
        with model.disable_adapter():
            base = {name: layer(inputs[name]) for name, layer in model.vera_layers()}
    targets = {
        name: layer.get_base_weight().float() + layer.delta_weight("default")
        for name, layer in model.vera_layers()
    }
    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    for name, layer in model.vera_layers():
        x, target = inputs[name], targets[name]
        with torch.no_grad():
            merged = layer(x)
        delta_w = layer.delta_weight("default")
        # y_m - y_u = x̃ (Q(W') - W')ᵀ + (x̃ - x) ΔWᵀ, plus the rounding of each forward
        delta_x = activation_error(x, quant)
        error_w = requantization_error(target, layer.base_layer, quant)
        bias = layer.base_layer.bias.float()
        _, adapter_bound = reference_adapter_term(x, layer, model)
        bound = (
            (x.abs() + delta_x) @ error_w.T
            + delta_x @ delta_w.abs().T
            + base_error_bound(x, target, bias, quant)
            + base_error_bound(x, target - delta_w, bias, quant)
            + adapter_bound
        )
        assert_within(merged, unmerged[name], bound)
        # ...and the merge did move the output: it is closer to the adapted output than the base is
        assert (merged - unmerged[name]).abs().max() < (base[name] - unmerged[name]).abs().max()


@pytest.mark.parametrize("quant", ALL_QUANTS, ids=str)
def test_merge_requantizes_with_the_same_settings(quant):
    model = adapted(quant)
    layer = model.model.down
    base = layer.base_layer
    if quant.bits == 4:
        old_state = base.weight.quant_state
        settings = (
            old_state.quant_type,
            old_state.blocksize,
            old_state.nested,
            old_state.dtype,
            base.weight.dtype,
        )
    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    assert layer.base_layer is base and isinstance(
        base, bnb.nn.Linear4bit if quant.bits == 4 else bnb.nn.Linear8bitLt
    )
    if quant.bits == 8:
        assert isinstance(base.weight, bnb.nn.Int8Params) and not base.weight.requires_grad
        assert base.weight.dtype == (torch.float32 if quant.has_fp16_weights else torch.int8)
        return
    new_state = base.weight.quant_state
    assert isinstance(base.weight, bnb.nn.Params4bit) and not base.weight.requires_grad
    assert (
        new_state.quant_type,
        new_state.blocksize,
        new_state.nested,
        new_state.dtype,
        base.weight.dtype,
    ) == settings
    assert base.quant_state is new_state and base.compute_dtype == quant.compute_dtype


@pytest.mark.parametrize("quant", ALL_QUANTS, ids=str)
def test_merge_then_unmerge_restores_the_weight_within_two_requantizations(quant):
    model = adapted(quant)
    layer = model.model.up
    original = layer.get_base_weight().float()
    delta_w = layer.delta_weight("default")
    with pytest.warns(UserWarning):
        model.merge_adapter()
    merge_error = requantization_error(original + delta_w, layer.base_layer, quant)
    merged = layer.get_base_weight().float()
    model.unmerge_adapter()
    unmerge_error = requantization_error(merged - delta_w, layer.base_layer, quant)
    assert not layer.merged
    assert_within(layer.get_base_weight(), original, merge_error + unmerge_error)


@pytest.mark.parametrize("quant", MAIN_QUANTS, ids=str)
def test_get_delta_weight_is_the_references(quant):
    model = adapted(quant)
    for _, layer in model.vera_layers():
        A_s, B_s, lambda_d, lambda_b = vera_terms(layer, model.vera_A, model.vera_B)
        expected = ref.delta_weight(
            model.vera_A, model.vera_B, lambda_d, lambda_b, layer.in_features, layer.out_features
        )
        magnitude = ref.delta_weight(
            model.vera_A.abs(),
            model.vera_B.abs(),
            lambda_d.abs(),
            lambda_b.abs(),
            layer.in_features,
            layer.out_features,
        )
        assert_within(layer.delta_weight("default"), expected, (layer.r["default"] + 2) * U32 * magnitude)


@pytest.mark.fault(
    "model",
    "NaN/inf lambdas merged into a bitsandbytes layer with `safe_merge=True`",
    "ValueError before requantizing; the quantized weights are untouched",
)
@pytest.mark.parametrize("quant", MAIN_QUANTS, ids=str)
def test_safe_merge_refuses_non_finite_weights_and_leaves_them_untouched(quant):
    model = adapted(quant)
    before = {name: stored_bytes(layer) for name, layer in model.vera_layers()}
    model.model.down.vera_lambda_b["default"].data[3] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    for name, layer in model.vera_layers():
        assert not layer.merged and torch.equal(layer.base_layer.weight.data, before[name])


# ---------------------------------------------------------------------------------------------------------
# The AVX-512 bf16 repacking pitfall (docs/design.md, environment)
# ---------------------------------------------------------------------------------------------------------

# out a multiple of 32, in of the block size: shapes bitsandbytes repacks
REPACKABLE = ((128, 64), (64, 128), (128, 64))
HAS_AVX512_BF16 = bnb.functional.has_avx512bf16()


def is_repacked(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


@pytest.mark.fault(
    "numerics",
    "4-bit model run in eval without grad (AVX-512 bf16 CPU repacking), then trained",
    "repacking kept off: gradients equal those of training alone",
)
@pytest.mark.parametrize("quant", [FOUR_BIT[0], FOUR_BIT[4]], ids=str)
def test_eval_without_grad_then_training_gives_the_same_gradients_as_training_alone(quant):
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    fresh = adapted(quant, shapes=REPACKABLE)
    after_eval = adapted(quant, shapes=REPACKABLE)
    after_eval.eval()
    with torch.no_grad():
        after_eval(x)
    expected_x, expected_lambdas = train_gradients(fresh, x, upstream)
    grad_x, grad_lambdas = train_gradients(after_eval, x, upstream)
    torch.testing.assert_close(grad_x, expected_x, rtol=0, atol=0)
    for name, grads in grad_lambdas.items():
        torch.testing.assert_close(grads, expected_lambdas[name], rtol=0, atol=0)
    # The sequence is the pitfall's trigger: a plain twin of `mid` (not adapted) would have been repacked.
    twin = QuantizedStack(quant, "cpu", shapes=REPACKABLE).mid.eval()
    with torch.no_grad():
        twin(torch.tanh(torch.randn(4, 64)))
    assert is_repacked(twin) == HAS_AVX512_BF16
    assert not any(is_repacked(m) for m in after_eval.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.fault(
    "numerics",
    "4-bit layer merged after an eval pass without grad",
    "merged weight within the requantization error of W + ΔW",
)
@pytest.mark.parametrize("quant", [FOUR_BIT[0], FOUR_BIT[4]], ids=str)
def test_merge_after_eval_without_grad_is_within_the_requantization_error(quant):
    model = adapted(quant, shapes=REPACKABLE).eval()
    layer = model.model.up
    target = layer.get_base_weight().float() + layer.delta_weight("default")
    with torch.no_grad():
        model(torch.randn(4, 128))
    with pytest.warns(UserWarning):
        model.merge_adapter()
    assert_within(layer.get_base_weight(), target, requantization_error(target, layer.base_layer, quant))


@pytest.mark.fault(
    "numerics",
    "4-bit weights already repacked by bitsandbytes before `get_model`",
    "restored to the standard layout (with bitsandbytes' scrambled scales fixed); gradients match the "
    "reference",
)
@pytest.mark.skipif(
    not HAS_AVX512_BF16, reason="bitsandbytes repacks 4-bit weights only on AVX-512 bf16 CPUs"
)
def test_a_weight_repacked_before_get_model_is_restored_and_trains():
    quant = FOUR_BIT[0]  # nf4 without double quantization: the repacked layout keeps the block scales in bf16
    base = QuantizedStack(quant, "cpu", shapes=REPACKABLE)
    dequantized = {name: bnb_dequantized(module) for name, module in base.named_children()}
    base.eval()
    with torch.no_grad():
        base(torch.randn(4, 128))
    assert all(is_repacked(module) for module in base.children())
    model = get_model(base, VeraConfig(r=6, target_modules=["up", "down"], init_weights=False))
    for name, module in model.model.named_children():
        module = base_of(module)
        assert not is_repacked(module) and not module.support_avx512bf16_for_cpu
        # s c with s rounded to bf16: |Δ| <= u_bf16 |W|
        bound = unit_roundoff(torch.bfloat16) * dequantized[name].abs()
        assert_within(bnb_dequantized(module), dequantized[name], bound)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(7))
    upstream = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    assert_gradients_match_the_reference(model, x, upstream)


# ---------------------------------------------------------------------------------------------------------
# Tiny transformers models loaded in 8-bit and 4-bit
# ---------------------------------------------------------------------------------------------------------

ARCHITECTURES = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}
# How a PEFT user loads a base in 8 or 4 bits, and the VeRA config put on top of it.
QUANTIZATION_CONFIGS = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16
    ),
}
# target_modules=None: the model type's defaults, ["q_proj", "v_proj"] for Llama and OPT
USER_VERA_CONFIGS = {"8bit": VeraConfig(r=128, vera_dropout=0.1), "4bit": VeraConfig(r=256, d_initial=0.1)}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Each tiny architecture saved once, with random weights, to be reloaded quantized."""
    paths = {}
    for name, build in ARCHITECTURES.items():
        paths[name] = tmp_path_factory.mktemp(name)
        build().save_pretrained(paths[name])
    return paths


def load_quantized(path, bits: str, device: str = "cpu", configs=QUANTIZATION_CONFIGS) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=configs[bits](), device_map=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", QUANTIZATION_CONFIGS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_quantized_transformers_model_trains_merges_and_saves(
    saved_models, architecture, bits, device, tmp_path
):
    inputs = lm_batch(device)
    model = get_model(load_quantized(saved_models[architecture], bits, device), USER_VERA_CONFIGS[bits])
    expected = Linear8bitLt if bits == "8bit" else Linear4bit
    assert {type(layer) for _, layer in model.vera_layers()} == {expected}
    initial = eval_loss(model, inputs)  # an eval pass first: the 4-bit repacking must not break training
    train_lambdas(model, inputs)
    trained = eval_loss(model, inputs)
    assert trained < initial

    with pytest.warns(UserWarning, match="requantizes"):
        merged = model.merge_and_unload()
    assert not any(isinstance(m, VeraLinear) for m in merged.modules())
    quantized_type = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    assert sum(isinstance(m, quantized_type) for m in merged.modules()) >= 4  # still quantized
    merged_loss = eval_loss(merged, inputs)
    assert abs(merged_loss - trained) < 0.5 * (initial - trained)  # the merge keeps what training learned

    merged.save_pretrained(tmp_path)  # the requantized weights serialize as bitsandbytes weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device)
    keep_standard_layouts(reloaded)  # a plain bitsandbytes model again: its tiny layers cannot be repacked
    assert eval_loss(reloaded, inputs) == pytest.approx(merged_loss, abs=1e-4)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's call
def test_trainable_parameter_counts_match_peft_on_a_4bit_model(saved_models):
    peft = pytest.importorskip("peft")
    config = VeraConfig(r=16)
    model = get_model(load_quantized(saved_models["llama"], "4bit"), config)
    ours = model.get_nb_trainable_parameters()
    theirs = peft.get_peft_model(
        load_quantized(saved_models["llama"], "4bit"), peft.VeraConfig(r=16)
    ).get_nb_trainable_parameters()
    assert ours == theirs
    assert ours[0] == sum(16 + layer.out_features for _, layer in model.vera_layers())  # r + out per layer


# PEFT casts vera_A / vera_B to a 4-bit layer's compute dtype (fp16 in the config above), so its adapter term
# drifts from the reference there; with an fp32 compute dtype both implementations compute the same thing.
PEFT_COMPARABLE_CONFIGS = {
    "8bit": QUANTIZATION_CONFIGS["8bit"],
    "4bit-fp32": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
}


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's call
@pytest.mark.parametrize("bits", PEFT_COMPARABLE_CONFIGS)
def test_logits_match_peft_over_the_same_quantized_base(saved_models, bits):
    peft = pytest.importorskip("peft")
    path = saved_models["llama"]
    ours = get_model(
        load_quantized(path, bits, configs=PEFT_COMPARABLE_CONFIGS), VeraConfig(r=16, init_weights=False)
    )
    theirs = peft.get_peft_model(
        load_quantized(path, bits, configs=PEFT_COMPARABLE_CONFIGS), peft.VeraConfig(r=16)
    )
    theirs.load_state_dict({"base_model." + k: v for k, v in ours.state_dict().items()}, strict=False)
    inputs = {"input_ids": lm_batch()["input_ids"]}
    # train mode (no dropout in this Llama): PEFT's bnb layers would hit the CPU repacking in eval
    ours.train(), theirs.train()
    with torch.no_grad():
        expected, actual = theirs(**inputs).logits, ours(**inputs).logits
    # The same fp32 terms; veralab folds the lambdas into one scaled projection (functional.py), so the
    # operations differ in order and the logits agree to fp32 round-off (assert_close's float32 tolerances).
    torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------------
# Saving and loading adapters (veralab.fast.saving, veralab.fast.loading)
# ---------------------------------------------------------------------------------------------------------


def lambdas_of(model: VeraModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return {
        f"{name}.{kind}": getattr(layer, kind)[adapter_name].detach().clone()
        for name, layer in model.vera_layers()
        for kind in VeraLinear.adapter_layer_names
    }


def assert_loaded_as_trained(
    loaded: VeraModel, trained: VeraModel, inputs, adapter_name: str = "default"
) -> None:
    """The loaded lambdas are bit for bit the trained ones, and they lower the loaded base's loss."""
    expected = lambdas_of(trained)
    for key, value in lambdas_of(loaded, adapter_name).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    loaded.set_adapter(adapter_name)
    with loaded.disable_adapter():
        base_loss = eval_loss(loaded, inputs)
    assert eval_loss(loaded, inputs) < base_loss


@pytest.mark.parametrize("bits", QUANTIZATION_CONFIGS)
def test_adapter_trained_over_a_quantized_base_loads_onto_the_unquantized_and_the_quantized_base(
    saved_models, bits, tmp_path
):
    inputs = lm_batch()
    model = get_model(load_quantized(saved_models["llama"], bits), VeraConfig(r=16))
    train_lambdas(model, inputs, steps=3)
    model.save_pretrained(tmp_path)
    loaded = VeraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_models["llama"]), tmp_path)
    assert {type(layer) for _, layer in loaded.vera_layers()} == {VeraLinear}
    assert_loaded_as_trained(loaded, model, inputs)
    # ...and back onto the same quantized base: exactly the trained model
    reloaded = VeraModel.from_pretrained(load_quantized(saved_models["llama"], bits), tmp_path)
    assert_loaded_as_trained(reloaded, model, inputs)
    assert eval_loss(reloaded, inputs) == eval_loss(model, inputs)


@pytest.mark.parametrize("bits", QUANTIZATION_CONFIGS)
def test_adapter_trained_over_the_unquantized_base_loads_onto_a_quantized_base(saved_models, bits, tmp_path):
    inputs = lm_batch()
    model = get_model(AutoModelForCausalLM.from_pretrained(saved_models["llama"]), VeraConfig(r=16))
    train_lambdas(model, inputs, steps=3)
    model.save_pretrained(tmp_path)
    loaded = VeraModel.from_pretrained(load_quantized(saved_models["llama"], bits), tmp_path)
    assert {type(layer) for _, layer in loaded.vera_layers()} == {
        Linear8bitLt if bits == "8bit" else Linear4bit
    }
    assert_loaded_as_trained(loaded, model, inputs)
    # load_adapter: the same file again as a second adapter next to the first, on the quantized base
    loaded.load_adapter(tmp_path, adapter_name="other")
    assert_loaded_as_trained(loaded, model, inputs, adapter_name="other")
