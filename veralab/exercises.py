r"""Checkers for the notebooks' exercises: call one with your answer, read what is right or wrong.

Each notebook ends with an exercise and calls one checker here on a worked solution; the test suite runs
the notebooks, so every checker is tested against a correct answer (and tests/test_exercises.py feeds each
one wrong answers). A checker never raises on a wrong answer: it returns a `Feedback`, which is true when
the answer is right and prints, in Jupyter, what was checked and a hint for what is wrong.

Answers are checked against `veralab.reference`, the executable textbook; this module imports nothing else
of veralab. Floating-point answers are compared with a tolerance derived from the computation: a dot
product of n float32 terms is within about n · ε32 · Σ|terms| of the exact value, so an answer that
computes the same quantity in another order (or through another, equally valid, formula) passes, and a
wrong formula, which is off by the size of the terms themselves, does not.

    notebook 01   check_trainable_parameters   predict r + out and r · (in + out) over a model's layers
    notebook 02   check_projections            draw vera_A and vera_B from a key, as PEFT does
    notebook 03   check_slicing                the slices one layer uses, as views of the shared pair
    notebook 04   check_forward                the adapted layer's forward pass
    notebook 05   check_delta_weight           ΔW of a linear layer: what merging adds to its weight
    notebook 06   check_trainable_parameters   predict the count of a real model's configuration
    notebook 07   check_int8_roundtrip         int8 row-wise absmax quantization, and its error bound
    notebook 08   check_lora_export            a VeRA adapter as a LoRA pair (lora_A, lora_B)
    notebook 09   check_adapter_flops          the extra FLOPs of an unmerged adapted layer
    notebook 10   check_conv_delta_kernel      ΔW for a Conv2d kernel: what merging adds to it
    notebook 11   check_projection_groups      which adapters read the same pair
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from veralab import reference as ref

EPS32 = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Feedback:
    """The verdict of a checker: true when every case is right; `messages` say what was checked or wrong.

    Args:
        ok: whether the answer is right.
        messages: one line per finding, the first one a summary.
    """

    ok: bool
    messages: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return "\n".join(self.messages)

    __repr__ = __str__


def _wrong(problem: str, *hints: str) -> Feedback:
    return Feedback(False, ("Not yet: " + problem, *hints))


def _right(checked: str) -> Feedback:
    return Feedback(True, (f"Right: {checked}",))


def _call(function: Callable, *args):
    """The learner's function's result, or the message of what it raised."""
    try:
        return function(*args), None
    except Exception as error:  # any error of the learner's code becomes feedback, not a traceback
        return None, f"your function raised {type(error).__name__}: {error}"


def _mismatch(name: str, actual, expected64: torch.Tensor, magnitude: torch.Tensor, terms: int) -> str | None:
    """Why `actual` is not `expected64` (computed in float64) within float32 rounding, or None.

    Args:
        name: what the tensor is, for the message.
        actual: the learner's tensor.
        expected64: the exact value (float64).
        magnitude: Σ|terms| of each element (float64), the scale of its rounding error.
        terms: the most terms one element sums: each adds at most one ε32 of `magnitude`.
    """
    if not isinstance(actual, torch.Tensor):
        return f"{name} should be a torch.Tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected64.shape):
        return f"{name} has shape {tuple(actual.shape)}; expected {tuple(expected64.shape)}"
    error = (actual.detach().double() - expected64).abs()
    bound = ((terms + 2) * EPS32 * magnitude + torch.finfo(torch.float32).tiny).expand_as(error)
    worst = int((error / bound).argmax())
    if (error > bound).any():
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
        return (
            f"{name}{list(index)} is {float(actual.flatten()[worst]):.6g}, expected "
            f"{float(expected64.flatten()[worst]):.6g} (float32 rounding allows "
            f"{float(bound.reshape(-1)[worst]):.2g})"
        )
    return None


def _random_lambdas(r: int, out_features: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Non-zero λ_d (r) and λ_b (out): at init λ_b = 0 would hide most mistakes."""
    lambda_d = torch.rand(r, generator=generator) + 0.5
    lambda_b = torch.randn(out_features, generator=generator)
    return lambda_d, lambda_b


# notebook 01 and 06 -------------------------------------------------------------------------------------


