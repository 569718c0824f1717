r"""VeRA, the executable textbook.

Kopiczko, Blankevoort, Asano. "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024.
https://arxiv.org/abs/2310.11454
Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
https://arxiv.org/abs/2106.09685

LoRA adapts a frozen weight W0 (out x in) with a trained low-rank product B A. VeRA freezes A and B too:
one pair of random matrices is drawn once and *shared by every adapted layer*, and each layer trains only
two scaling vectors. For one input vector x (in):

    y = W0 x + Λ_b B_s Λ_d A_s x        Λ_d = diag(λ_d), λ_d (r)      Λ_b = diag(λ_b), λ_b (out)

where A_s (r x in) and B_s (out x r) are the layer's slices of the shared pair. The paper writes h for the
layer's output; here (and in `veralab.fast`) y is the output and h = x A_s^T (..., r) is the input projected
into the random subspace. Code works on batches of row vectors x (..., in), as PyTorch does, and weights have
PyTorch's (out, in) shape, so the same layer reads y = x W0^T + b + λ_b ⊙ ((λ_d ⊙ (x A_s^T)) B_s^T).

The file reads top to bottom in the paper's order. Sections §1 to §5 are the concept notebooks 01 to 05, one
for one; §6 assembles them into a layer; §7 and §8 carry the same mechanism to the layers the paper leaves
out, embedding tables and convolutions (notebook 10):

    §1 what VeRA trains: the parameter count of one layer     notebook 01_why_vera
    §2 the shared random projections                          notebook 02_shared_random_projections
    §3 one pair for every shape: max-dim sizing and slicing   notebook 03_max_dim_slicing
    §4 lambda scaling: the forward pass                       notebook 04_lambda_scaling_forward
    §5 merging the adapter into the weight, and back          notebook 05_merge_and_unmerge
    §6 the layer: SharedProjections and VeraLinear            used by notebooks 04 and 05
    §7 beyond linear layers: embeddings (VeraEmbedding)       notebook 10_beyond_linear_layers
    §8 beyond linear layers: convolutions (VeraConv)          notebook 10_beyond_linear_layers

Each section's mathematics is in the docstring of its first function. Everything is plain PyTorch in float32
on purpose: this is the ground truth `veralab.fast` is tested against, so it favours clarity over speed. It
imports nothing of veralab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------
# §1 What VeRA trains: the parameter count of one layer (notebook 01)
# ---------------------------------------------------------------------------------------------------


def vera_trainable_per_layer(out_features: int, r: int) -> int:
    r"""VeRA's trainable numbers in one adapted layer: r + out.

    §1 What VeRA trains (notebook 01). For a frozen weight W0 (out x in), LoRA and VeRA add

        LoRA:  W0 + B A                B (out x r), A (r x in) trained         r · (in + out) numbers
        VeRA:  W0 + Λ_b B_s Λ_d A_s    λ_d (r), λ_b (out) trained;             r + out        numbers
                                       A_s, B_s frozen slices of a shared pair

    LoRA's count, $r\,(\mathrm{in} + \mathrm{out})$, grows with the rank *times* the layer's width; VeRA's,
    $r + \mathrm{out}$, with the rank *plus* the width, so VeRA affords ranks of 256 to 1024. The shared pair
    is drawn once per model (§2) and is not trained.

    Args:
        out_features: the layer's output size (λ_b has one entry per output).
        r: the rank of the shared projections (λ_d has one entry per random direction).
    """
    return r + out_features  # λ_d (r) + λ_b (out)


def lora_trainable_per_layer(in_features: int, out_features: int, r: int) -> int:
    """LoRA's trainable numbers in one adapted layer: r · (in + out), for comparison.

    Args:
        in_features: the layer's input size (A is r x in).
        out_features: the layer's output size (B is out x r).
        r: LoRA's rank.
    """
    return r * (in_features + out_features)  # A (r, in) + B (out, r)


# ---------------------------------------------------------------------------------------------------
# §2 The shared random projections (notebook 02)
# ---------------------------------------------------------------------------------------------------


def kaiming_init(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    r"""Draw a (rows, fan_in) float32 matrix from Kaiming (He) uniform with ReLU gain, from `generator`.

    §2 The shared random projections (notebook 02). A and B are never trained, so they only need to be
    *reproducible*: both are drawn from one CPU generator seeded with `projection_prng_key`
    (`init_projections`). VeRA, and PEFT whose bits we reproduce, draw Kaiming uniform with the ReLU gain,
    for a matrix M with `fan_in` columns:

        gain  = √2                          the ReLU gain
        std   = gain / √fan_in
        bound = √3 · std = √(6 / fan_in)    a uniform on [-b, b] has std b / √3
        M ~ U(-bound, bound)                (rows, fan_in)

    These are exactly the numbers of `torch.nn.init.kaiming_uniform_(M, nonlinearity="relu",
    generator=generator)`. They are *not* nn.Linear's default: nn.Linear initialises its weight with
    `kaiming_uniform_(weight, a=√5)`, a leaky-ReLU gain √(2 / (1 + 5)) = √(1/3), so its bound is
    1 / √fan_in, √6 ≈ 2.45 times narrower than the projections'.

    Args:
        shape: (rows, fan_in) of the matrix to draw.
        generator: the seeded CPU generator; the draw consumes rows · fan_in values of its stream.
    """
    rows, fan_in = shape
    gain = math.sqrt(2.0)  # ReLU gain
    std = gain / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std  # = √(6 / fan_in)
    matrix = torch.empty(rows, fan_in)  # (rows, fan_in)
    # uniform_ consumes the generator's stream in order, row by row: this is what makes A, B reproducible.
    return matrix.uniform_(-bound, bound, generator=generator)


def init_projections(r: int, max_in: int, max_out: int, prng_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair: vera_A (r, max_in) drawn first, then vera_B (max_out, r), from one seeded generator.

    The order matters: B's values are the generator's stream *after* A's r · max_in draws, so the same key
    gives the same matrices only if A is drawn first (as PEFT does). The sizes matter as much: A is filled
    row by row, so the first columns of a wider draw are not a narrower draw. `find_max_dims` (§3) gives the
    sizes.

    Args:
        r: the rank: rows of vera_A, columns of vera_B.
        max_in: the largest in_features over the adapted layers (columns of vera_A).
        max_out: the largest out_features over the adapted layers (rows of vera_B).
        prng_key: the generator's seed (PEFT's `projection_prng_key`).
    """
    generator = torch.Generator(device="cpu").manual_seed(prng_key)
    vera_A = kaiming_init((r, max_in), generator)  # (r, max_in), fan_in = max_in
    vera_B = kaiming_init((max_out, r), generator)  # (max_out, r), fan_in = r
    return vera_A, vera_B


