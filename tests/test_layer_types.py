"""VeRA beyond linear layers: nn.Embedding and nn.Conv1d/2d/3d, veralab.fast against veralab.reference §7-§8.

Outputs and both lambda gradients (and the input gradient of convolutions) are compared with non-zero lambdas
over odd shapes and ranks; merging, mixed batches, dropout, files, the LoRA export and the refusals are
checked
on small models built around the layers.
"""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

from veralab import VeraConfig
from veralab import reference as ref
from veralab.counting import count_adapter
from veralab.fast import VeraConv, VeraEmbedding, VeraModel, get_model
from veralab.fast.dispatch import WEIGHT_SPACE
from veralab.fast.projections import SharedProjections

EMBEDDINGS = [  # (num_embeddings, embedding_dim, padding_idx)
    (7, 5, None),
    (50, 3, 0),
    (13, 17, 12),
]
CONVS = {
    "conv1d": lambda: nn.Conv1d(3, 5, 3, padding=1),
    "conv1d-stride-dilation": lambda: nn.Conv1d(4, 7, 4, stride=2, dilation=2, bias=False),
    "conv2d": lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=1),
    "conv2d-reflect-same": lambda: nn.Conv2d(2, 5, 3, padding="same", padding_mode="reflect"),
    "conv3d": lambda: nn.Conv3d(2, 4, 2, padding=(1, 0, 1)),
}
RANKS = [1, 7, 64]


def max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.float() - expected.float()).abs().max().item()


def fast_and_reference(base: nn.Module, r: int, seed: int = 0):
    """The same layer, lambdas and projections in veralab.fast and in the reference (random lambdas)."""
    torch.manual_seed(seed)
    fast_class, ref_class = (
        (VeraEmbedding, ref.VeraEmbedding) if isinstance(base, nn.Embedding) else (VeraConv, ref.VeraConv)
    )
    probe = fast_class(copy.deepcopy(base), SharedProjections.create(r, 1, 1, seed))
    projections = SharedProjections.create(r, probe.in_features + 3, probe.out_features + 2, prng_key=seed)
    reference = ref_class(
        copy.deepcopy(base), ref.SharedProjections(projections.vera_A, projections.vera_B), init_weights=False
    )
    fast = fast_class(copy.deepcopy(base).requires_grad_(False), projections)
    fast.update_layer("default", VeraConfig(r=r, init_weights=False))
    fast.set_adapter(["default"])
    with torch.no_grad():
        fast.vera_lambda_d["default"].copy_(reference.vera_lambda_d)
        fast.vera_lambda_b["default"].copy_(reference.vera_lambda_b)
    return fast, reference


def input_for(layer: nn.Module, batch: int = 3) -> torch.Tensor:
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        ids = torch.randint(0, base.num_embeddings, (batch, 6))
        if base.padding_idx is not None:
            ids[0, :2] = base.padding_idx
        return ids
    return torch.randn(batch, base.in_channels, *(9,) * len(base.kernel_size))


def forward_and_grads(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor, name: str | None = None):
    """(y, grad λ_d, grad λ_b, grad x) of one forward and backward (grad x None for ids)."""
    x = x.clone().requires_grad_() if x.is_floating_point() else x
    y = layer(x)
    y.backward(upstream.to(y.dtype))
    lambda_d = layer.vera_lambda_d[name] if name else layer.vera_lambda_d
    lambda_b = layer.vera_lambda_b[name] if name else layer.vera_lambda_b
    return y, lambda_d.grad, lambda_b.grad, x.grad if x.is_floating_point() else None


def assert_as_accurate_as_the_reference(fast, reference, x) -> None:
    """The fast layer's output and gradients agree with the reference evaluated in float64, within the float32
    rounding bound of the computation: each result is a sum of products along a chain of at most
    d = in + r + out + (batch x positions) terms, so its error is at most d·u times the same result computed
    from the absolute values of every factor (|x|, |W|, |A|, |B|, |λ|, |upstream|), which bounds Σ|terms|."""
    with torch.no_grad():
        upstream = torch.randn_like(reference(x))
    x64 = x.double() if x.is_floating_point() else x
    truths = forward_and_grads(copy.deepcopy(reference).double(), x64, upstream.double())
    magnitudes = forward_and_grads(
        absolute(reference), x64.abs() if x.is_floating_point() else x, upstream.abs().double()
    )
    ours = forward_and_grads(fast, x, upstream, name="default")
    positions = upstream[0, 0].numel() if upstream.dim() > 2 else 1
    depth = fast.in_features + fast.r["default"] + fast.out_features + upstream.shape[0] * positions
    u = torch.finfo(torch.float32).eps / 2
    for got, truth, magnitude in zip(ours, truths, magnitudes, strict=True):
        if truth is not None:
            assert ((got.double() - truth).abs() <= depth * u * magnitude + 1e-30).all()


