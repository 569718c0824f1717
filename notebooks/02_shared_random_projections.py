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
#
# In the code: §2 of `veralab.reference` (`kaiming_init`, `init_projections`).

# %%
import copy
import json
import math
import os
import tempfile
import warnings

import matplotlib.pyplot as plt
import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import veralab
from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import ProjectionMismatchError, VeraModel, get_model

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
# So `bound = √(6 / fan_in)`: this is `torch.nn.init.kaiming_uniform_(M, nonlinearity="relu")`, the init
# VeRA and PEFT use. It is not `nn.Linear`'s default, which passes `a = √5` (a gain of `√(1/3)`) and so draws
# from a range `√6 ≈ 2.45` times narrower, `±1 / √fan_in`.
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
print(
    f"vera_A ({r} x {max_in}):  fan_in = {max_in:4d}   bound = √6 / √{max_in} = "
    f"{bound_A:.5f}"
)
print(f"vera_B ({max_out} x {r}): fan_in = {r:4d}   bound = √6 / √{r}  = {bound_B:.5f}")

# nn.Linear's own init of a weight shaped like vera_A
default_linear = torch.nn.Linear(max_in, r)
assert default_linear.weight.abs().max() <= 1 / math.sqrt(max_in)  # ±1/√fan_in
# VeRA's bound: √6 times wider
assert math.isclose(bound_A, math.sqrt(6) / math.sqrt(max_in))

# %% [markdown]
# Now draw `A` by hand: a CPU generator seeded with the key, and `uniform_` on an empty tensor. The
# reference's `kaiming_init` does exactly this, so both give the same bits.

# %%
generator = torch.Generator(device="cpu").manual_seed(prng_key)
A_by_hand = torch.empty(r, max_in).uniform_(-bound_A, bound_A, generator=generator)

A_reference = ref.kaiming_init(
    (r, max_in), torch.Generator(device="cpu").manual_seed(prng_key)
)
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
for ax, (name, matrix, bound) in zip(
    axes, [("vera_A", vera_A, bound_A), ("vera_B", vera_B, bound_B)], strict=True
):
    values = matrix.flatten().numpy()
    ax.hist(values, bins=60, density=True, alpha=0.75, label="drawn values")
    ax.hlines(
        1 / (2 * bound), -bound, bound, colors="black", label="U(-bound, bound) density"
    )
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
    # std of U(-b, b) is b / √3
    assert abs(matrix.std().item() / (bound / math.sqrt(3)) - 1) < 0.01
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
# `init_projections` draws from **one** generator, seeded with the key: `A` first, then `B`. `B`'s values are
# therefore the generator's stream *after* `A`'s `r · max_in` draws. Drawing them in the other order gives
# different matrices from the same key, so the order is part of the format.

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

veralab_model = get_model(
    copy.deepcopy(llama),
    VeraConfig(r=16, target_modules=targets, projection_prng_key=key),
)
peft_model = peft.get_peft_model(
    copy.deepcopy(llama),
    peft.VeraConfig(r=16, target_modules=targets, projection_prng_key=key),
)
peft_A = peft_model.base_model.vera_A["default"]
peft_B = peft_model.base_model.vera_B["default"]

# The pair is sized for the largest in (down_proj: 80) and the largest out (q_proj: 32)
# of the targets.
reference_A, reference_B = ref.init_projections(
    r=16, max_in=80, max_out=32, prng_key=key
)
print(
    "veralab vera_A",
    tuple(veralab_model.vera_A.shape),
    " PEFT vera_A",
    tuple(peft_A.shape),
)
print(
    "veralab vera_B",
    tuple(veralab_model.vera_B.shape),
    " PEFT vera_B",
    tuple(peft_B.shape),
)

# %%
assert torch.equal(veralab_model.vera_A, peft_A) and torch.equal(
    veralab_model.vera_B, peft_B
)
assert torch.equal(veralab_model.vera_A, reference_A) and torch.equal(
    veralab_model.vera_B, reference_B
)

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
# **What it saves:** `r · (max_in + max_out)` float32 numbers per file. We save the tiny Llama's adapter both
# ways with `save_pretrained` and compare the files:


# %%
def weights_file_bytes(directory):
    return os.path.getsize(os.path.join(directory, "adapter_model.safetensors"))


lambda_numbers, _ = veralab_model.get_nb_trainable_parameters()
projection_numbers = veralab_model.vera_A.numel() + veralab_model.vera_B.numel()
with tempfile.TemporaryDirectory() as directory:
    veralab_model.save_pretrained(f"{directory}/with_projections")
    # the same adapter, saved without the pair
    veralab_model.peft_config["default"].save_projection = False
    veralab_model.save_pretrained(f"{directory}/without_projections")
    bytes_with = weights_file_bytes(f"{directory}/with_projections")
    bytes_without = weights_file_bytes(f"{directory}/without_projections")
print(f"{lambda_numbers} λ numbers, {projection_numbers} projection numbers")
print(f"file with projections {bytes_with:,d} bytes, without {bytes_without:,d} bytes")

# %%
assert projection_numbers == 16 * (80 + 32) and projection_numbers > lambda_numbers
# The difference is the projections' float32 bytes, plus their two entries in the file's
# header.
assert 0 < (bytes_with - bytes_without) - 4 * projection_numbers < 256

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
# The last one is easy to get wrong. The generator fills `A` row by row, so the first 32 columns of a
# `(16, 80)` draw are *not* the `(16, 32)` draw from the same key — and `B` comes after `A` in the stream,
# so it changes too:

# %%
A_80, B_80 = ref.init_projections(r=16, max_in=80, max_out=80, prng_key=key)
A_32, B_32 = ref.init_projections(r=16, max_in=32, max_out=32, prng_key=key)
assert not torch.equal(A_80[:, :32], A_32) and not torch.equal(B_80[:32], B_32)

# %% [markdown]
# Here is how that bites in practice. A model carries two adapters: `wide` also adapts `down_proj` (80
# inputs), `narrow` only `q_proj` and `v_proj` (32 inputs). PEFT draws a pair for the model's *first* adapter
# and hands that same pair to every later one, so in PEFT `narrow` trains with `wide`'s `(16, 80)` pair.
# Saved without projections, `narrow`'s file holds its λ vectors and its config — whose targets, on their
# own, size a `(16, 32)` pair, which is what PEFT draws when it loads the file alone. veralab gives every
# adapter, from the start, the pair its key draws over *its own* targets (the pair it would have alone), so
# the file means one thing wherever it is loaded. We train nothing: random λ stand for a trained adapter.

# %%
narrow_targets = ["q_proj", "v_proj"]


def two_adapters(library, get):
    """A copy of the Llama with `wide` and then `narrow` (random λ: as if trained), in
    one library."""
    with warnings.catch_warnings():
        # the save_projection=False warning, seen above
        warnings.simplefilter("ignore", UserWarning)
        config = dict(r=16, projection_prng_key=key, save_projection=False)
        model = get(
            copy.deepcopy(llama),
            library.VeraConfig(target_modules=targets, **config),
            adapter_name="wide",
        )
        narrow = library.VeraConfig(
            target_modules=narrow_targets, init_weights=False, **config
        )
        model.add_adapter("narrow", narrow)
    model.set_adapter("narrow")
    return model


trained_in_peft = two_adapters(peft, peft.get_peft_model)
trained_in_veralab = two_adapters(veralab, get_model)
input_ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))


def adapter_contribution(model):
    """What the active adapter adds to the logits: adapted minus base model."""
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
    return (adapted - base).flatten()


def reloaded_alone(model, loader):
    """`narrow` saved without projections, then loaded alone into a fresh copy of the
    base model."""
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(
            directory
        )  # "narrow" goes into directory/narrow, as in PEFT
        return loader(copy.deepcopy(llama), f"{directory}/narrow")


def relative_error(reloaded, trained):
    return ((reloaded - trained).norm() / trained.norm()).item()