# ---------------------------------------------------------------------------------------------------
# §3 One pair for every shape: max-dim sizing and slicing (notebook 03)
# ---------------------------------------------------------------------------------------------------


def find_max_dims(shapes: Iterable[tuple[int, int]]) -> MaxDims:
    r"""Size the shared pair for all adapted layers: MaxDims(max_in, max_out) from their (out, in) weights.

    §3 One pair for every shape (notebook 03). A model's layers differ in shape (q_proj 768 x 768, an MLP
    up-projection 3072 x 768, ...). VeRA sizes the one shared pair for the largest input and the largest
    output over all adapted layers, and each layer uses the top-left corner it needs (`slice_projections`):

        max_in  = max over layers of in_features       vera_A (r, max_in)
        max_out = max over layers of out_features      vera_B (max_out, r)
        A_s = vera_A[:, :in]                           (r, in)
        B_s = vera_B[:out, :]                          (out, r)

    The slices are views: every layer reads the one pair, none owns a copy. PEFT's documented example: layers
    of (out, in) shapes (100, 20) and (80, 50) give MaxDims(max_in=50, max_out=100).

    Args:
        shapes: each layer's weight shape in PyTorch's (out_features, in_features) order, e.g.
            `linear.weight.shape`. The result is in the other order, (max_in, max_out), the order
            `init_projections` takes.
    """
    shapes = list(shapes)
    if not shapes:
        raise ValueError("find_max_dims needs the (out_features, in_features) shape of at least one layer")
    max_in = max(in_features for _, in_features in shapes)
    max_out = max(out_features for out_features, _ in shapes)
    return MaxDims(max_in=max_in, max_out=max_out)


