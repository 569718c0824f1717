"""The textbook path: each mechanism of veralab.reference pinned by a test that fails if it is wrong."""

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from veralab import reference as ref

# (out, in) shapes on purpose odd and mixed: wide, tall, square, tiny.
SHAPES = [(7, 5), (13, 3), (4, 17), (1, 1), (9, 9)]


def make_layers(shapes, r, prng_key=0, init_weights=False, bias=True, seed=0):
    torch.manual_seed(seed)
    dims = ref.find_max_dims(shapes)
    vera_A, vera_B = ref.init_projections(r, dims.max_in, dims.max_out, prng_key)
    projections = ref.SharedProjections(vera_A, vera_B)
    layers = [
        ref.VeraLinear(nn.Linear(i, o, bias=bias), projections, init_weights=init_weights) for o, i in shapes
    ]
    return layers, vera_A, vera_B


# §1 What VeRA trains -------------------------------------------------------------------------------


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("r", [1, 7, 64])
def test_trainable_counts_per_layer_match_peft(out_features, in_features, r):
    peft = pytest.importorskip("peft")
    counts = {}
    for name, config in [
        ("vera", peft.VeraConfig(r=r, target_modules=["layer"])),
        ("lora", peft.LoraConfig(r=r, target_modules=["layer"])),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = nn.Sequential(OrderedDict(layer=nn.Linear(in_features, out_features)))
            model = peft.get_peft_model(base, config)
        counts[name], _ = model.get_nb_trainable_parameters()
    assert ref.vera_trainable_per_layer(out_features, r) == counts["vera"] == r + out_features
    assert ref.lora_trainable_per_layer(in_features, out_features, r) == counts["lora"]


# §2 The shared random projections ------------------------------------------------------------------


def test_kaiming_init_stays_within_bound_and_has_kaiming_std():
    fan_in = 400
    matrix = ref.kaiming_init((300, fan_in), torch.Generator().manual_seed(0))
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
    assert matrix.dtype == torch.float32 and matrix.shape == (300, fan_in)
    assert matrix.abs().max() <= bound
    assert matrix.abs().max() > 0.99 * bound  # the whole range is used
    # a uniform on [-b, b] has std b / sqrt(3) = sqrt(2 / fan_in); 120k samples pin it to < 1 %
    assert matrix.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.01)


def test_kaiming_init_is_torchs_relu_kaiming_uniform_not_nn_linears_default():
    def generator():
        return torch.Generator().manual_seed(5)

    ours = ref.kaiming_init((11, 37), generator())
    relu_kaiming = nn.init.kaiming_uniform_(torch.empty(11, 37), nonlinearity="relu", generator=generator())
    assert torch.equal(ours, relu_kaiming)
    # nn.Linear's default (kaiming_uniform_ with a=√5) draws from U(-1/√fan_in, 1/√fan_in): √6 times narrower.
    linear_default = nn.init.kaiming_uniform_(torch.empty(11, 37), a=math.sqrt(5), generator=generator())
    torch.testing.assert_close(ours, math.sqrt(6.0) * linear_default)


def test_same_key_same_projections_different_key_different():
    A1, B1 = ref.init_projections(8, 20, 30, prng_key=3)
    A2, B2 = ref.init_projections(8, 20, 30, prng_key=3)
    A3, _ = ref.init_projections(8, 20, 30, prng_key=4)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert not torch.equal(A1, A3)


def test_A_is_drawn_before_B_from_one_generator():
    r, max_in, max_out = 4, 6, 5
    A, B = ref.init_projections(r, max_in, max_out, prng_key=11)
    generator = torch.Generator().manual_seed(11)
    expected_A = ref.kaiming_init((r, max_in), generator)
    expected_B = ref.kaiming_init((max_out, r), generator)
    assert torch.equal(A, expected_A) and torch.equal(B, expected_B)
    # B is not drawn from a fresh generator: it continues A's stream
    assert not torch.equal(B, ref.kaiming_init((max_out, r), torch.Generator().manual_seed(11)))


