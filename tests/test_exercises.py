"""The notebooks' exercise checkers: a right answer passes (also one computed another valid way), and each
kind of wrong answer fails with a message that names what is wrong. The notebooks, run by nbval, call every
checker on their worked solutions; these tests feed them the mistakes a learner makes."""

from __future__ import annotations

import pytest
import torch
from test_architecture import import_graph

from veralab import exercises
from veralab import reference as ref


def assert_wrong(feedback: exercises.Feedback, *words: str) -> None:
    assert not feedback, str(feedback)
    text = str(feedback)
    assert text.startswith("Not yet: ")
    for word in words:
        assert word in text, text


def test_exercises_import_the_textbook_only():
    assert import_graph()["veralab.exercises"] == {"veralab.reference"}


def test_feedback_is_true_when_right_and_prints_its_messages():
    right = exercises.Feedback(True, ("Right: it works",))
    assert right and str(right) == repr(right) == "Right: it works"
    assert not exercises.Feedback(False, ("Not yet: no", "hint"))


def test_trainable_parameters():
    layers = [(768, 768), (3072, 768)]
    vera = (256 + 768) + (256 + 3072)
    lora = 8 * (768 + 768) + 8 * (768 + 3072)
    assert exercises.check_trainable_parameters(layers, 256, vera=vera)
    assert exercises.check_trainable_parameters(layers, 8, lora=lora)
    assert_wrong(exercises.check_trainable_parameters(layers, 256, vera=vera + 256), "+256", "λ_d")
    assert_wrong(exercises.check_trainable_parameters(layers, 8, lora=lora - 1), "-1", "A (r × in)")
    assert_wrong(exercises.check_trainable_parameters(layers, 8), "vera=")


def test_projections():
    assert exercises.check_projections(ref.init_projections)

    def b_first(r, max_in, max_out, prng_key):
        generator = torch.Generator().manual_seed(prng_key)
        vera_B = ref.kaiming_init((max_out, r), generator)
        return ref.kaiming_init((r, max_in), generator), vera_B

    def linear_default(r, max_in, max_out, prng_key):
        generator = torch.Generator().manual_seed(prng_key)
        vera_A = torch.empty(r, max_in)
        torch.nn.init.kaiming_uniform_(vera_A, a=5**0.5, generator=generator)
        return vera_A, ref.kaiming_init((max_out, r), generator)

    assert_wrong(exercises.check_projections(b_first), "vera_A differs")
    assert_wrong(exercises.check_projections(linear_default), "√(6 / max_in)")
    assert_wrong(exercises.check_projections(lambda r, i, o, k: ref.init_projections(r, o, i, k)), "shapes")
    assert_wrong(exercises.check_projections(lambda *args: 1 / 0), "ZeroDivisionError")


def test_slicing():
    assert exercises.check_slicing(ref.slice_projections)
    assert_wrong(exercises.check_slicing(lambda A, B, i, o: (A[:, :i].clone(), B[:o, :].clone())), "copies")
    assert_wrong(exercises.check_slicing(lambda A, B, i, o: (A[:, -i:], B[-o:, :])), "top-left")
    assert_wrong(exercises.check_slicing(lambda A, B, i, o: (A[:i, :], B[:, :o])), "shapes")


def test_forward():
    assert exercises.check_forward(ref.vera_forward)

    def merged(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b):  # another valid order of the sums
        out_features, in_features = weight.shape
        delta = ref.delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)
        return torch.nn.functional.linear(x, weight + delta, bias)

    def swapped(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b):  # λ_b where λ_d goes, wrongly sized
        return ref.vera_forward(x, weight, bias, vera_A, vera_B, lambda_d.flip(0), lambda_b)

    assert exercises.check_forward(merged)
    assert_wrong(exercises.check_forward(swapped), "y for x")
    assert_wrong(
        exercises.check_forward(lambda x, w, b, *rest: torch.nn.functional.linear(x, w, b)),
        "base layer alone",
    )


def test_conv_delta_kernel():
    assert exercises.check_conv_delta_kernel(ref.conv_delta_kernel)

    def transposed(conv, vera_A, vera_B, lambda_d, lambda_b):  # reshaped in the wrong order
        out_features, in_features = ref.conv_matrix_shape(conv)
        delta = ref.delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)
        kh, kw = conv.kernel_size
        return delta.reshape(out_features, kh, kw, conv.in_channels).permute(0, 3, 1, 2)

    assert_wrong(exercises.check_conv_delta_kernel(transposed), "reshape")


def test_int8_roundtrip():
    def absmax(weight):
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        return torch.round(weight / scale) * scale

    def one_scale(weight):  # one scale for the whole matrix: the small rows lose their precision
        scale = weight.abs().max() / 127
        return torch.round(weight / scale) * scale

    assert exercises.check_int8_roundtrip(absmax)
    assert_wrong(exercises.check_int8_roundtrip(one_scale), "rowmax / 254")


def test_lora_export():
    def export(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features):
        A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features, out_features)
        return lambda_d[:, None] * A_s, lambda_b[:, None] * B_s

    def unscaled(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features):
        return ref.slice_projections(vera_A, vera_B, in_features, out_features)

    assert exercises.check_lora_export(export)
    assert_wrong(exercises.check_lora_export(unscaled), "λ_d")
    assert_wrong(exercises.check_lora_export(lambda A, B, d, b, i, o: (A, B)), "shapes")


@pytest.mark.parametrize("case", [(1, 8, 8, 4), (100, 7, 300, 256)])
def test_adapter_flops_counts_two_thin_matmuls(case):
    n, in_features, out_features, r = case
    assert exercises.adapter_flops(*case) == 2 * n * r * (in_features + out_features)


def test_check_adapter_flops():
    assert exercises.check_adapter_flops(lambda n, i, o, r: 2 * n * r * (i + o))
    assert_wrong(exercises.check_adapter_flops(lambda n, i, o, r: n * r * (i + o)), "2 FLOPs a multiply-add")


def test_delta_weight():
    assert exercises.check_delta_weight(ref.delta_weight)

    def transposed(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features):
        return ref.delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features).T

    def unscaled_rows(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features):  # λ_b on columns
        A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features, out_features)
        return (B_s * lambda_d) @ (lambda_d[:, None] * A_s)

    assert_wrong(exercises.check_delta_weight(transposed), "shape")
    assert_wrong(exercises.check_delta_weight(unscaled_rows), "λ_b[:, None]")


ADAPTERS = {
    "alpha": (16, [(64, 64), (64, 64)], 0),
    "beta": (16, [(64, 64)], 0),
    "gamma": (32, [(64, 64)], 0),
    "delta": (16, [(64, 64), (172, 64)], 0),
    "epsilon": (16, [(64, 64)], 7),
}


def test_projection_groups():
    right = [{"alpha", "beta"}, {"gamma"}, {"delta"}, {"epsilon"}]
    assert exercises.check_projection_groups(ADAPTERS, right)
    assert_wrong(
        exercises.check_projection_groups(ADAPTERS, [{"alpha", "beta", "delta"}, {"gamma"}, {"epsilon"}]),
        "alpha and delta read different pairs",
    )
    assert_wrong(
        exercises.check_projection_groups(ADAPTERS, [{"alpha"}, {"beta"}, {"gamma"}, {"delta"}, {"epsilon"}]),
        "alpha and beta read the same pair",
    )
    assert_wrong(exercises.check_projection_groups(ADAPTERS, [{"alpha", "beta"}]), "missing")
    assert_wrong(exercises.check_projection_groups(ADAPTERS, [*right, {"zeta"}]), "zeta")