class MaxDims(NamedTuple):
    """The size of the shared pair, vera_A (r, max_in) and vera_B (max_out, r): in before out.

    Its order matches `init_projections(r, max_in, max_out, prng_key)`, so
    `init_projections(r, *find_max_dims(shapes), prng_key)` is correct; reading the fields by name is clearer.
    """

    max_in: int
    max_out: int


def slice_projections(
    vera_A: torch.Tensor, vera_B: torch.Tensor, in_features: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The views A_s = vera_A[:, :in] (r, in) and B_s = vera_B[:out, :] (out, r) one (out x in) layer uses.

    Args:
        vera_A: the shared (r, max_in) projection.
        vera_B: the shared (max_out, r) projection.
        in_features: the layer's input size.
        out_features: the layer's output size.
    """
    r, max_in = vera_A.shape
    max_out, r_b = vera_B.shape
    if r != r_b:
        raise ValueError(f"vera_A has rank {r} but vera_B has rank {r_b}")
    if in_features > max_in or out_features > max_out:
        raise ValueError(
            f"a ({out_features} x {in_features}) layer does not fit the shared projections sized ({max_out} "
            f"x {max_in}); size them with find_max_dims over every adapted layer"
        )
    A_s = vera_A[:, :in_features]  # (r, in): a view
    B_s = vera_B[:out_features, :]  # (out, r): a view
    return A_s, B_s


# ---------------------------------------------------------------------------------------------------
# §4 Lambda scaling: the forward pass (notebook 04)
# ---------------------------------------------------------------------------------------------------


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
    r"""The adapted layer's output y = x W0^T + b + λ_b ⊙ ((λ_d ⊙ (x A_s^T)) B_s^T), one step at a time.

    §4 Lambda scaling (notebook 04). For an input x (..., in) and the layer's slices A_s (r, in),
    B_s (out, r) of the shared pair:

        h   = x A_s^T               (..., r)     project into the shared random subspace
        h_d = λ_d ⊙ h               (..., r)     scale each random direction (λ_d trained)
        u   = h_d B_s^T             (..., out)   lift back with the shared random B
        δ   = λ_b ⊙ u               (..., out)   scale each output feature (λ_b trained)
        y   = x W0^T + b + δ        (..., out)

    In one line:

    $$
    y = x W_0^\top + b + \lambda_b \odot \big((\lambda_d \odot (x A_s^\top))\, B_s^\top\big)
    $$

    At init λ_b = 0, so δ = 0 and the adapted layer *is* the base layer; λ_d starts at d_initial (0.1 by
    default), which sets the scale of λ_b's first gradient: ∂L/∂λ_b = Σ_rows u ⊙ ∂L/∂y, with u ∝ λ_d.
    λ_d's own first gradient is 0, being scaled by λ_b. Dropout, when used, applies to the adapter's input
    only: h = dropout(x) A_s^T, while the base layer reads x.

    Args:
        x: the input, (..., in).
        weight: the frozen W0, (out, in).
        bias: the frozen b, (out,), or None.
        vera_A: the shared (r, max_in) projection; sliced here to the layer's in.
        vera_B: the shared (max_out, r) projection; sliced here to the layer's out.
        lambda_d: λ_d, (r,).
        lambda_b: λ_b, (out,).
        dropout: applied to the adapter's input, or None.
    """
    out_features, in_features = weight.shape  # W0: (out, in)
    A_s, B_s = slice_projections(vera_A, vera_B, in_features, out_features)
    base = nn.functional.linear(x, weight, bias)  # x W0^T + b: (..., out)
    x_adapter = dropout(x) if dropout is not None else x  # (..., in)
    h = x_adapter @ A_s.T  # (..., r)
    h_d = lambda_d * h  # (..., r)
    u = h_d @ B_s.T  # (..., out)
    delta = lambda_b * u  # (..., out)
    return base + delta


# ---------------------------------------------------------------------------------------------------
# §5 Merging the adapter into the weight, and back (notebook 05)
# ---------------------------------------------------------------------------------------------------


def delta_weight(
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    r"""The adapter as one matrix: ΔW = Λ_b B_s Λ_d A_s, shape (out_features, in_features).

    §5 Merging (notebook 05). Without dropout the adapter is linear in x, so it folds into the weight:

        δ = λ_b ⊙ ((λ_d ⊙ (x A_s^T)) B_s^T) = x ΔW^T
        ΔW = Λ_b B_s Λ_d A_s = (λ_b[:, None] ⊙ B_s) (λ_d[:, None] ⊙ A_s)     (out, r) @ (r, in) = (out, in)

    (row o of B_s scaled by λ_b[o], row k of A_s by λ_d[k]), that is

    $$
    \Delta W = \Lambda_b B_s \Lambda_d A_s, \qquad \Lambda_b = \mathrm{diag}(\lambda_b), \quad
    \Lambda_d = \mathrm{diag}(\lambda_d).
    $$

    Merged, y = x (W0 + ΔW)^T + b costs exactly the base layer; unmerging subtracts the same ΔW, which
    restores W0 up to float rounding.

    Args:
        vera_A: the shared (r, max_in) projection.
        vera_B: the shared (max_out, r) projection.
        lambda_d: λ_d, (r,).
        lambda_b: λ_b, (out,).
        in_features: the layer's input size.
        out_features: the layer's output size.
    """
    A_s, B_s = slice_projections(vera_A, vera_B, in_features, out_features)
    scaled_B = lambda_b[:, None] * B_s  # (out, r): row o scaled by λ_b[o]
    scaled_A = lambda_d[:, None] * A_s  # (r, in):  row k scaled by λ_d[k]
    return scaled_B @ scaled_A  # (out, in)


def merge(
    weight: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
) -> torch.Tensor:
    """W0 + ΔW, (out, in): the weight of a plain linear layer that computes the adapted layer."""
    out_features, in_features = weight.shape
    return weight + delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)


def unmerge(
    merged_weight: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
) -> torch.Tensor:
    """(W0 + ΔW) - ΔW, (out, in): the base weight back (up to float rounding)."""
    out_features, in_features = merged_weight.shape
    return merged_weight - delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)


# ---------------------------------------------------------------------------------------------------
# §6 The layer: SharedProjections and VeraLinear
# ---------------------------------------------------------------------------------------------------


class SharedProjections(nn.Module):
    r"""The one pair vera_A (r, max_in), vera_B (max_out, r) that every VeraLinear of a model reads.

    §6 The layer. Every adapted layer holds this *same* module, so the pair exists once in memory whatever
    the number of layers. `model.to(...)`, `.double()` and the like replace the module's two buffers, and
    since the layers hold the module, not its tensors, they all read the one converted pair. The buffers are
    non-persistent: they follow the model's device and dtype, but no layer's state dict holds them (a model
    saves the pair once, if at all). Converting one layer alone converts the pair for every layer holding it.

    Args:
        vera_A: the shared (r, max_in) projection.
        vera_B: the shared (max_out, r) projection.
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)  # (r, max_in)
        self.register_buffer("vera_B", vera_B, persistent=False)  # (max_out, r)

    def extra_repr(self) -> str:
        return f"vera_A={tuple(self.vera_A.shape)}, vera_B={tuple(self.vera_B.shape)}"