def check_trainable_parameters(
    layers: Iterable[tuple[int, int]], r: int, *, vera: int | None = None, lora: int | None = None
) -> Feedback:
    """Check a prediction of the trainable parameters of VeRA (and LoRA) at rank `r` over `layers`.

    Args:
        layers: each adapted layer's weight shape, (out_features, in_features).
        r: the rank (the same for both methods, unless you check them separately).
        vera: your prediction of VeRA's count, or None.
        lora: your prediction of LoRA's count, or None.
    """
    layers = list(layers)
    if vera is None and lora is None:
        return Feedback(False, ("Not yet: pass your prediction as vera=... and/or lora=...",))
    problems = []
    expected_vera = sum(ref.vera_trainable_per_layer(out, r) for out, _ in layers)
    expected_lora = sum(ref.lora_trainable_per_layer(in_, out, r) for out, in_ in layers)
    if vera is not None and vera != expected_vera:
        problems.append(
            f"VeRA's count {vera:,} is off by {vera - expected_vera:+,}: each layer trains λ_d (r entries) "
            "and λ_b (one entry per output); the shared A and B are frozen"
        )
    if lora is not None and lora != expected_lora:
        problems.append(
            f"LoRA's count {lora:,} is off by {lora - expected_lora:+,}: each layer trains A (r × in) and "
            "B (out × r)"
        )
    checked = " and ".join(
        f"{name} trains {count:,} numbers"
        for name, count, given in (("VeRA", expected_vera, vera), ("LoRA", expected_lora, lora))
        if given is not None
    )
    if problems:
        return _wrong(*problems)
    return _right(f"{checked} over {len(layers)} layers at r = {r}")


# notebook 02 --------------------------------------------------------------------------------------------


def check_projections(init: Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]) -> Feedback:
    """Check `init(r, max_in, max_out, prng_key) -> (vera_A, vera_B)` bit for bit against PEFT's draw.

    Args:
        init: your function.
    """
    cases = [(4, 8, 6, 0), (16, 20, 100, 7), (3, 50, 5, 2024)]
    for r, max_in, max_out, key in cases:
        expected_A, expected_B = ref.init_projections(r, max_in, max_out, key)
        result, error = _call(init, r, max_in, max_out, key)
        if error:
            return _wrong(error)
        vera_A, vera_B = result
        call = f"init(r={r}, max_in={max_in}, max_out={max_out}, prng_key={key})"
        if tuple(vera_A.shape) != (r, max_in) or tuple(vera_B.shape) != (max_out, r):
            return _wrong(
                f"{call} gave shapes {tuple(vera_A.shape)}, {tuple(vera_B.shape)}; expected vera_A "
                f"(r, max_in) = {(r, max_in)} and vera_B (max_out, r) = {(max_out, r)}"
            )
        if not torch.equal(vera_A, expected_A):
            bound = float(expected_A.abs().max())
            return _wrong(
                f"{call}: vera_A differs; draw it first, Kaiming uniform on ±√(6 / max_in) "
                f"(here about ±{bound:.3f}), from torch.Generator().manual_seed(prng_key)"
            )
        if not torch.equal(vera_B, expected_B):
            return _wrong(
                f"{call}: vera_A is right but vera_B differs; draw B from the same generator right "
                "after A, with fan_in = r (its bound is √(6 / r))"
            )
    return _right(f"vera_A and vera_B equal PEFT's bits for {len(cases)} keys and shapes")


# notebook 03 --------------------------------------------------------------------------------------------


def check_slicing(
    slice_fn: Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]],
) -> Feedback:
    """Check `slice_fn(vera_A, vera_B, in_features, out_features) -> (A_s, B_s)`: values, and views.

    Args:
        slice_fn: your function.
    """
    vera_A, vera_B = ref.init_projections(r=8, max_in=50, max_out=100, prng_key=0)
    for out_features, in_features in [(100, 20), (80, 50), (1, 1)]:
        result, error = _call(slice_fn, vera_A, vera_B, in_features, out_features)
        if error:
            return _wrong(error)
        A_s, B_s = result
        expected_A, expected_B = ref.slice_projections(vera_A, vera_B, in_features, out_features)
        layer = f"a ({out_features} × {in_features}) layer"
        if tuple(A_s.shape) != tuple(expected_A.shape) or tuple(B_s.shape) != tuple(expected_B.shape):
            return _wrong(
                f"for {layer}: shapes {tuple(A_s.shape)}, {tuple(B_s.shape)}; expected A_s (r, in) = "
                f"{tuple(expected_A.shape)} and B_s (out, r) = {tuple(expected_B.shape)}"
            )
        if not (torch.equal(A_s, expected_A) and torch.equal(B_s, expected_B)):
            return _wrong(f"for {layer}: the values differ; take the top-left corners")
        shares = (
            A_s.untyped_storage().data_ptr() == vera_A.untyped_storage().data_ptr()
            and B_s.untyped_storage().data_ptr() == vera_B.untyped_storage().data_ptr()
        )
        if not shares:
            return _wrong(
                f"for {layer}: the values are right, but A_s and B_s are copies; slice them (vera_A[:, :in]) "
                "so every layer reads the one shared pair"
            )
    return _right("A_s and B_s are the top-left corners, as views of the shared pair")