def assert_output_within_rounding(got: torch.Tensor, layer, reference, x: torch.Tensor) -> None:
    """`got` is the reference's output within the float32 rounding bound of the computation (see above)."""
    x64 = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        truth = copy.deepcopy(reference).double()(x64)
        magnitude = absolute(reference)(x64.abs() if x.is_floating_point() else x)
    positions = truth[0, 0].numel() if truth.dim() > 2 else 1
    depth = layer.in_features + layer.r["default"] + layer.out_features + truth.shape[0] * positions
    assert ((got.double() - truth).abs() <= depth * torch.finfo(torch.float32).eps / 2 * magnitude).all()


def absolute(reference: nn.Module) -> nn.Module:
    """The reference layer in float64 with every parameter and buffer replaced by its absolute value."""
    copied = copy.deepcopy(reference).double()
    with torch.no_grad():
        for tensor in [*copied.parameters(), *copied.buffers()]:
            tensor.abs_()
    return copied


@pytest.mark.parametrize("num, dim, padding_idx", EMBEDDINGS)
@pytest.mark.parametrize("r", RANKS)
def test_embedding_equals_reference_fp32(num, dim, padding_idx, r):
    fast, reference = fast_and_reference(nn.Embedding(num, dim, padding_idx=padding_idx), r)
    assert_as_accurate_as_the_reference(fast, reference, input_for(fast))


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("r", RANKS)
def test_conv_equals_reference_fp32(conv, r):
    fast, reference = fast_and_reference(CONVS[conv](), r)
    assert_as_accurate_as_the_reference(fast, reference, input_for(fast))