class VeraLinear(nn.Module):
    """A frozen linear layer adapted with VeRA (single adapter, float32, for reading and testing).

    The layer owns only its two trained vectors; the pair is *referenced* through the shared module.
    Parameter names follow PEFT (`vera_lambda_d`, `vera_lambda_b`), so state dicts move between the
    reference, `veralab.fast` and PEFT.

    Args:
        base_layer: the nn.Linear to adapt; its weight and bias are frozen.
        projections: the model's `SharedProjections`, the same object for every adapted layer.
        d_initial: initial value of every λ_d entry.
        vera_dropout: dropout probability on the adapter's input.
        init_weights: True gives λ_b = 0 (the layer starts as the base layer); False draws random
            non-zero λ_b and λ_d from the global torch RNG, so tests see every term at work.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        projections: SharedProjections,
        *,
        d_initial: float = 0.1,
        vera_dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(projections, SharedProjections):
            raise TypeError(
                "VeraLinear takes the shared pair as one SharedProjections module, got "
                f"{type(projections).__name__}; build it once per model with SharedProjections(vera_A, "
                "vera_B) and pass the same module to every layer"
            )
        self.base_layer = base_layer.requires_grad_(False)
        self.projections = projections  # the same module in every layer: one pair in memory
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        # Fails early, naming the layer's shape, if the pair was sized without this layer.
        slice_projections(projections.vera_A, projections.vera_B, self.in_features, self.out_features)
        r = projections.vera_A.shape[0]
        if init_weights:
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))  # (r,)
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))  # (out,): starts as the base
        else:
            self.vera_lambda_d = nn.Parameter(torch.randn(r))  # (r,)
            self.vera_lambda_b = nn.Parameter(torch.randn(self.out_features))  # (out,)
        self.vera_dropout = nn.Dropout(vera_dropout) if vera_dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW = Λ_b B_s Λ_d A_s, (out, in)."""
        return delta_weight(
            self.projections.vera_A,
            self.projections.vera_B,
            self.vera_lambda_d,
            self.vera_lambda_b,
            self.in_features,
            self.out_features,
        )

    def merge(self) -> None:
        """Fold ΔW into the base weight; forward then costs exactly the base layer."""
        if self.merged:
            raise RuntimeError("VeraLinear is already merged; unmerge() first")
        A, B = self.projections.vera_A, self.projections.vera_B
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(merge(weight, A, B, self.vera_lambda_d, self.vera_lambda_b))  # W0 + ΔW
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW again, restoring the base weight."""
        if not self.merged:
            raise RuntimeError("VeraLinear is not merged; there is nothing to unmerge")
        A, B = self.projections.vera_A, self.projections.vera_B
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(unmerge(weight, A, B, self.vera_lambda_d, self.vera_lambda_b))  # (W0 + ΔW) - ΔW
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W0^T + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) A_s^T)) B_s^T), or x (W0 + ΔW)^T + b once merged.

        Args:
            x: the input, (..., in).
        """
        if self.merged:
            return self.base_layer(x)
        return vera_forward(
            x,
            self.base_layer.weight,
            self.base_layer.bias,
            self.projections.vera_A,
            self.projections.vera_B,
            self.vera_lambda_d,
            self.vera_lambda_b,
            dropout=self.vera_dropout,
        )