# notebook 04 --------------------------------------------------------------------------------------------


def check_forward(forward: Callable[..., torch.Tensor]) -> Feedback:
    """Check `forward(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b) -> y` against the reference.

    Args:
        forward: your function; x is (..., in), weight (out, in), bias (out,) or None.
    """
    generator = torch.Generator().manual_seed(0)
    vera_A, vera_B = ref.init_projections(r=6, max_in=12, max_out=10, prng_key=1)
    for x_shape, (out_features, in_features), with_bias in [
        ((5, 12), (10, 12), True),
        ((2, 3, 7), (4, 7), False),
    ]:
        x = torch.randn(x_shape, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator)
        bias = torch.randn(out_features, generator=generator) if with_bias else None
        lambda_d, lambda_b = _random_lambdas(6, out_features, generator)
        result, error = _call(forward, x, weight, bias, vera_A, vera_B, lambda_d, lambda_b)
        if error:
            return _wrong(error)
        inputs = (x, weight, bias, vera_A, vera_B, lambda_d, lambda_b)
        exact = ref.vera_forward(*(t.double() if t is not None else None for t in inputs))
        magnitude = ref.vera_forward(*(t.double().abs() if t is not None else None for t in inputs))
        problem = _mismatch(f"y for x {tuple(x_shape)}", result, exact, magnitude, terms=in_features + 6 + 3)
        if problem:
            base = torch.nn.functional.linear(x, weight, bias)
            if (
                isinstance(result, torch.Tensor)
                and result.shape == base.shape
                and torch.allclose(result, base)
            ):
                problem += "; it equals the base layer alone: add λ_b ⊙ ((λ_d ⊙ (x A_sᵀ)) B_sᵀ)"
            return _wrong(problem)
    return _right("y = x W0ᵀ + b + λ_b ⊙ ((λ_d ⊙ (x A_sᵀ)) B_sᵀ), batched, with and without a bias")


# notebook 05 --------------------------------------------------------------------------------------------


def check_delta_weight(delta_weight: Callable[..., torch.Tensor]) -> Feedback:
    """Check `delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features) -> ΔW`.

    ΔW has the weight's shape (out_features, in_features): merging adds it to the layer's weight.

    Args:
        delta_weight: your function.
    """
    generator = torch.Generator().manual_seed(0)
    r = 6
    vera_A, vera_B = ref.init_projections(r, max_in=14, max_out=11, prng_key=2)
    for in_features, out_features in [(14, 11), (9, 4)]:
        lambda_d, lambda_b = _random_lambdas(r, out_features, generator)
        result, error = _call(delta_weight, vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)
        if error:
            return _wrong(error)
        args64 = (vera_A.double(), vera_B.double(), lambda_d.double(), lambda_b.double())
        exact = ref.delta_weight(*args64, in_features, out_features)
        magnitude = ref.delta_weight(*(a.abs() for a in args64), in_features, out_features)
        problem = _mismatch(f"ΔW of a ({out_features} × {in_features}) layer", result, exact, magnitude, r)
        if problem:
            return _wrong(
                problem,
                "ΔW = (λ_b[:, None] ⊙ B_s) (λ_d[:, None] ⊙ A_s), with A_s = vera_A[:, :in] and "
                "B_s = vera_B[:out, :]: (out, r) @ (r, in)",
            )
    return _right("ΔW = Λ_b B_s Λ_d A_s, (out, in), for two layer shapes")


