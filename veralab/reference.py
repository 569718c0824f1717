r"""VeRA, the executable textbook.

Kopiczko, Blankevoort, Asano. "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024.
https://arxiv.org/abs/2310.11454

LoRA adapts a frozen weight W0 (out x in) with a trained low-rank product, h = W0 x + B A x.
VeRA freezes A and B too. One pair of random matrices is drawn once and *shared by every adapted
layer*; each layer trains only two scaling vectors:

    h = W0 x + Λ_b B Λ_d A x,        Λ_b = diag(λ_b) (out),   Λ_d = diag(λ_d) (r)

so a layer costs r + out trainable numbers instead of LoRA's r (in + out).

This module reads top to bottom in the paper's order, numbered like the notebooks:

    §1 the shared random projections (Kaiming uniform from a seeded generator)
    §2 one pair for layers of many shapes: max-dim sizing and slicing
    §3 lambda scaling: the forward pass
    §4 merging the adapter into the weight, and back
    §5 the layer: VeraLinear

Everything is float32 and plain PyTorch on purpose: this is the ground truth `veralab.fast` is tested
against, so it favours clarity over speed. It never imports `veralab.fast`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------
# §1 The shared random projections
# ---------------------------------------------------------------------------------------------------
# A and B are never trained, so they only need to be *reproducible*: they are drawn from a CPU
# generator seeded with `projection_prng_key`. The distribution is Kaiming (He) uniform, the default
# init of nn.Linear's successors: for a matrix with `fan_in` columns,
#
#     gain  = sqrt(2)                      (ReLU gain)
#     std   = gain / sqrt(fan_in)
#     bound = sqrt(3) * std                (a uniform on [-b, b] has std b / sqrt(3))
#     M ~ U(-bound, bound)


def kaiming_init(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Draw a (rows, fan_in) float32 matrix from Kaiming uniform with the given generator."""
    rows, fan_in = shape
    gain = math.sqrt(2.0)
    std = gain / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std
    matrix = torch.empty(rows, fan_in)  # (rows, fan_in)
    # uniform_ consumes the generator's stream in order; this is what makes A, B reproducible.
    return matrix.uniform_(-bound, bound, generator=generator)