@pytest.mark.parametrize("base", ["embedding", "conv2d"])
def test_bf16_error_bounded_by_torch_own_error(base):
    """In bf16 the fast layer stays within 2x the error PyTorch makes evaluating the reference formula in bf16
    (the float32 reference as the truth), plus one unit in the last place of the output's magnitude."""
    layer = nn.Embedding(40, 24, padding_idx=1) if base == "embedding" else CONVS["conv2d"]()
    fast, reference = fast_and_reference(layer, r=32)
    x = input_for(fast)
    truth = reference(x)
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    torch_low = bf16(x if base == "embedding" else x.to(torch.bfloat16))
    fast.base_layer.to(torch.bfloat16)
    y = fast(x if base == "embedding" else x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * truth.abs().max().item()
    assert max_error(y, truth) <= 2 * max_error(torch_low, truth) + ulp


@pytest.mark.parametrize("conv", ["conv1d", "conv2d-reflect-same", "conv3d"])
def test_conv_without_grad_folds_adapters_into_the_kernel_exactly(conv):
    fast, reference = fast_and_reference(CONVS[conv](), r=4)
    x = input_for(fast, batch=16)
    with torch.no_grad():
        assert fast.plan(x).path == WEIGHT_SPACE  # many positions, small rank: one convolution is cheaper
        y = fast(x)
    assert_output_within_rounding(y, fast, reference, x)


# ------------------------------------------------------------------ merging


@pytest.mark.parametrize(
    "layer",
    [nn.Embedding(30, 8, padding_idx=3), CONVS["conv2d"](), CONVS["conv3d"]()],
    ids=["embedding", "conv2d", "conv3d"],
)
def test_merge_equals_the_adapted_layer_and_unmerge_restores_the_weight(layer):
    fast, reference = fast_and_reference(layer, r=6)
    original = fast.base_layer.weight.detach().clone()
    delta = fast.delta_weight("default").view_as(original) if not isinstance(layer, nn.Embedding) else None
    x = input_for(fast)
    with torch.no_grad():
        assert_output_within_rounding(fast(x), fast, reference, x)
        fast.merge()
        assert_output_within_rounding(fast(x), fast, reference, x)
        if isinstance(layer, nn.Embedding):
            assert torch.equal(fast.base_layer.weight[3], original[3])  # the padding row stays fixed
            delta = fast.delta_weight("default").T
        fast.unmerge()
    # Merging and unmerging round once each, at most u (|W| + |ΔW|) per entry.
    bound = torch.finfo(torch.float32).eps * (original.abs() + delta.abs())
    assert ((fast.base_layer.weight - original).abs() <= bound).all()


def test_embedding_padding_row_gets_no_adapter_term_and_sends_no_gradient():
    fast, _ = fast_and_reference(nn.Embedding(10, 4, padding_idx=2), r=5)
    ids = torch.tensor([[2, 2, 2]])
    y = fast(ids)
    assert torch.equal(y, fast.base_layer(ids))
    y.sum().backward()
    assert torch.count_nonzero(fast.vera_lambda_b["default"].grad) == 0


# ------------------------------------------------------------------ models: adapters, batches, files


class Vision(nn.Module):
    """A small model with every layer type VeRA adapts: a token embedding, convolutions and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(40, 12, padding_idx=0)
        self.patches = nn.Conv2d(3, 12, 4, stride=4)  # a ViT-style patch embedding
        self.mix = nn.Conv1d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        patches = self.patches(images).flatten(2)  # (N, 12, positions)
        sequence = torch.cat([self.tokens(ids).transpose(1, 2), patches], dim=2)  # (N, 12, length)
        return self.head(self.mix(sequence).mean(-1))


TARGETS = ["tokens", "patches", "mix", "head"]


def vision_inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 40, (batch, 5))
    ids[0, 0] = 0
    return ids, torch.randn(batch, 3, 8, 8)


def adapted_vision(**config) -> VeraModel:
    torch.manual_seed(0)
    return get_model(Vision(), VeraConfig(r=8, target_modules=TARGETS, init_weights=False, **config))


def test_every_layer_type_is_adapted_and_trains():
    model = adapted_vision()
    assert {type(layer).__name__ for _, layer in model.vera_layers()} == {
        "VeraEmbedding",
        "VeraConv",
        "VeraLinear",
    }
    model(*vision_inputs()).square().mean().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad
    )


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = adapted_vision()
    model.add_adapter("other", VeraConfig(r=8, target_modules=TARGETS, init_weights=False))
    ids, images = vision_inputs()
    names = ["default", "other", "__base__", "other"]
    with torch.no_grad():
        mixed = model(ids, images, adapter_names=names)
        alone = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            alone[name] = model(ids, images)
        with model.disable_adapter():
            alone["__base__"] = model(ids, images)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row])


@pytest.mark.parametrize("name", ["tokens", "patches", "mix"])
def test_two_active_adapters_add_up(name):
    model = adapted_vision()
    model.add_adapter("other", VeraConfig(r=8, target_modules=TARGETS, init_weights=False))
    layer = getattr(model.model, name)
    x = input_for(layer)
    terms = {}
    with torch.no_grad():
        with model.disable_adapter():
            base = layer(x)
        for active in (["default"], ["other"], ["default", "other"]):
            model.set_adapter(active)
            terms[tuple(active)] = layer(x) - base
    torch.testing.assert_close(terms[("default", "other")], terms[("default",)] + terms[("other",)])


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load_round_trip(tmp_path, save_projection):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = adapted_vision(save_projection=save_projection)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = VeraModel.from_pretrained(Vision(), tmp_path)
    inputs = vision_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model.eval()(*inputs))


def test_lora_export_loads_in_peft_with_the_same_outputs(tmp_path):
    model = adapted_vision()
    model.save_as_lora(tmp_path)
    torch.manual_seed(0)
    lora = peft.PeftModel.from_pretrained(Vision(), tmp_path)
    inputs = vision_inputs()
    with torch.no_grad():
        expected = model(*inputs)
        assert (
            max_error(lora(*inputs), expected) <= 64 * torch.finfo(torch.float32).eps * expected.abs().max()
        )


@pytest.mark.parametrize(
    "targets, error, message",
    [
        (["tokens"], ValueError, "No layers types compatible with VeRA"),
        (["patches"], ValueError, "No layers types compatible with VeRA"),
        (["tokens", "head"], TypeError, r"Embedding\(40, 12, padding_idx=0\) is not supported"),
        (["mix", "head"], TypeError, r"Conv1d\(12, 12.*is not supported"),
    ],
)
@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_vera_refuses_adapters_with_embedding_or_conv_targets(
    tmp_path, targets, error, message, save_projection
):
    """PEFT's VeRA adapts linear layers only: it must refuse such a directory loudly, never load part of it
    (alone, PEFT finds no layer to size the projections by; next to a linear target, it refuses the layer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        config = VeraConfig(r=8, target_modules=targets, init_weights=False, save_projection=save_projection)
        get_model(Vision(), config).save_pretrained(tmp_path)
        with pytest.raises(error, match=message):
            peft.PeftModel.from_pretrained(Vision(), tmp_path)


def test_models_read_the_base_weight_through_an_adapted_layer():
    """A ViT reads its patch embedding's weight dtype in forward: an adapted Conv2d there must expose the base
    layer's weight and bias (as PEFT's adapter layers do), and compute the reference's output."""
    config = ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=4, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = get_model(
        ViTForImageClassification(config).eval(),
        VeraConfig(r=8, target_modules=["projection", "q_proj"], init_weights=False),
    )
    layers = dict(model.vera_layers())
    for layer in layers.values():
        assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    patch = layers["vit.embeddings.patch_embeddings.projection"]
    reference = ref.VeraConv(
        copy.deepcopy(patch.base_layer), ref.SharedProjections(model.vera_A, model.vera_B), init_weights=False
    )
    with torch.no_grad():
        reference.vera_lambda_d.copy_(patch.vera_lambda_d["default"])
        reference.vera_lambda_b.copy_(patch.vera_lambda_b["default"])
    seen = {}
    patch.register_forward_hook(lambda module, args, output: seen.update(x=args[0], y=output))
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(2, 3, 16, 16)).logits
    assert logits.shape == (2, 3)
    assert_output_within_rounding(seen["y"], patch, reference, seen["x"])


def test_embedding_dropout_drops_whole_tokens():
    fast, _ = fast_and_reference(nn.Embedding(20, 6), r=4)
    fast.vera_dropout["default"] = nn.Dropout(0.5)
    fast.train()
    ids = torch.arange(20).repeat(8, 1)
    torch.manual_seed(3)
    with torch.no_grad():
        y, base = fast(ids), fast.base_layer(ids)
        term = fast.eval()(ids) - base
    dropped = (y - base).abs().amax(-1) == 0
    kept = ~dropped
    assert dropped.any() and kept.any()
    torch.testing.assert_close((y - base)[kept], 2 * term[kept])  # kept terms scaled by 1 / (1 - p)


# ------------------------------------------------------------------ refusals and counting


@pytest.mark.parametrize(
    "module, message",
    [
        pytest.param(
            nn.Embedding(10, 4, max_norm=1.0),
            "max_norm=1.0",
            marks=pytest.mark.fault(
                "model", "an nn.Embedding with max_norm", "ValueError saying why and what to do"
            ),
            id="max-norm",
        ),
        pytest.param(
            nn.Conv2d(4, 8, 3, groups=2),
            "groups=2",
            marks=pytest.mark.fault(
                "model", "a grouped convolution", "ValueError saying why and what to adapt"
            ),
            id="grouped-conv",
        ),
    ],
)
def test_layers_no_adapter_can_follow_are_refused(module, message):
    model = nn.Sequential(module)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        get_model(model, VeraConfig(r=2, target_modules=["0"]))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(model[0]).__module__.startswith("torch")  # nothing was replaced


@pytest.mark.fault(
    "model", "an embedding tied to the output layer", "ValueError naming both and how to untie"
)
def test_tied_embeddings_are_refused():
    config = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"embed_tokens.*also the weight of \['lm_head'\].*Untie"):
        get_model(LlamaForCausalLM(config), VeraConfig(r=2, target_modules=["embed_tokens"]))


def test_all_linear_leaves_embeddings_and_convolutions_alone():
    model = get_model(Vision(), VeraConfig(r=2, target_modules="all-linear"))
    assert [name for name, _ in model.vera_layers()] == ["head"]


def test_counting_knows_embeddings_and_convolutions_as_peft_lora_counts_them():
    count = count_adapter(Vision(), VeraConfig(r=8, target_modules=TARGETS), lora_r=4)
    shapes = {layer.name: (layer.out_features, layer.in_features) for layer in count.layers}
    assert shapes == {"tokens": (12, 40), "patches": (12, 3 * 16), "mix": (12, 12 * 3), "head": (5, 12)}
    assert count.vera_parameters == sum(8 + out for out, _ in shapes.values())
    assert count.vera_parameters == adapted_vision().get_nb_trainable_parameters()[0]
    lora = peft.get_peft_model(Vision(), peft.LoraConfig(r=4, target_modules=TARGETS))
    assert count.lora_parameters == lora.get_nb_trainable_parameters()[0]
    assert (count.max_in, count.max_out) == (48, 12)