peft_trained = adapter_contribution(trained_in_peft)
peft_reloaded = adapter_contribution(
    reloaded_alone(trained_in_peft, peft.PeftModel.from_pretrained)
)
veralab_trained = adapter_contribution(trained_in_veralab)
veralab_in_peft = adapter_contribution(
    reloaded_alone(trained_in_veralab, peft.PeftModel.from_pretrained)
)
veralab_in_veralab = adapter_contribution(
    reloaded_alone(trained_in_veralab, VeraModel.from_pretrained)
)
error_peft = relative_error(peft_reloaded, peft_trained)
print(
    "narrow's pair while training: PEFT",
    tuple(trained_in_peft.base_model.vera_A["narrow"].shape),
    " veralab",
    tuple(trained_in_veralab.projections_of("narrow").vera_A.shape),
)

fig, ax = plt.subplots(figsize=(5, 4.8))
limit = max(peft_trained.abs().max().item(), veralab_trained.abs().max().item())
ax.plot(
    [-limit, limit],
    [-limit, limit],
    color="black",
    linestyle="--",
    linewidth=1,
    label="what loading should give",
)
ax.scatter(
    peft_trained,
    peft_reloaded,
    s=3,
    alpha=0.3,
    color="tab:red",
    label=f"trained in PEFT, reloaded (off by {error_peft:.0%})",
)
ax.scatter(
    veralab_trained,
    veralab_in_peft,
    s=6,
    alpha=0.5,
    color="tab:green",
    label="trained in veralab, reloaded by PEFT or veralab (exact)",
)
ax.set_xlabel("adapter's contribution to the logits, as trained")
ax.set_ylabel("... after saving without projections and reloading")
ax.set_title("'narrow', saved with save_projection=False")
ax.legend(loc="upper left", fontsize=8)
plt.show()

# %% [markdown]
# Reloaded alone, PEFT's `narrow` gets a regenerated `(16, 32)` `A`, and the same λ vectors now scale a
# different random subspace: the adapter still correlates with the trained one (both pass through the same
# network), but its error is as large as its whole effect. Nothing fails: shapes fit, the model runs, and the
# adapter silently does something else. veralab's `narrow` trained with the `(16, 32)` pair all along, so
# both libraries reload it exactly.
#
# One risk is left: a PEFT model that loads `narrow` *beside* `wide` would hand it `wide`'s pair. So when an
# adapter's pair is not the model's first, veralab writes the pair into its file (and `save_projection: true`
# into its config): PEFT then loads it alone exactly and refuses it beside another adapter, loudly. For the
# adapters of the first pair, `save_projection=False` keeps the file to the λ vectors; veralab records a
# fingerprint of the projections in the file's metadata — their shapes, key, generator and a sha256 of their
# values — and checks what it regenerates.

# %%
assert tuple(trained_in_peft.base_model.vera_A["narrow"].shape) == (16, 80)
assert tuple(trained_in_veralab.projections_of("narrow").vera_A.shape) == (16, 32)
torch.testing.assert_close(veralab_in_veralab, veralab_trained)
torch.testing.assert_close(veralab_in_peft, veralab_trained)
# PEFT's reload is off by more than half of what the adapter does
assert error_peft > 0.5

with tempfile.TemporaryDirectory() as directory:
    trained_in_veralab.save_pretrained(directory)
    with open(os.path.join(directory, "narrow", "adapter_config.json")) as f:
        # narrow's file carries its (16, 32) pair
        assert json.load(f)["save_projection"] is True
    beside_wide = peft.PeftModel.from_pretrained(
        copy.deepcopy(llama), f"{directory}/wide"
    )
    try:
        beside_wide.load_adapter(f"{directory}/narrow", "narrow")
        peft_refused = None
    except ValueError as error:
        peft_refused = error
print(peft_refused)
assert peft_refused is not None

# %% [markdown]
# When the regeneration cannot match — another PyTorch whose generator draws differently, or, simulated here,
# a config whose key was edited — veralab refuses to load instead of producing wrong outputs:

# %%
with tempfile.TemporaryDirectory() as directory:
    trained_in_veralab.save_pretrained(directory, selected_adapters=["wide"])
    config_path = os.path.join(directory, "wide", "adapter_config.json")
    with open(config_path) as f:
        edited = json.load(f)
    edited["projection_prng_key"] = key + 1
    with open(config_path, "w") as f:
        json.dump(edited, f)
    try:
        VeraModel.from_pretrained(copy.deepcopy(llama), f"{directory}/wide")
        refused = None
    except ProjectionMismatchError as error:
        refused = error
