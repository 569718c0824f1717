# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · One pair for every shape: max-dim sizing and slicing
#
# A transformer's layers do not share one shape: attention projections are `hidden × hidden`, grouped-query
# attention makes `k_proj`/`v_proj` narrower, the MLP goes up to `intermediate` and back down. VeRA still
# uses **one** pair of random matrices for all of them.
#
# **What you will learn**
#
# 1. How the pair is sized: `vera_A` is `r × max_in` and `vera_B` is `max_out × r`, the largest input and
#    output over the adapted layers.
# 2. Which part each layer uses: `A_s = vera_A[:, :in]` and `B_s = vera_B[:out, :]`, the top-left corners —
#    drawn on heatmaps of the pair.
# 3. That the slices are views (no layer owns a copy), and that a layer's `B_s A_s` is the top-left block of
#    the one product `vera_B @ vera_A`.
#
# At the end, a widget lets you pick a layer and a rank and see its slices (a static figure above it shows
# every distinct shape, for readers without a live kernel).
#
# In the code: §3 of `veralab.reference` (`find_max_dims`, `slice_projections`).

# %%
import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display
from matplotlib.patches import Rectangle
from transformers import LlamaConfig, LlamaForCausalLM

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import get_model

# %% [markdown]
# ## 1. A model whose layers differ
#
# A tiny Llama: hidden size 32, MLP size 80, 4 query heads sharing 2 key/value heads (head size 8, so
# `k_proj` and `v_proj` output 16). We adapt every linear layer but the LM head (`"all-linear"`).

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
r = 16
model = get_model(
    llama, VeraConfig(r=r, target_modules="all-linear", init_weights=False)
)

layer_shapes = {}  # short name -> (out, in), from the first decoder layer
for name, layer in model.vera_layers():
    short_name = name.split(".")[-1]
    layer_shapes.setdefault(short_name, (layer.out_features, layer.in_features))
for short_name, (out_features, in_features) in layer_shapes.items():
    print(f"{short_name:<10} out {out_features:3d}  in {in_features:3d}")
print("vera_A", tuple(model.vera_A.shape), "  vera_B", tuple(model.vera_B.shape))

# %% [markdown]
# The pair is sized by `find_max_dims` over every adapted layer: `max_in = 80` comes from `down_proj`,
# `max_out = 80` from `gate_proj` and `up_proj`. PEFT's documentation gives the same rule with an example:
# layers of shapes (100, 20) and (80, 50) make `A` of shape (r, 50) and `B` of shape (100, r).
#
# Mind the order. `find_max_dims` reads PyTorch's `(out, in)` weight shapes (`linear.weight.shape`) and
# returns `MaxDims(max_in, max_out)`, in before out, the order `init_projections(r, max_in, max_out, key)`
# takes; read its fields by name.

# %%
max_in, max_out = ref.find_max_dims(layer_shapes.values())
assert (max_in, max_out) == (80, 80)
assert tuple(model.vera_A.shape) == (r, max_in) and tuple(model.vera_B.shape) == (
    max_out,
    r,
)
dims = ref.find_max_dims([(100, 20), (80, 50)])  # PEFT's example, (out, in) each
assert dims == ref.MaxDims(max_in=50, max_out=100) and (dims.max_in, dims.max_out) == (
    50,
    100,
)

# %% [markdown]
# ## 2. The top-left corners
#
# A layer with `in` inputs and `out` outputs uses the first `in` columns of `A` and the first `out` rows of
# `B`. Laid out like a matrix product — `B` on the left, `A` on top — the layer's `B_s A_s` is the
# `out × in` block in the top-left corner of the big product `vera_B @ vera_A`:


# %%
def draw_slices(fig, name, out_features, in_features, r, prng_key=0):
    """Draw vera_B (left), vera_A (top) and vera_B @ vera_A.

    One layer's slices are bright, the rest faded.

    Args:
        fig: the matplotlib figure (or subfigure) to draw in.
        name: the layer's name, for the labels.
        out_features, in_features: the layer's shape.
        r: the rank of the pair to draw.
        prng_key: the seed of the pair.
    """
    vera_A, vera_B = ref.init_projections(r, max_in, max_out, prng_key)
    A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features, out_features)
    grid = fig.add_gridspec(
        2,
        2,
        width_ratios=[r, max_in],
        height_ratios=[r, max_out],
        wspace=0.04,
        hspace=0.04,
    )
    ax_label, ax_A = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_B, ax_product = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    for ax, full, used in [
        (ax_A, vera_A, A_s),
        (ax_B, vera_B, B_s),
        (ax_product, vera_B @ vera_A, B_s @ A_s),
    ]:
        limit = full.abs().max()
        style = dict(cmap="RdBu", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.imshow(full, alpha=0.2, **style)
        rows, cols = used.shape
        # imshow centres pixels on integers, so a block of k cells spans -0.5 .. k -
        # 0.5.
        ax.imshow(used, extent=(-0.5, cols - 0.5, rows - 0.5, -0.5), **style)
        ax.add_patch(
            Rectangle(
                (-0.5, -0.5), cols, rows, fill=False, edgecolor="black", linewidth=2
            )
        )
        ax.set_xlim(-0.5, full.shape[1] - 0.5)
        ax.set_ylim(full.shape[0] - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    ax_label.axis("off")
    ax_label.text(
        0.5,
        0.5,
        f"{name}\n{out_features} × {in_features}",
        ha="center",
        va="center",
        fontsize=10,
    )
    ax_A.set_title(
        f"A_s = vera_A[:, :{in_features}]   (vera_A is {r} × {max_in})", fontsize=9
    )
    ax_B.set_ylabel(
        f"B_s = vera_B[:{out_features}, :]   (vera_B is {max_out} × {r})", fontsize=9
    )
    ax_product.set_xlabel(
        f"B_s A_s = (vera_B @ vera_A)[:{out_features}, :{in_features}]", fontsize=9
    )


# the first layer of each distinct shape: q_proj, k_proj, gate_proj, down_proj
distinct_layers = {}
for short_name, shape in layer_shapes.items():
    if shape not in distinct_layers.values():
        distinct_layers[short_name] = shape

fig = plt.figure(figsize=(11, 10))
for subfigure, (short_name, (out_features, in_features)) in zip(
    fig.subfigures(2, 2, wspace=0.05, hspace=0.05).flat,
    distinct_layers.items(),
    strict=True,
):
    draw_slices(subfigure, short_name, out_features, in_features, r=r)
plt.show()

# %% [markdown]
# Every bright block starts in the top-left corner: `k_proj` (16 × 32) uses the first 32 columns of `A` and
# the first 16 rows of `B`; `gate_proj` (80 × 32) the same columns and every row of `B`; `down_proj` (32 × 80)
# every column of `A` and the first 32 rows of `B`. Layers of the same width read the same columns: the random
# subspace is shared, and only the λ vectors make each layer's update its own.

# %% [markdown]
# ## 3. Views, not copies — and what the model computes with them
#
# `slice_projections` returns views: they start at the same memory as the pair. And the corner of the one
# product is each layer's own product of slices.

# %%
vera_A, vera_B = model.vera_A, model.vera_B
product = vera_B @ vera_A
for out_features, in_features in layer_shapes.values():
    A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features, out_features)
    assert A_s.shape == (r, in_features) and B_s.shape == (out_features, r)
    # views
    assert A_s.data_ptr() == vera_A.data_ptr() and B_s.data_ptr() == vera_B.data_ptr()
    torch.testing.assert_close(B_s @ A_s, product[:out_features, :in_features])

# %% [markdown]
# The adapted model's layers use exactly these slices: each VeRA layer's output equals the reference
# forward pass `vera_forward` with the pair, the layer's weight and its (here random, `init_weights=False`)
# λ vectors.

# %%
x = torch.randn(5, max_in)
with torch.no_grad():
    for _, layer in model.vera_layers():
        x_layer = x[:, : layer.in_features]
        expected = ref.vera_forward(
            x_layer,
            layer.base_layer.weight,
            layer.base_layer.bias,
            vera_A,
            vera_B,
            layer.vera_lambda_d["default"],
            layer.vera_lambda_b["default"],
        )
        torch.testing.assert_close(layer(x_layer), expected)
print(
    f"{sum(1 for _ in model.vera_layers())} adapted layers checked against the "
    "reference"
)

# %% [markdown]
# ## 4. Try it: pick a layer and a rank
#
# Pick a layer and a rank: the figure outlines that layer's slices of a pair of that rank. It
# is drawn once for `k_proj` at r = 16, which is what the documentation site shows; in Jupyter
# the controls below redraw it.


# %%
def draw_one_layer(layer="k_proj", rank=16):
    """Draw one layer's slices of a pair of rank `rank`; returns A_s's, B_s's shapes."""
    out_features, in_features = layer_shapes[layer]
    fig = plt.figure(figsize=(6, 6))
    draw_slices(fig, layer, out_features, in_features, r=rank)
    plt.show()
    vera_A, vera_B = ref.init_projections(rank, max_in, max_out, prng_key=0)
    A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features, out_features)
    return tuple(A_s.shape), tuple(B_s.shape)


draw_one_layer()

# %% tags=["widget"]
layer_choice = widgets.Dropdown(
    options=list(layer_shapes), value="k_proj", description="layer"
)
rank_slider = widgets.IntSlider(value=16, min=4, max=64, step=4, description="rank r")
slices_control = widgets.interactive(
    draw_one_layer, layer=layer_choice, rank=rank_slider
)
display(slices_control)

# %% tags=["widget"]
# Moving a control redraws the figure; the callback returns the slices' shapes.
layer_choice.value, rank_slider.value = "down_proj", 32
assert slices_control.result == ((32, 80), (32, 32))  # A_s (r, in), B_s (out, r)

# %% [markdown]
# ## Exercise: slice the pair for one layer
#
# Write `my_slice(vera_A, vera_B, in_features, out_features)` that returns the `(A_s, B_s)` a
# layer of that shape uses. They must be *views* of the shared pair, not copies: the checker
# tests the values, the shapes and that your slices share the pair's memory.


# %% jupyter={"source_hidden": true}
# Worked solution: replace the body with your own and run the checker below.
def my_slice(vera_A, vera_B, in_features, out_features):
    return vera_A[:, :in_features], vera_B[:out_features, :]


# %%
from veralab import exercises

feedback = exercises.check_slicing(my_slice)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [04 · Lambda scaling](04_lambda_scaling_forward.ipynb): the forward pass, one
# equation at a time.