class MultiShape(nn.Module):
    """Layers of different shapes, so max-dim sizing matters."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(5, 13)
        self.down = nn.Linear(13, 4)
        self.side = nn.Linear(17, 2)

    def forward(self, x):
        return self.down(self.up(x))


@pytest.mark.parametrize("r, key", [(1, 0), (7, 5), (64, 123)])
def test_init_projections_bit_identical_to_peft(r, key):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            MultiShape(), peft.VeraConfig(r=r, target_modules=["up", "down", "side"], projection_prng_key=key)
        )
    shapes = [module.weight.shape for module in (model.up, model.down, model.side)]  # PyTorch's (out, in)
    A, B = ref.init_projections(r, *ref.find_max_dims(shapes), key)
    assert torch.equal(A, model.base_model.vera_A["default"])
    assert torch.equal(B, model.base_model.vera_B["default"])


# §3 One pair for every shape: max-dim sizing and slicing -------------------------------------------


def test_find_max_dims_reads_out_in_shapes_and_returns_in_before_out():
    dims = ref.find_max_dims([(100, 20), (80, 50)])  # PEFT's documented example, (out, in) each
    assert dims == ref.MaxDims(max_in=50, max_out=100)
    assert (dims.max_in, dims.max_out) == (50, 100)
    assert ref.find_max_dims(SHAPES) == ref.MaxDims(max_in=17, max_out=13)
    assert ref.find_max_dims(nn.Linear(i, o).weight.shape for o, i in SHAPES) == ref.find_max_dims(SHAPES)
    with pytest.raises(ValueError, match="at least one layer"):
        ref.find_max_dims([])


def test_max_dims_unpack_in_the_order_init_projections_takes():
    dims = ref.find_max_dims([(9, 4)])  # a tall layer: out 9, in 4
    A, B = ref.init_projections(3, *dims, prng_key=0)
    assert A.shape == (3, 4) and B.shape == (9, 3)


def test_slices_are_views_of_the_shared_pair():
    A, B = ref.init_projections(6, 17, 13, prng_key=0)
    A_s, B_s = ref.slice_projections(A, B, in_features=5, out_features=9)
    assert A_s.shape == (6, 5) and B_s.shape == (9, 6)
    assert A_s.data_ptr() == A.data_ptr() and B_s.data_ptr() == B.data_ptr()
    assert torch.equal(A_s, A[:, :5]) and torch.equal(B_s, B[:9])


def test_slice_too_large_layer_raises():
    A, B = ref.init_projections(4, 10, 10, prng_key=0)
    with pytest.raises(ValueError, match="does not fit"):
        ref.slice_projections(A, B, in_features=11, out_features=3)


def test_several_layer_shapes_share_one_pair():
    layers, A, B = make_layers(SHAPES, r=5)
    for layer in layers:
        assert layer.projections is layers[0].projections
        assert layer.projections.vera_A is A and layer.projections.vera_B is B
        x = torch.randn(3, layer.in_features)
        A_s, B_s = A[:, : layer.in_features], B[: layer.out_features]
        expected = layer.base_layer(x) + layer.vera_lambda_b * ((layer.vera_lambda_d * (x @ A_s.T)) @ B_s.T)
        torch.testing.assert_close(layer(x), expected)
    # the layers own only their lambdas
    assert set(layers[0].state_dict()) == {
        "vera_lambda_d",
        "vera_lambda_b",
        "base_layer.weight",
        "base_layer.bias",
    }


# §4 Lambda scaling: the forward pass ---------------------------------------------------------------


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("r", [1, 7, 64])  # 64 is larger than every layer here
def test_vera_forward_gradcheck_float64(out_features, in_features, r):
    torch.manual_seed(0)
    A, B = ref.init_projections(r, in_features + 2, out_features + 3, prng_key=1)
    A, B = A.double(), B.double()
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    bias = torch.randn(out_features, dtype=torch.float64)
    x = torch.randn(2, 3, in_features, dtype=torch.float64, requires_grad=True)
    lambda_d = torch.randn(r, dtype=torch.float64, requires_grad=True)
    lambda_b = torch.randn(out_features, dtype=torch.float64, requires_grad=True)

    def f(x, lambda_d, lambda_b):
        return ref.vera_forward(x, weight, bias, A, B, lambda_d, lambda_b)

    assert torch.autograd.gradcheck(f, (x, lambda_d, lambda_b))


@pytest.mark.parametrize("bias", [True, False])
def test_output_equals_base_layer_at_init(bias):
    torch.manual_seed(0)
    layers, _, _ = make_layers(SHAPES, r=16, init_weights=True, bias=bias)
    for layer in layers:
        assert torch.all(layer.vera_lambda_b == 0)
        assert torch.all(layer.vera_lambda_d == 0.1)
        x = torch.randn(4, 2, layer.in_features)
        assert torch.equal(layer(x), layer.base_layer(x))


def test_lambda_b_gets_a_gradient_at_init():
    """λ_b = 0 makes the output the base's, but λ_b's gradient u ⊙ dL/dy is not zero: training starts."""
    layers, _, _ = make_layers([(6, 4)], r=8, init_weights=True)
    layer = layers[0]
    layer(torch.randn(3, 4)).sum().backward()
    assert layer.vera_lambda_b.grad.abs().sum() > 0
    assert torch.all(layer.vera_lambda_d.grad == 0)  # its gradient is scaled by λ_b = 0


def test_init_weights_false_gives_nonzero_lambdas():
    layers, _, _ = make_layers([(6, 4)], r=8, init_weights=False)
    assert torch.all(layers[0].vera_lambda_b != 0) and torch.all(layers[0].vera_lambda_d != 0)


def test_dropout_touches_only_the_adapter_input():
    torch.manual_seed(0)
    A, B = ref.init_projections(8, max_in=4, max_out=6, prng_key=0)
    layer = ref.VeraLinear(nn.Linear(4, 6), ref.SharedProjections(A, B), vera_dropout=0.5, init_weights=False)
    x = torch.randn(50, 4)
    layer.eval()
    no_dropout = layer(x)
    layer.train()
    torch.manual_seed(1)
    with_dropout = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + layer.vera_lambda_b * ((layer.vera_lambda_d * (dropped @ A.T)) @ B.T)
    torch.testing.assert_close(with_dropout, expected)
    assert not torch.allclose(with_dropout, no_dropout)


# §5 Merging the adapter into the weight, and back --------------------------------------------------


@pytest.mark.parametrize("r", [1, 7, 64])
def test_delta_weight_is_the_adapter_as_a_matrix(r):
    layers, _, _ = make_layers(SHAPES, r=r)
    for layer in layers:
        x = torch.randn(5, layer.in_features)
        adapter_only = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(x @ layer.delta_weight().T, adapter_only, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("r", [1, 7, 64])
def test_merged_forward_equals_unmerged(r):
    layers, _, _ = make_layers(SHAPES, r=r)
    for layer in layers:
        x = torch.randn(2, 3, layer.in_features)
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-4)


def test_unmerge_restores_weight():
    layers, _, _ = make_layers(SHAPES, r=7)
    for layer in layers:
        original = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert not torch.equal(layer.base_layer.weight, original)
        layer.unmerge()
        # one add and one subtract of the same ΔW: at most a couple of float32 roundings of |W| + |ΔW|
        scale = original.abs() + layer.delta_weight().detach().abs()
        assert torch.all(
            (layer.base_layer.weight - original).abs() <= 2 * torch.finfo(torch.float32).eps * scale
        )


def test_merge_twice_and_unmerge_unmerged_raise():
    layers, _, _ = make_layers([(3, 3)], r=2)
    with pytest.raises(RuntimeError, match="not merged"):
        layers[0].unmerge()
    layers[0].merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layers[0].merge()


# §6 The layer: SharedProjections and VeraLinear ----------------------------------------------------


class Stack(nn.Module):
    """Adapted layers of several shapes in one model, all reading one SharedProjections."""

    def __init__(self, shapes, r):
        super().__init__()
        self.layers = nn.ModuleList(make_layers(shapes, r=r)[0])

    def forward(self, xs):
        return [layer(x) for layer, x in zip(self.layers, xs, strict=True)]


def assert_one_pair(model):
    first = model.layers[0].projections
    for layer in model.layers:
        assert layer.projections is first
        assert layer.projections.vera_A.data_ptr() == first.vera_A.data_ptr()
        assert layer.projections.vera_B.data_ptr() == first.vera_B.data_ptr()


def test_converting_the_model_keeps_one_shared_pair():
    model = Stack(SHAPES, r=6)
    A, B = model.layers[0].projections.vera_A, model.layers[0].projections.vera_B
    xs = [torch.randn(3, layer.in_features, dtype=torch.float64) for layer in model.layers]
    expected = []
    for layer, x in zip(model.layers, xs, strict=True):
        weight, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double()
        lambdas = layer.vera_lambda_d.double(), layer.vera_lambda_b.double()
        expected.append(ref.vera_forward(x, weight, bias, A.double(), B.double(), *lambdas))

    model.double()
    assert_one_pair(model)
    assert model.layers[0].projections.vera_A.dtype == torch.float64
    for y, y_expected in zip(model(xs), expected, strict=True):
        torch.testing.assert_close(y, y_expected, rtol=0, atol=0)  # the same float64 operations

    model.float()  # float32 -> float64 -> float32 is exact
    assert_one_pair(model)
    projections = model.layers[0].projections
    assert torch.equal(projections.vera_A, A) and torch.equal(projections.vera_B, B)

    model.to("meta")
    assert_one_pair(model)
    assert model.layers[-1].projections.vera_A.is_meta


def test_the_shared_pair_is_in_no_state_dict():
    model = Stack(SHAPES, r=6)
    assert not any("vera_A" in key or "vera_B" in key for key in model.state_dict())
    assert sum(1 for _ in model.buffers()) == 2  # one pair, however many layers


def test_vera_linear_refuses_bare_tensors():
    A, B = ref.init_projections(2, 3, 3, prng_key=0)
    with pytest.raises(TypeError, match="SharedProjections"):
        ref.VeraLinear(nn.Linear(3, 3), A)
    with pytest.raises(TypeError):
        ref.VeraLinear(nn.Linear(3, 3), A, B)  # the old (vera_A, vera_B) call: d_initial is keyword-only


def test_reference_layer_matches_peft_layer():
    """Same weights and lambdas in PEFT's VeRA layer and ours give the same output and gradients."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = MultiShape()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.VeraConfig(r=9, target_modules=["up"], init_weights=False))
    peft_layer = model.base_model.model.up
    A = model.base_model.vera_A["default"]
    B = model.base_model.vera_B["default"]
    ours = ref.VeraLinear(nn.Linear(5, 13), ref.SharedProjections(A, B))
    ours.base_layer.load_state_dict(peft_layer.base_layer.state_dict())
    with torch.no_grad():
        ours.vera_lambda_d.copy_(peft_layer.vera_lambda_d["default"])
        ours.vera_lambda_b.copy_(peft_layer.vera_lambda_b["default"])
    x = torch.randn(4, 5)
    y_theirs, y_ours = peft_layer(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs)
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    torch.testing.assert_close(ours.vera_lambda_d.grad, peft_layer.vera_lambda_d["default"].grad)
    torch.testing.assert_close(ours.vera_lambda_b.grad, peft_layer.vera_lambda_b["default"].grad)