print(refused)
assert isinstance(refused, ProjectionMismatchError)

# %% [markdown]
# So:
#
# - keep `save_projection=True` (the default) for any file that leaves your hands; it costs
#   `4 · r · (max_in + max_out)` bytes, paid once per file, and the file then loads the same everywhere —
#   in PEFT too;
# - use `False` only when you control both ends: the same PyTorch, the same key and rank. veralab's
#   fingerprint turns a mismatch into an error rather than a silently different model, but a refused file is
#   still a file you cannot use on that machine, and PEFT (which ignores the fingerprint) will load it either
#   way.

# %% [markdown]
# ## Try it: the seed and the shared pair
#
# Pick a `projection_prng_key` and a rank: the heatmaps are the pair
# `init_projections(r, max_in=48, max_out=32, prng_key)` draws. The same key always gives the
# same pair; any other key gives an unrelated one. (The figure is drawn once at key 0 and
# r = 8; in Jupyter the controls below redraw it.)

# %%
import ipywidgets as widgets
from IPython.display import display


def draw_pair(prng_key=0, r=8):
    """Draw the pair for a key and a rank as heatmaps; returns (vera_A, vera_B)."""
    vera_A, vera_B = ref.init_projections(r, max_in=48, max_out=32, prng_key=prng_key)
    fig, (ax_B, ax_A) = plt.subplots(
        1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [1, 3]}
    )
    bound = math.sqrt(6 / r)  # vera_B's bound; vera_A's, √(6 / 48), is narrower
    ax_B.imshow(vera_B, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax_A.imshow(vera_A, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax_B.set_title(f"vera_B ({32} × {r})", fontsize=9)
    ax_A.set_title(f"vera_A ({r} × {48}), prng_key = {prng_key}", fontsize=9)
    fig.tight_layout()
    plt.show()
    return vera_A, vera_B


draw_pair()

# %% tags=["widget"]
key_slider = widgets.IntSlider(value=0, min=0, max=100, description="prng_key")
pair_control = widgets.interactive(
    draw_pair,
    prng_key=key_slider,
    r=widgets.Dropdown(options=[4, 8, 16, 32], value=8, description="rank r"),
)
display(pair_control)

# %% tags=["widget"]
# Moving the key redraws the pair: the same key gives the same bits, another key
# another pair.
key_slider.value = 7
pair_at_7 = pair_control.result
assert all(
    torch.equal(drawn, expected)
    for drawn, expected in zip(
        pair_at_7, ref.init_projections(8, 48, 32, 7), strict=True
    )
)
key_slider.value = 0
assert not torch.equal(pair_control.result[0], pair_at_7[0])

# %% [markdown]
# ## Exercise: draw the pair yourself
#
# Write `my_init_projections(r, max_in, max_out, prng_key)` that returns `(vera_A, vera_B)`
# exactly as PEFT draws them, without calling `veralab.reference`: one CPU generator seeded
# with the key, `vera_A (r × max_in)` first, then `vera_B (max_out × r)`, each uniform on
# `±√(6 / fan_in)`. The checker compares your draw with PEFT's for three keys and shapes and
# says which matrix differs, and why it might.


# %% jupyter={"source_hidden": true}
# Worked solution: replace the body with your own and run the checker below.
def my_init_projections(r, max_in, max_out, prng_key):
    generator = torch.Generator().manual_seed(prng_key)
    bound_A = math.sqrt(6 / max_in)  # vera_A's fan_in is max_in
    vera_A = torch.empty(r, max_in).uniform_(-bound_A, bound_A, generator=generator)
    bound_B = math.sqrt(6 / r)  # vera_B's fan_in is r; drawn after vera_A
    vera_B = torch.empty(max_out, r).uniform_(-bound_B, bound_B, generator=generator)
    return vera_A, vera_B


# %%
from veralab import exercises

feedback = exercises.check_projections(my_init_projections)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [03 · One pair for every shape](03_max_dim_slicing.ipynb): how one pair serves
# layers of every shape.