def init_projections(r: int, max_in: int, max_out: int, prng_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair: A (r x max_in) drawn first, then B (max_out x r), from one seeded CPU generator.

    The order matters: B's values are the generator's stream *after* A's r * max_in draws, so
    the same key gives the same matrices only if A is drawn first (as PEFT does).
    """
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_A = kaiming_init((r, max_in), generator)  # (r, max_in), fan_in = max_in
    vera_B = kaiming_init((max_out, r), generator)  # (max_out, r), fan_in = r
    return vera_A, vera_B


# ---------------------------------------------------------------------------------------------------
# §2 One pair for layers of many shapes: max-dim sizing and slicing
# ---------------------------------------------------------------------------------------------------
# A model's layers differ in shape (q_proj is 768 x 768, an MLP up-projection 3072 x 768, ...).
# VeRA sizes the single shared pair for the largest input and the largest output over all adapted
# layers, and each layer uses the top-left corner it needs:
#
#     A_s = A[:, :in]      (r, in)
#     B_s = B[:out, :]     (out, r)
#
# Slicing is a view: no layer owns a copy.


def find_max_dims(shapes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """Largest (out_features, in_features) over the (out, in) weight shapes of the adapted layers."""
    shapes = list(shapes)
    if not shapes:
        raise ValueError("find_max_dims needs at least one (out_features, in_features) shape")
    max_out = max(out for out, _ in shapes)
    max_in = max(in_ for _, in_ in shapes)
    return max_out, max_in


def slice_projections(
    vera_A: torch.Tensor, vera_B: torch.Tensor, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The views of the shared pair one (out_features x in_features) layer uses."""
    r, max_in = vera_A.shape
    max_out, r_b = vera_B.shape
    if r != r_b:
        raise ValueError(f"vera_A has rank {r} but vera_B has rank {r_b}")
    if in_features > max_in or out_features > max_out:
        raise ValueError(
            f"a ({out_features} x {in_features}) layer does not fit the shared projections "
            f"sized ({max_out} x {max_in}); size them with find_max_dims over every adapted layer"
        )
    A_s = vera_A[:, :in_features]  # (r, in)
    B_s = vera_B[:out_features, :]  # (out, r)
    return A_s, B_s


# ---------------------------------------------------------------------------------------------------
# §3 Lambda scaling: the forward pass
# ---------------------------------------------------------------------------------------------------
# For an input x (..., in):
#
#     h     = x A_s^T              (..., r)     project into the shared random subspace
#     h_d   = λ_d ⊙ h              (..., r)     scale each random direction (trained)
#     u     = h_d B_s^T            (..., out)   lift back with the shared random B
#     delta = λ_b ⊙ u              (..., out)   scale each output feature (trained)
#     y     = x W0^T + bias + delta
#
# At init λ_b = 0, so delta = 0 and the adapted layer *is* the base layer; λ_d starts at d_initial
# (0.1 by default), which sets the scale of λ_b's first gradient: dL/dλ_b = u ⊙ dL/dy with u ∝ λ_d.
# Dropout, when used, applies to the adapter's input only.


def vera_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = x W^T + bias + λ_b ⊙ ((λ_d ⊙ (dropout(x) A_s^T)) B_s^T), with A_s, B_s sliced for W."""
    out_features, in_features = weight.shape  # W: (out, in)
    A_s, B_s = slice_projections(vera_A, vera_B, in_features, out_features)
    base = nn.functional.linear(x, weight, bias)  # (..., out)
    x_adapter = dropout(x) if dropout is not None else x
    h = x_adapter @ A_s.T  # (..., r)
    h_d = lambda_d * h  # (..., r)
    u = h_d @ B_s.T  # (..., out)
    delta = lambda_b * u  # (..., out)
    return base + delta


# ---------------------------------------------------------------------------------------------------
# §4 Merging the adapter into the weight, and back
# ---------------------------------------------------------------------------------------------------
# Without dropout the adapter is linear in x, so it folds into the weight:
#
#     λ_b ⊙ (B_s (λ_d ⊙ (A_s x))) = (Λ_b B_s Λ_d A_s) x = ΔW x,   ΔW = (λ_b[:, None] B_s) (λ_d[:, None] A_s)
#
# Merged inference then costs exactly the base layer; unmerging subtracts the same ΔW.


def delta_weight(
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """ΔW = Λ_b B_s Λ_d A_s, shape (out_features, in_features)."""
    A_s, B_s = slice_projections(vera_A, vera_B, in_features, out_features)
    scaled_B = lambda_b[:, None] * B_s  # (out, r): row o scaled by λ_b[o]
    scaled_A = lambda_d[:, None] * A_s  # (r, in):  row k scaled by λ_d[k]
    return scaled_B @ scaled_A  # (out, in)


def merge(
    weight: torch.Tensor, vera_A: torch.Tensor, vera_B: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor
) -> torch.Tensor:
    """W0 + ΔW: the weight of a plain linear layer that computes the adapted layer."""
    out_features, in_features = weight.shape
    return weight + delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)


def unmerge(
    merged_weight: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
) -> torch.Tensor:
    """(W0 + ΔW) - ΔW: the base weight back (up to float rounding)."""
    out_features, in_features = merged_weight.shape
    return merged_weight - delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)


# ---------------------------------------------------------------------------------------------------
# §5 The layer: VeraLinear
# ---------------------------------------------------------------------------------------------------
# A frozen nn.Linear plus the two trained vectors. The shared pair is *referenced*, not copied: every
# VeraLinear built with the same vera_A / vera_B tensors reads the same storage. Parameter names follow
# PEFT (vera_lambda_d, vera_lambda_b) so state dicts move between the reference, veralab.fast and PEFT.


class VeraLinear(nn.Module):
    """A frozen linear layer adapted with VeRA (single adapter, float32, for reading and testing).

    Args:
        base_layer: the nn.Linear to adapt; its weight and bias are frozen.
        vera_A: the shared (r, max_in) projection.
        vera_B: the shared (max_out, r) projection.
        d_initial: initial value of every λ_d entry.
        vera_dropout: dropout probability on the adapter's input.
        init_weights: True gives λ_b = 0 (the layer starts as the base layer); False draws random
            non-zero λ_b and λ_d from the global torch RNG, so tests see every term at work.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        vera_A: torch.Tensor,
        vera_B: torch.Tensor,
        d_initial: float = 0.1,
        vera_dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        slice_projections(vera_A, vera_B, self.in_features, self.out_features)  # fails early if too small
        r = vera_A.shape[0]
        # Shared and frozen: registered as non-persistent buffers so .to() moves them but each layer's
        # state dict holds only what the layer owns.
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        if init_weights:
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))  # (r,)
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))  # (out,)
        else:
            self.vera_lambda_d = nn.Parameter(torch.randn(r))
            self.vera_lambda_b = nn.Parameter(torch.randn(self.out_features))
        self.vera_dropout = nn.Dropout(vera_dropout) if vera_dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(
            self.vera_A, self.vera_B, self.vera_lambda_d, self.vera_lambda_b, self.in_features, self.out_features
        )

    def merge(self) -> None:
        """Fold ΔW into the base weight; forward then costs exactly the base layer."""
        if self.merged:
            raise RuntimeError("VeraLinear is already merged; unmerge() first")
        with torch.no_grad():
            self.base_layer.weight.copy_(
                merge(self.base_layer.weight, self.vera_A, self.vera_B, self.vera_lambda_d, self.vera_lambda_b)
            )
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW again, restoring the base weight."""
        if not self.merged:
            raise RuntimeError("VeraLinear is not merged; there is nothing to unmerge")
        with torch.no_grad():
            self.base_layer.weight.copy_(
                unmerge(self.base_layer.weight, self.vera_A, self.vera_B, self.vera_lambda_d, self.vera_lambda_b)
            )
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return vera_forward(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.vera_A,
            self.vera_B,
            self.vera_lambda_d,
            self.vera_lambda_b,
            dropout=self.vera_dropout,
        )