# ---------------------------------------------------------------------------------------------------
# §7 Beyond linear layers: embeddings (notebook 10)
# ---------------------------------------------------------------------------------------------------


def embedding_forward(
    ids: torch.Tensor,
    table: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    padding_idx: int | None = None,
) -> torch.Tensor:
    r"""The adapted lookup y = E[id] + λ_b ⊙ ((λ_d ⊙ A_s[:, id]) B_s^T), one step at a time.

    §7 Embeddings (notebook 10). A lookup in a table E (num_embeddings, dim) is a linear map of one-hot
    inputs: y = onehot(id) E = W onehot(id) with W = E^T, of shape (out, in) = (dim, num_embeddings). VeRA
    adapts it as any linear layer (§4), with

        A_s = vera_A[:, :num_embeddings]      (r, num)      in  = num_embeddings
        B_s = vera_B[:dim, :]                 (dim, r)      out = embedding_dim

    and since the input is one-hot, projecting it is a lookup, never a matmul:

        h   = onehot(id) A_s^T = A_s[:, id]   (..., r)     column `id` of A_s, gathered
        y   = E[id] + λ_b ⊙ ((λ_d ⊙ h) B_s^T) (..., dim)

    so the adapted table E + ΔW^T (ΔW = Λ_b B_s Λ_d A_s, §5) is never built. The padding row stays fixed, as
    nn.Embedding keeps it: h = 0 where id == padding_idx, which is the same as zeroing A_s's padding column.

    Args:
        ids: the token ids, (...,) integers.
        table: the frozen E, (num_embeddings, embedding_dim).
        vera_A: the shared (r, max_in) projection; max_in >= num_embeddings.
        vera_B: the shared (max_out, r) projection; max_out >= embedding_dim.
        lambda_d: λ_d, (r,).
        lambda_b: λ_b, (embedding_dim,).
        padding_idx: the row that stays fixed, or None.
    """
    num_embeddings, dim = table.shape  # E: (num, dim) = W^T
    A_s, B_s = slice_projections(vera_A, vera_B, num_embeddings, dim)
    A_s = embedding_projection(A_s, padding_idx)  # (r, num), the padding column zeroed
    h = A_s.T[ids]  # (..., r): one column of A_s per id, gathered
    u = (lambda_d * h) @ B_s.T  # (..., dim)
    return table[ids] + lambda_b * u


