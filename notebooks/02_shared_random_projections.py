# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The shared random projections
#
# VeRA never trains its low-rank matrices. One pair, `vera_A (r × max_in)` and `vera_B (max_out × r)`, is
# drawn once from a seeded random generator, frozen, and shared by every adapted layer. Because they are
# never trained, they only have to be *reproducible*: the seed `projection_prng_key` stands for them.
#
# **What you will learn**
#
# 1. Kaiming (He) uniform initialisation, one step at a time, from a seeded `torch.Generator`.
# 2. What the drawn values look like against the theoretical bound.
# 3. Why the same key gives the same matrices (A drawn first, then B) — and the same matrices as PEFT.
# 4. What `save_projection=False` saves on disk, and what it risks.

# %%
import copy
import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import get_model

# %% [markdown]
# ## 1. Kaiming uniform, step by step
#
# A matrix with `fan_in` columns maps a vector of `fan_in` numbers to one number per row. Kaiming's rule
# picks the spread of its entries so that this output keeps the input's scale after a ReLU:
#
# | step | formula |
# |---|---|
# | gain of ReLU | `gain = √2` |
# | standard deviation | `std = gain / √fan_in` |
# | bound of a uniform with that std | `bound = √3 · std` (a uniform on `[-b, b]` has std `b / √3`) |
# | draw | `M ~ U(-bound, bound)` |
#
# `vera_A` is `(r, max_in)`, so its fan-in is `max_in`; `vera_B` is `(max_out, r)`, so its fan-in is `r`.
# Here are the numbers for a RoBERTa-base-sized pair (hidden 768, MLP 3072) at rank 256:

# %%
r, max_in, max_out, prng_key = 256, 768, 3072, 0


def kaiming_bound(fan_in):
    gain = math.sqrt(2.0)
    std = gain / math.sqrt(fan_in)
    return math.sqrt(3.0) * std


bound_A, bound_B = kaiming_bound(max_in), kaiming_bound(r)
print(f"vera_A ({r} x {max_in}):  fan_in = {max_in:4d}   bound = √6 / √{max_in} = {bound_A:.5f}")
print(f"vera_B ({max_out} x {r}): fan_in = {r:4d}   bound = √6 / √{r}  = {bound_B:.5f}")

# %% [markdown]
# Now draw `A` by hand: a CPU generator seeded with the key, and `uniform_` on an empty tensor. The
# reference's `kaiming_init` does exactly this, so both give the same bits.

# %%
generator = torch.Generator(device="cpu").manual_seed(prng_key)
A_by_hand = torch.empty(r, max_in).uniform_(-bound_A, bound_A, generator=generator)

A_reference = ref.kaiming_init((r, max_in), torch.Generator(device="cpu").manual_seed(prng_key))
assert torch.equal(A_by_hand, A_reference)

# %% [markdown]
# ## 2. The values against the bound
#
# Every entry must lie in `[-bound, bound]`, spread evenly: the histogram should be flat at height
# `1 / (2 · bound)` (a density) and stop at the dashed lines. `A` has 196,608 entries and `B` 786,432,
# so the empirical spread should match `bound / √3` closely.

# %%
vera_A, vera_B = ref.init_projections(r, max_in, max_out, prng_key)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, (name, matrix, bound) in zip(axes, [("vera_A", vera_A, bound_A), ("vera_B", vera_B, bound_B)], strict=True):
    values = matrix.flatten().numpy()
    ax.hist(values, bins=60, density=True, alpha=0.75, label="drawn values")
    ax.hlines(1 / (2 * bound), -bound, bound, colors="black", label="U(-bound, bound) density")
    for edge in (-bound, bound):
        ax.axvline(edge, color="red", linestyle="--")
    ax.set_title(f"{name} {tuple(matrix.shape)}: bound = {bound:.4f}")
    ax.set_xlabel("value")
    ax.set_xlim(-1.25 * bound, 1.25 * bound)
    ax.set_ylim(0, 1.4 / (2 * bound))  # room for the legend above the flat top
axes[0].set_ylabel("density")
axes[0].legend(loc="upper center", ncols=2)
fig.tight_layout()
plt.show()