def check_conv_delta_kernel(delta_kernel: Callable[..., torch.Tensor]) -> Feedback:
    """Check `delta_kernel(conv, vera_A, vera_B, lambda_d, lambda_b) -> ΔW` for Conv2d kernels.

    ΔW has the kernel's shape (out_channels, in_channels, kh, kw): merging adds it to `conv.weight`.

    Args:
        delta_kernel: your function.
    """
    generator = torch.Generator().manual_seed(0)
    r = 8
    for conv in (nn.Conv2d(3, 5, kernel_size=3), nn.Conv2d(2, 4, kernel_size=(1, 2), stride=2)):
        out_features, in_features = ref.conv_matrix_shape(conv)
        vera_A, vera_B = ref.init_projections(r, max_in=in_features + 3, max_out=out_features + 1, prng_key=3)
        lambda_d, lambda_b = _random_lambdas(r, out_features, generator)
        result, error = _call(delta_kernel, conv, vera_A, vera_B, lambda_d, lambda_b)
        if error:
            return _wrong(error)
        args64 = (vera_A.double(), vera_B.double(), lambda_d.double(), lambda_b.double())
        exact = ref.conv_delta_kernel(conv, *args64)  # conv gives the shapes only
        magnitude = ref.conv_delta_kernel(conv, *(a.abs() for a in args64))
        problem = _mismatch(f"ΔW of {conv}", result, exact, magnitude, terms=r)
        if problem:
            return _wrong(
                problem,
                "the kernel (out, in, kh, kw) is the matrix (out, in · kh · kw): compute ΔW for that "
                "matrix as for a linear layer, then reshape it to the kernel's shape",
            )
    return _right("ΔW = Λ_b B_s Λ_d A_s, reshaped to the kernel, for two Conv2d layers")


# notebook 07 --------------------------------------------------------------------------------------------