def check_embedding(embedding: nn.Embedding) -> None:
    """Refuse an embedding no adapter term can follow: one with `max_norm` re-normalises the looked-up rows of
    its table in place on every lookup."""
    if embedding.max_norm is not None:
        raise ValueError(
            f"nn.Embedding({embedding.num_embeddings}, {embedding.embedding_dim}, "
            f"max_norm={embedding.max_norm}) re-normalises looked-up rows of its table in place on every "
            "lookup, which no adapter term can follow; VeRA adapts embeddings without max_norm (build it "
            "with max_norm=None)"
        )


def embedding_projection(A_s: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """A_s (r, num_embeddings) with the padding column zeroed (a copy), or A_s itself without padding."""
    if padding_idx is None:
        return A_s
    A_s = A_s.clone()
    A_s[:, padding_idx] = 0.0  # the padding row of the table gets no adapter term
    return A_s


def embedding_delta_table(
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    num_embeddings: int,
    embedding_dim: int,
    padding_idx: int | None = None,
) -> torch.Tensor:
    """ΔW^T, (num_embeddings, embedding_dim): what merging adds to the table (zero in the padding row)."""
    A_s, B_s = slice_projections(vera_A, vera_B, num_embeddings, embedding_dim)
    A_s = embedding_projection(A_s, padding_idx)
    return ((lambda_b[:, None] * B_s) @ (lambda_d[:, None] * A_s)).T  # ((dim, r) @ (r, num))^T


class VeraEmbedding(nn.Module):
    """A frozen nn.Embedding adapted with VeRA (single adapter, float32, for reading and testing).

    Args:
        base_layer: the nn.Embedding to adapt; its table is frozen (`check_embedding` refuses `max_norm`).
        projections: the model's `SharedProjections`, sized for in = num_embeddings, out = embedding_dim.
        d_initial: initial value of every λ_d entry.
        init_weights: True gives λ_b = 0 (the table starts unchanged); False draws random λ_b and λ_d.
    """

    def __init__(
        self,
        base_layer: nn.Embedding,
        projections: SharedProjections,
        *,
        d_initial: float = 0.1,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        check_embedding(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        self.projections = projections
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        slice_projections(projections.vera_A, projections.vera_B, self.in_features, self.out_features)
        self.vera_lambda_d, self.vera_lambda_b = _initial_lambdas(
            projections.vera_A.shape[0], self.out_features, d_initial, init_weights
        )
        self.merged = False

    def merge(self) -> None:
        """Add ΔW^T to the table; lookups then cost exactly the base embedding."""
        self._add_delta(+1.0)

    def unmerge(self) -> None:
        """Subtract ΔW^T again."""
        self._add_delta(-1.0)

    def _add_delta(self, sign: float) -> None:
        if self.merged == (sign > 0):
            raise RuntimeError(f"VeraEmbedding is {'already' if self.merged else 'not'} merged")
        table = self.base_layer.weight
        delta = embedding_delta_table(
            self.projections.vera_A,
            self.projections.vera_B,
            self.vera_lambda_d,
            self.vera_lambda_b,
            self.in_features,
            self.out_features,
            self.base_layer.padding_idx,
        )
        with torch.no_grad():
            table.add_(sign * delta)
        self.merged = sign > 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """E[id] + λ_b ⊙ ((λ_d ⊙ A_s[:, id]) B_s^T), or E'[id] of the merged table.

        Args:
            ids: token ids, (...,).
        """
        if self.merged:
            return self.base_layer(ids)
        return embedding_forward(
            ids,
            self.base_layer.weight,
            self.projections.vera_A,
            self.projections.vera_B,
            self.vera_lambda_d,
            self.vera_lambda_b,
            self.base_layer.padding_idx,
        )


def _initial_lambdas(r: int, out_features: int, d_initial: float, init_weights: bool) -> tuple:
    """λ_d = d_initial and λ_b = 0 (the adapter starts as the identity), or random ones for tests."""
    if init_weights:
        return nn.Parameter(torch.full((r,), float(d_initial))), nn.Parameter(torch.zeros(out_features))
    return nn.Parameter(torch.randn(r)), nn.Parameter(torch.randn(out_features))


# ---------------------------------------------------------------------------------------------------
# §8 Beyond linear layers: convolutions (notebook 10)
# ---------------------------------------------------------------------------------------------------


def conv_matrix_shape(conv: nn.modules.conv._ConvNd) -> tuple[int, int]:
    r"""(out, in): a convolution's kernel seen as a matrix, (out_channels, in_channels · ∏ kernel_size).

    §8 Convolutions (notebook 10). A convolution with groups=1 applies at every output position the same
    linear map to the patch of input it sees: its kernel W (out, in, *k) is the matrix (out, in · ∏k) acting
    on the flattened patch. VeRA adapts that matrix (§4):

        A_s = vera_A[:, :in·∏k]  reshaped (r, in, *k)       a convolution with r output channels
        B_s = vera_B[:out, :]    reshaped (out, r, 1, ...)  a 1 x 1 convolution
        h   = conv(x, A_s)                    (N, r, *positions)    the layer's stride, padding, dilation
        y   = conv(x, W) + b + λ_b ⊙ conv1x1(λ_d ⊙ h, B_s)          (N, out, *positions)

    Convolution is linear in its kernel, so this equals conv(x, W + ΔW) with ΔW = Λ_b B_s Λ_d A_s (§5)
    reshaped to (out, in, *k): merging adds that kernel. Grouped convolutions (groups > 1) apply several
    maps, one per group, and are not a single matrix: they are refused.
    """
    if conv.groups != 1:
        raise ValueError(
            f"{type(conv).__name__} with groups={conv.groups} applies {conv.groups} separate kernels; VeRA "
            "adapts convolutions with groups=1 only (adapt the pointwise layers of a depthwise-separable "
            "block instead)"
        )
    return conv.out_channels, conv.in_channels * math.prod(conv.kernel_size)


def conv_forward(
    x: torch.Tensor,
    conv: nn.modules.conv._ConvNd,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
) -> torch.Tensor:
    """The adapted convolution conv(x, W) + b + λ_b ⊙ conv1x1(λ_d ⊙ conv(x, A_s), B_s), (N, out, *positions).

    Args:
        x: the input, (N, in, *spatial).
        conv: the frozen Conv1d / Conv2d / Conv3d (its kernel, bias, stride, padding and dilation).
        vera_A: the shared (r, max_in) projection; max_in >= in · ∏k.
        vera_B: the shared (max_out, r) projection.
        lambda_d: λ_d, (r,).
        lambda_b: λ_b, (out,).
    """
    out_features, in_features = conv_matrix_shape(conv)
    A_s, B_s = slice_projections(vera_A, vera_B, in_features, out_features)
    kernel_A = A_s.reshape(A_s.shape[0], conv.in_channels, *conv.kernel_size)  # (r, in, *k)
    # The layer's own convolution (stride, padding, padding mode, dilation) with another kernel.
    h = conv._conv_forward(x, kernel_A, None)  # (N, r, *positions)
    positions = (1,) * (h.dim() - 2)
    h_d = lambda_d.view(1, -1, *positions) * h  # (N, r, *positions)
    u = torch.einsum("nr...,or->no...", h_d, B_s)  # the 1 x 1 convolution: (N, out, *positions)
    return conv(x) + lambda_b.view(1, -1, *positions) * u


def conv_delta_kernel(conv: nn.modules.conv._ConvNd, vera_A, vera_B, lambda_d, lambda_b) -> torch.Tensor:
    """ΔW reshaped to the kernel's shape (out, in, *k): what merging adds to the kernel."""
    out_features, in_features = conv_matrix_shape(conv)
    delta = delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)  # (out, in·∏k)
    return delta.reshape(conv.weight.shape)


class VeraConv(nn.Module):
    """A frozen Conv1d / Conv2d / Conv3d (groups=1) adapted with VeRA (single adapter, float32).

    Args:
        base_layer: the convolution to adapt; its kernel and bias are frozen.
        projections: the model's `SharedProjections`, sized for in = in_channels · ∏k, out = out_channels.
        d_initial: initial value of every λ_d entry.
        init_weights: True gives λ_b = 0 (the layer starts as the base layer); False draws random lambdas.
    """

    def __init__(
        self,
        base_layer: nn.modules.conv._ConvNd,
        projections: SharedProjections,
        *,
        d_initial: float = 0.1,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = conv_matrix_shape(base_layer)  # refuses groups > 1
        self.base_layer = base_layer.requires_grad_(False)
        self.projections = projections
        slice_projections(projections.vera_A, projections.vera_B, self.in_features, self.out_features)
        self.vera_lambda_d, self.vera_lambda_b = _initial_lambdas(
            projections.vera_A.shape[0], self.out_features, d_initial, init_weights
        )
        self.merged = False

    def merge(self) -> None:
        """Add the ΔW kernel; the layer then costs exactly the base convolution."""
        self._add_delta(+1.0)

    def unmerge(self) -> None:
        """Subtract the ΔW kernel again."""
        self._add_delta(-1.0)

    def _add_delta(self, sign: float) -> None:
        if self.merged == (sign > 0):
            raise RuntimeError(f"VeraConv is {'already' if self.merged else 'not'} merged")
        delta = conv_delta_kernel(
            self.base_layer,
            self.projections.vera_A,
            self.projections.vera_B,
            self.vera_lambda_d,
            self.vera_lambda_b,
        )
        with torch.no_grad():
            self.base_layer.weight.add_(sign * delta)
        self.merged = sign > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv(x, W) + b + λ_b ⊙ conv1x1(λ_d ⊙ conv(x, A_s), B_s), or the merged convolution.

        Args:
            x: the input, (N, in_channels, *spatial).
        """
        if self.merged:
            return self.base_layer(x)
        return conv_forward(
            x,
            self.base_layer,
            self.projections.vera_A,
            self.projections.vera_B,
            self.vera_lambda_d,
            self.vera_lambda_b,
        )