# %%
for matrix, bound in [(vera_A, bound_A), (vera_B, bound_B)]:
    assert matrix.abs().max() <= bound  # never outside the bound
    assert matrix.abs().max() > 0.999 * bound  # and the draws reach it
    assert abs(matrix.std().item() / (bound / math.sqrt(3)) - 1) < 0.01  # std of U(-b, b) is b / √3
    assert abs(matrix.mean().item()) < 0.01 * bound

# %% [markdown]
# What the scale buys: for an input with unit-variance entries, each of the `r` coordinates of `A x` has
# variance `fan_in · bound² / 3 = 2`, whatever the layer's width. (A layer narrower than `max_in` uses only
# the first `in` columns, so its projection is proportionally smaller: notebook 03 is about that slicing.)

# %%
x = torch.randn(4096, max_in, generator=torch.Generator().manual_seed(1))
projected = x @ vera_A.T  # (4096, r)
print(f"variance of A x: {projected.var().item():.3f} (theory: 2)")
assert abs(projected.var().item() - 2.0) < 0.05

# %% [markdown]
# ## 3. Same key, same matrices: A first, then B
#
# `init_projections` seeds **one** generator and draws `A` first, then `B`. `B`'s values are therefore the
# generator's stream *after* `A`'s `r · max_in` draws. Drawing them in the other order gives different
# matrices from the same key, so the order is part of the format.

# %%
generator = torch.Generator(device="cpu").manual_seed(prng_key)
A_first = ref.kaiming_init((r, max_in), generator)
B_second = ref.kaiming_init((max_out, r), generator)

generator = torch.Generator(device="cpu").manual_seed(prng_key)
B_first = ref.kaiming_init((max_out, r), generator)

assert torch.equal(A_first, vera_A) and torch.equal(B_second, vera_B)
assert not torch.equal(B_first, vera_B)  # same key, other order: other matrices

again_A, again_B = ref.init_projections(r, max_in, max_out, prng_key)
other_A, other_B = ref.init_projections(r, max_in, max_out, prng_key=1)
assert torch.equal(again_A, vera_A) and torch.equal(again_B, vera_B)  # bit for bit
assert not torch.equal(other_A, vera_A) and not torch.equal(other_B, vera_B)

# %% [markdown]
# ### The same matrices as PEFT's
#
# PEFT's `VeraModel` sizes the pair from the targeted layers and draws it the same way, so for the same key
# and the same targets veralab, PEFT and the reference hold the same bits. We adapt a tiny Llama whose
# targeted layers have three different shapes (GQA makes `k_proj`/`v_proj` narrower, the MLP wider).

# %%
llama = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
)
targets = ["q_proj", "v_proj", "down_proj"]
key = 1234

veralab_model = get_model(copy.deepcopy(llama), VeraConfig(r=16, target_modules=targets, projection_prng_key=key))
peft_model = peft.get_peft_model(
    copy.deepcopy(llama), peft.VeraConfig(r=16, target_modules=targets, projection_prng_key=key)
)
peft_A = peft_model.base_model.vera_A["default"]
peft_B = peft_model.base_model.vera_B["default"]

# The pair is sized for the largest in (down_proj: 80) and the largest out (q_proj: 32) of the targets.
reference_A, reference_B = ref.init_projections(r=16, max_in=80, max_out=32, prng_key=key)
print("veralab vera_A", tuple(veralab_model.vera_A.shape), " PEFT vera_A", tuple(peft_A.shape))
print("veralab vera_B", tuple(veralab_model.vera_B.shape), " PEFT vera_B", tuple(peft_B.shape))

# %%
assert torch.equal(veralab_model.vera_A, peft_A) and torch.equal(veralab_model.vera_B, peft_B)
assert torch.equal(veralab_model.vera_A, reference_A) and torch.equal(veralab_model.vera_B, reference_B)

# %% [markdown]
# ## 4. `save_projection=False`: what it saves, what it risks
#
# With the default `save_projection=True` the adapter file carries `vera_A` and `vera_B`. With `False` it
# carries only the λ vectors, and the loader regenerates the pair from `projection_prng_key`. veralab's
# config warns when you ask for it:

# %%
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    VeraConfig(r=16, target_modules=targets, save_projection=False)
print(caught[0].message)
assert len(caught) == 1 and "save_projection=False" in str(caught[0].message)

# %% [markdown]
# **What it saves:** `r · (max_in + max_out)` float32 numbers per file. Here that is most of the file:

# %%
lambda_numbers, _ = veralab_model.get_nb_trainable_parameters()
projection_numbers = veralab_model.vera_A.numel() + veralab_model.vera_B.numel()
print(f"λ vectors: {4 * lambda_numbers:,d} bytes   projections: {4 * projection_numbers:,d} bytes")
assert projection_numbers == 16 * (80 + 32)
assert projection_numbers > lambda_numbers

# %% [markdown]
# For LLaMA 7B at r = 1024 that is 90 MB saved per adapter file (notebook 01).
#
# **What it risks:** the regenerated pair must equal the one the λ vectors were trained with, bit for bit.
# That holds only if *everything* that shaped the draw is the same at load time:
#
# - the key, the rank, and the order of the draws (section 3);
# - PyTorch's CPU generator and its `uniform_` algorithm — PEFT's documentation does not promise these
#   across PyTorch versions and platforms;
# - `max_in` and `max_out`, which come from the **set of targeted layers**, not from any one layer.
#
# The last one is easy to break without noticing. The generator fills `A` row by row, so the first
# `64` columns of a `(16, 128)` draw are *not* the `(16, 64)` draw; and `B` comes after `A` in the stream,
# so it changes too even when `max_out` does not. Suppose an adapter was trained on a model whose largest
# targeted input is 64, and is loaded where one more, wider layer is targeted (`max_in` = 128). The same
# λ vectors then scale a different random subspace:

# %%
in_features, out_features = 48, 32
trained_A, trained_B = ref.init_projections(r=16, max_in=64, max_out=32, prng_key=key)
regenerated_A, regenerated_B = ref.init_projections(r=16, max_in=128, max_out=32, prng_key=key)

generator = torch.Generator().manual_seed(2)
lambda_d = torch.randn(16, generator=generator)  # stand-ins for trained vectors
lambda_b = torch.randn(out_features, generator=generator)
weight = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
x = torch.randn(256, in_features, generator=generator)

base = x @ weight.T
as_trained = ref.vera_forward(x, weight, None, trained_A, trained_B, lambda_d, lambda_b) - base
as_loaded = ref.vera_forward(x, weight, None, regenerated_A, regenerated_B, lambda_d, lambda_b) - base
correlation = np.corrcoef(as_trained.flatten().numpy(), as_loaded.flatten().numpy())[0, 1]

fig, ax = plt.subplots(figsize=(4.8, 4.5))
ax.scatter(as_trained.flatten(), as_loaded.flatten(), s=2, alpha=0.3)
limit = as_trained.abs().max().item()
ax.plot([-limit, limit], [-limit, limit], color="black", linewidth=1, label="what loading should give")
ax.set_xlabel("adapter's contribution, projections as trained")
ax.set_ylabel("adapter's contribution, projections regenerated")
ax.set_title(f"max_in 64 → 128 at load time: correlation {correlation:.2f}")
ax.legend(loc="upper left")
plt.show()

# %%
A_s_trained, _ = ref.slice_projections(trained_A, trained_B, in_features, out_features)
A_s_loaded, _ = ref.slice_projections(regenerated_A, regenerated_B, in_features, out_features)
assert not torch.equal(A_s_trained, A_s_loaded) and not torch.equal(trained_B, regenerated_B)
assert abs(correlation) < 0.2  # the adapter's contribution is unrelated to what was trained

# %% [markdown]
# Nothing fails: shapes fit, the model runs, and the adapter silently does something else. So:
#
# - keep `save_projection=True` (the default) for any file that leaves your hands; it costs
#   `4 · r · (max_in + max_out)` bytes, paid once per file;
# - use `False` only when you control both ends — the same PyTorch, the same key, rank and *target set* —
#   and check after loading that the model reproduces outputs you recorded at save time.