def check_int8_roundtrip(roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> Feedback:
    """Check `roundtrip(weight) -> dequantized weight`: int8 row-wise absmax, as LLM.int8() stores weights.

    Each row is scaled by its largest magnitude so that it maps to [-127, 127], rounded to integers, and
    scaled back: every weight comes back within rowmax / 254 (half a step), on 255 levels per row.

    Args:
        roundtrip: your function; weight is (out, in) float32.
    """
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    weight[2] *= 100  # rows of very different scales: one scale per row is the point
    result, error = _call(roundtrip, weight.clone())
    if error:
        return _wrong(error)
    rowmax = weight.abs().amax(dim=1, keepdim=True).double()
    exact = torch.round(weight.double() / rowmax * 127) * rowmax / 127
    problem = _mismatch("the dequantized weight", result, exact, rowmax, terms=4)
    if problem:
        hint = "scale each row by 127 / rowmax (rowmax = its largest |w|), round, then multiply back"
        if isinstance(result, torch.Tensor) and result.shape == weight.shape:
            error_ratio = float(((result.double() - weight.double()).abs() / rowmax).max() * 254)
            hint += f"; your largest error is {error_ratio:.2f} × rowmax / 254 (at most 1 is possible)"
        return _wrong(problem, hint)
    return _right("int8 row-wise absmax: within rowmax / 254 of every weight, one scale per row")


# notebook 08 --------------------------------------------------------------------------------------------


def check_lora_export(export: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Feedback:
    """Check `export(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features) -> (lora_A, lora_B)`.

    A VeRA layer is a LoRA layer with lora_A (r, in) and lora_B (out, r) whose product lora_B @ lora_A is
    VeRA's ΔW (LoRA's alpha = r, so its scaling is 1).

    Args:
        export: your function.
    """
    generator = torch.Generator().manual_seed(0)
    r, in_features, out_features = 5, 9, 7
    vera_A, vera_B = ref.init_projections(r, max_in=12, max_out=8, prng_key=4)
    lambda_d, lambda_b = _random_lambdas(r, out_features, generator)
    result, error = _call(export, vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)
    if error:
        return _wrong(error)
    lora_A, lora_B = result
    if tuple(lora_A.shape) != (r, in_features) or tuple(lora_B.shape) != (out_features, r):
        return _wrong(
            f"shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)}; LoRA's A is (r, in) = {(r, in_features)} "
            f"and its B (out, r) = {(out_features, r)}"
        )
    args64 = (vera_A.double(), vera_B.double(), lambda_d.double(), lambda_b.double())
    exact = ref.delta_weight(*args64, in_features, out_features)
    magnitude = ref.delta_weight(*(a.abs() for a in args64), in_features, out_features)
    problem = _mismatch("lora_B @ lora_A", lora_B @ lora_A, exact, magnitude, terms=r)
    if problem:
        return _wrong(problem, "scale A_s's rows by λ_d and B_s's rows by λ_b")
    return _right("lora_B @ lora_A is VeRA's ΔW: PEFT's LoRA layer computes the same output")


# notebook 09 --------------------------------------------------------------------------------------------


def adapter_flops(n_tokens: int, in_features: int, out_features: int, r: int) -> int:
    """The FLOPs of the adapter term of one unmerged forward pass, counted by PyTorch on the reference.

    The adapted layer's FLOPs minus the base layer's, as `torch.utils.flop_counter.FlopCounterMode` counts
    them (matrix products only: 2 FLOPs a multiply-add).

    Args:
        n_tokens: rows of the input.
        in_features: the layer's input size.
        out_features: the layer's output size.
        r: the rank.
    """
    x = torch.zeros(n_tokens, in_features)
    weight = torch.zeros(out_features, in_features)
    vera_A, vera_B = torch.zeros(r, in_features), torch.zeros(out_features, r)
    lambda_d, lambda_b = torch.zeros(r), torch.zeros(out_features)
    with FlopCounterMode(display=False) as adapted:
        ref.vera_forward(x, weight, None, vera_A, vera_B, lambda_d, lambda_b)
    with FlopCounterMode(display=False) as base:
        nn.functional.linear(x, weight)
    return adapted.get_total_flops() - base.get_total_flops()


def check_adapter_flops(predict: Callable[[int, int, int, int], int]) -> Feedback:
    """Check `predict(n_tokens, in_features, out_features, r)`: the adapter's extra FLOPs, unmerged.

    Args:
        predict: your formula, as a function.
    """
    cases: Sequence[tuple[int, int, int, int]] = [(1, 8, 8, 4), (16, 64, 32, 8), (100, 7, 300, 256)]
    for case in cases:
        result, error = _call(predict, *case)
        if error:
            return _wrong(error)
        counted = adapter_flops(*case)
        if result != counted:
            n, in_features, out_features, r = case
            return _wrong(
                f"for N={n} tokens, in={in_features}, out={out_features}, r={r}, you predict {result:,} "
                f"FLOPs; PyTorch counts {counted:,}. Two matmuls: (N × in) by (in × r), then (N × r) by "
                "(r × out), at 2 FLOPs a multiply-add; the λ scalings are not matmuls"
            )
    return _right(f"your formula matches PyTorch's FLOP count in {len(cases)} cases")


# notebook 11 --------------------------------------------------------------------------------------------


def check_projection_groups(
    adapters: dict[str, tuple[int, list[tuple[int, int]], int]], groups: Iterable[Iterable[str]]
) -> Feedback:
    """Check which adapters read the same pair: `groups` lists the names of each group.

    An adapter reads the pair `init_projections(r, max_in, max_out, prng_key)` draws over its own targets
    (what it would read alone); adapters whose four numbers agree read one shared pair.

    Args:
        adapters: {name: (r, the (out, in) shapes of its target layers, projection_prng_key)}.
        groups: your answer: one collection of names per pair.
    """
    numbers = {}
    for name, (r, shapes, key) in adapters.items():
        max_in, max_out = ref.find_max_dims(shapes)
        numbers[name] = (r, max_in, max_out, key)
    answer = [set(group) for group in groups]
    named = [name for group in answer for name in group]
    unknown = sorted(set(named) - set(adapters))
    if unknown:
        return _wrong(f"{unknown} are not among the adapters {sorted(adapters)}")
    if sorted(named) != sorted(adapters):
        missing = sorted(set(adapters) - set(named))
        twice = sorted({name for name in named if named.count(name) > 1})
        return _wrong(f"every adapter belongs to exactly one group: missing {missing}, listed twice {twice}")
    problems = []
    for group in answer:
        ordered = sorted(group)
        for name in ordered[1:]:
            if numbers[name] != numbers[ordered[0]]:
                problems.append(
                    f"{ordered[0]} and {name} read different pairs: (r, max_in, max_out, key) "
                    f"{numbers[ordered[0]]} and {numbers[name]}"
                )
    for first, second in ((a, b) for a in adapters for b in adapters if a < b):
        apart = not any(first in group and second in group for group in answer)
        if apart and numbers[first] == numbers[second]:
            problems.append(f"{first} and {second} read the same pair: both {numbers[first]}")
    if problems:
        return _wrong(*problems)
    return _right(f"{len(answer)} pairs for {len(adapters)} adapters, one per (r, max_in, max_out, key)")
