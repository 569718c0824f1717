# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Why VeRA: what LoRA trains, what VeRA trains
#
# LoRA made fine-tuning cheap by training a low-rank update `B A` next to each frozen weight. VeRA
# (Kopiczko et al., ICLR 2024) goes further: the low-rank matrices are *random, frozen and shared by every
# layer*, and each layer trains only two vectors.
#
# **What you will learn**
#
# 1. How many numbers LoRA and VeRA train for one layer, and why VeRA's count hardly depends on the rank.
# 2. The VeRA paper's table of trainable parameters (RoBERTa, GPT-2, LLaMA, ViT), reproduced from the real
#    models' configs with `veralab.counting`, and drawn on a log scale.
# 3. What it means on disk: the bytes of an adapter file, with and without the shared projections.
#
# Counting needs no weights: models are built on PyTorch's *meta* device, where tensors have a shape and no
# memory, so even LLaMA 13B is counted in a fraction of a second. Only section 3 builds a (tiny) real model.
#
# In the code: §1 of `veralab.reference` (`vera_trainable_per_layer`, `lora_trainable_per_layer`) writes the
# count of one layer; `veralab.counting` applies it to whole models.

# %%
import copy
import os
import struct
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import peft
from transformers import BertConfig, BertModel

from veralab import VeraConfig
from veralab.counting import (
    PAPER_TABLE,
    LayerShape,
    adapted_layer_shapes,
    build_meta_model,
    lora_trainable_parameters,
    paper_table_rows,
    vera_trainable_parameters,
)
from veralab.fast import get_model
from veralab.reference import (
    find_max_dims,
    lora_trainable_per_layer,
    vera_trainable_per_layer,
)

# %% [markdown]
# ## 1. One layer
#
# Take one frozen weight `W0` of shape `(out, in)`.
#
# | | update | trained | trainable numbers |
# |---|---|---|---|
# | LoRA | `W0 + B A` | `B (out × r)`, `A (r × in)` | `r · (in + out)` |
# | VeRA | `W0 + Λ_b B Λ_d A` | `λ_d (r)`, `λ_b (out)`; `A`, `B` frozen and shared | `r + out` |
#
# LoRA's count grows with the rank times the layer's width; VeRA's grows with the rank *plus* the width.
# That is why VeRA runs at ranks of 256 to 1024, far above LoRA's usual 4 to 64. Take LLaMA 7B's
# `q_proj` (4096 × 4096):

# %%
q_proj = [LayerShape("q_proj", out_features=4096, in_features=4096)]
ranks = [1, 4, 16, 64, 256, 1024, 4096]
for r in ranks:
    lora = lora_trainable_parameters(q_proj, r)
    vera = vera_trainable_parameters(q_proj, r)
    print(
        f"r = {r:5d}   LoRA {lora:>12,d}   VeRA {vera:>7,d}   LoRA / VeRA = "
        f"{lora / vera:8.1f}"
    )

# %%
assert (
    lora_trainable_parameters(q_proj, r=8)
    == 8 * (4096 + 4096)
    == lora_trainable_per_layer(4096, 4096, 8)
)
assert (
    vera_trainable_parameters(q_proj, r=1024)
    == 1024 + 4096
    == vera_trainable_per_layer(4096, r=1024)
)
# VeRA at rank 1024 trains fewer numbers than LoRA at rank 1.
assert vera_trainable_parameters(q_proj, r=1024) < lora_trainable_parameters(
    q_proj, r=1
)

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.loglog(
    ranks,
    [lora_trainable_parameters(q_proj, r) for r in ranks],
    "o-",
    label="LoRA: r (in + out)",
)
ax.loglog(
    ranks,
    [vera_trainable_parameters(q_proj, r) for r in ranks],
    "s-",
    label="VeRA: r + out",
)
ax.set_xlabel("rank r")
ax.set_ylabel("trainable parameters of one layer")
ax.set_title("LLaMA 7B q_proj (4096 × 4096)")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# LoRA's line climbs by a factor of 4 for every factor of 4 in the rank. VeRA's is flat until `r`
# approaches `out`: the 4096 entries of `λ_b` dominate, and the rank only adds `r` more.

# %% [markdown]
# ## 2. The paper's table, from the real configs
#
# `veralab.counting.PAPER_TABLE` holds one row per model of the VeRA paper's tables: a transformers config
# with the released model's hyperparameters, the layers the paper adapts, both ranks, and the figures as
# the paper printed them. `paper_table_rows()` builds each model on the meta device, finds the adapted
# layers with PEFT's `target_modules` rules, and counts.

# %%
rows = paper_table_rows()
print(f"{'model':<14}{'layers':>7}{'VeRA r':>8}{'VeRA':>12}{'printed':>9}", end="")
print(f"{'LoRA r':>8}{'LoRA':>14}{'printed':>9}")
for row in rows:
    print(
        f"{row.label:<14}{row.adapted_layers:>7}{row.vera_r:>8}"
        f"{row.vera_computed:>12,d}{row.paper_vera:>9}"
        f"{row.lora_r:>8}{row.lora_computed:>14,d}{row.paper_lora:>9}"
    )
print()
for row in rows:
    if row.note:
        print(f"{row.label}: {row.note}")

# %% [markdown]
# Every VeRA figure of the paper comes out of the arithmetic, to the digits it printed. So does every LoRA
# figure except GPT-2's: there the paper prints the LoRA paper's figures, which `r · (in + out)` over the
# adapted q and v blocks does not reproduce; `note` says so rather than hiding it.

# %%
assert len(rows) == len(PAPER_TABLE) == 8
assert all(row.vera_matches for row in rows), [
    row.label for row in rows if not row.vera_matches
]
assert all(row.lora_matches or row.note for row in rows)
assert [row.label for row in rows if not row.lora_matches] == [
    "GPT-2 medium",
    "GPT-2 large",
]
# VeRA trains at least 4x fewer parameters than LoRA everywhere, and about 100x fewer on
# LLaMA.
ratios = {row.label: row.lora_computed / row.vera_computed for row in rows}
assert min(ratios.values()) >= 4
assert ratios["LLaMA 7B"] > 100 and ratios["LLaMA 13B"] > 100

# %%
labels = [f"{row.label}\nr = {row.lora_r} | {row.vera_r}" for row in rows]
positions = np.arange(len(rows))


def bars_per_model(series, ylabel, title):
    """Grouped bars on a log scale, one group per model of the paper's table.

    Args:
        series: {legend label: one value per model, in table order}.
        ylabel, title: the axis label and the title.
    """
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(
            positions + (i - (len(series) - 1) / 2) * width, values, width, label=label
        )
    ax.set_yscale("log")
    ax.set_xticks(positions, labels, fontsize=9)
    ax.set_xlabel("model, with the ranks used in the paper: LoRA | VeRA")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return ax


ax = bars_per_model(
    {
        "LoRA": [row.lora_computed for row in rows],
        "VeRA": [row.vera_computed for row in rows],
    },
    "trainable parameters (log scale)",
    "The VeRA paper's models: LoRA trains this many times more parameters than VeRA",
)
for position, row in zip(positions, rows, strict=True):
    ax.annotate(
        f"{ratios[row.label]:.0f}×",
        (position, row.lora_computed),
        xytext=(0, 4),
        textcoords="offset points",
        ha="center",
        fontsize=9,
    )
ax.set_ylim(top=3 * max(row.lora_computed for row in rows))  # room for the labels
plt.show()

# %% [markdown]
# ## 3. On disk
#
# An adapter file in PEFT's layout is a `safetensors` file: an 8-byte header length, a JSON header naming
# each tensor, then the raw tensor bytes. A VeRA adapter holds, under PEFT's keys,
#
# - `base_model.model.<layer>.vera_lambda_d` and `.vera_lambda_b` for every adapted layer, and
# - `base_model.vera_A`, `base_model.vera_B`: the shared projections, unless `save_projection=False`
#   (notebook 02 shows what leaving them out saves and risks).
#
# We adapt a tiny BERT with veralab and save its adapter both ways with `save_pretrained`, save a LoRA adapter
# for the same layers with PEFT, and look at the bytes.

# %%
bert = BertModel(
    BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
)
targets = ["query", "value"]
shapes = adapted_layer_shapes(bert, targets)
lora_model = peft.get_peft_model(
    copy.deepcopy(bert), peft.LoraConfig(r=8, target_modules=targets)
)
vera_model = get_model(bert, VeraConfig(r=32, target_modules=targets))


def adapter_file_bytes(save_pretrained, directory):
    """Save an adapter; return (file size, header size, tensor bytes) of its
    adapter_model.safetensors."""
    save_pretrained(directory)
    path = os.path.join(directory, "adapter_model.safetensors")
    with open(path, "rb") as f:
        # little-endian u64: the JSON header's length
        (header_bytes,) = struct.unpack("<Q", f.read(8))
    file_bytes = os.path.getsize(path)
    return file_bytes, 8 + header_bytes, file_bytes - 8 - header_bytes


sizes = {}
with tempfile.TemporaryDirectory() as directory:
    sizes["VeRA r=32, λ + A, B"] = adapter_file_bytes(
        vera_model.save_pretrained, f"{directory}/vera"
    )
    # the same adapter, saved without the pair
    vera_model.peft_config["default"].save_projection = False
    sizes["VeRA r=32, λ only"] = adapter_file_bytes(
        vera_model.save_pretrained, f"{directory}/vera_lambdas"
    )
    sizes["LoRA r=8 (PEFT)"] = adapter_file_bytes(
        lora_model.save_pretrained, f"{directory}/lora"
    )
for label, (file_bytes, header_bytes, tensor_bytes) in sizes.items():
    print(f"{label:<22}{file_bytes:>8,d} bytes on disk = ", end="")
    print(f"{header_bytes:>5,d} header + {tensor_bytes:>6,d} tensor bytes")

# %%
vera_trainable, _ = vera_model.get_nb_trainable_parameters()
assert vera_trainable == vera_trainable_parameters(shapes, r=32) == 4 * (32 + 64)
# Past the header, a file holds exactly 4 bytes (float32) per number it stores.
assert sizes["VeRA r=32, λ only"][2] == 4 * vera_trainable
assert sizes["VeRA r=32, λ + A, B"][2] == 4 * (vera_trainable + 32 * 64 + 64 * 32)
assert sizes["LoRA r=8 (PEFT)"][2] == 4 * lora_trainable_parameters(shapes, r=8)

# %% [markdown]
# So an adapter's size is 4 bytes per stored float32 plus a header of about a hundred bytes per tensor
# (veralab adds a few hundred bytes: a fingerprint of the projections, which notebook 02 puts to use).
# For the paper's models: VeRA's λ vectors, the shared projections (stored once, `r × max_in + max_out × r`
# numbers, whatever the number of layers), and LoRA's matrices:

# %%
MB = 1e6
table = {}
for paper_row, row in zip(PAPER_TABLE, rows, strict=True):
    row_shapes = adapted_layer_shapes(
        build_meta_model(paper_row.config), paper_row.target_modules
    )
    # from (out, in) shapes: (max_in, max_out)
    dims = find_max_dims((out, in_) for _, out, in_ in row_shapes)
    projections = paper_row.vera_r * dims.max_in + dims.max_out * paper_row.vera_r
    table[row.label] = (
        4 * row.vera_computed,
        4 * (row.vera_computed + projections),
        4 * row.lora_computed,
    )
print(
    f"{'model':<14}{'VeRA λ only':>14}{'VeRA λ + A, B':>16}{'LoRA':>12}   (MB, float32)"
)
for label, (lambdas_only, with_projections, lora) in table.items():
    print(
        f"{label:<14}{lambdas_only / MB:>14.2f}{with_projections / MB:>16.2f}"
        f"{lora / MB:>12.2f}"
    )

# %%
columns = ("VeRA, λ only", "VeRA, λ + A, B", "LoRA")
bars_per_model(
    {
        kind: [sizes[column] / MB for sizes in table.values()]
        for column, kind in enumerate(columns)
    },
    "adapter file size, MB (log scale)",
    "Adapter file sizes (float32): the shared projections can outweigh the whole LoRA "
    "adapter",
)
plt.show()

# %%
# LLaMA 7B: VeRA's vectors are 6.4 MB against LoRA's 640 MB; the shared projections add
# 90 MB once.
lambdas_only, with_projections, lora = table["LLaMA 7B"]
assert round(lambdas_only / MB, 1) == 6.4 and round(lora / MB) == 640
assert round((with_projections - lambdas_only) / MB) == 90
# The λ vectors alone are always smaller than LoRA's matrices ...
assert all(lambdas_only < lora for lambdas_only, _, lora in table.values())
# ... but the projections are sized by the largest layer: on a small model at r=1024
# they outweigh LoRA.
lambdas_only, with_projections, lora = table["RoBERTa-base"]
assert with_projections > 5 * lora
assert sum(with_projections > lora for _, with_projections, lora in table.values()) == 4

# %% [markdown]
# Two lessons. VeRA's *trained* state is small: a few hundred kilobytes for RoBERTa, GPT-2 and ViT, a few
# megabytes for LLaMA, 4 to 100 times less than LoRA's. But the file PEFT writes by default
# (`save_projection=True`) also carries the shared `A` and `B`, sized for the largest adapted layer at VeRA's
# high rank. On four of the eight models that makes the VeRA file larger than LoRA's — on RoBERTa-base at
# r = 1024, five times larger — while on LLaMA 7B it is still 6.6 times smaller. The projections are the same
# for every adapter of a model, so they pay off when one base model serves many adapters, or when they are
# regenerated from their seed instead of stored: notebook 02 shows how that works and what it risks.

# %% [markdown]
# ## 4. Try it: the rank, the width and the number of layers
#
# Move the rank, the width of a model's square layers (its hidden size) and how many of them
# are adapted: the bars are the trainable parameters of LoRA and VeRA, from §1 of
# `veralab.reference`. The figure is drawn once at the default values (LLaMA 7B's 64 `q_proj`
# and `v_proj` layers at r = 256), which is what the documentation site shows; in Jupyter the
# controls below it redraw it.

# %%
import ipywidgets as widgets
from IPython.display import display


def draw_counts(r=256, width=4096, layers=64):
    """LoRA's and VeRA's trainable parameters over `layers` square layers, as bars.

    Args:
        r: the rank, the same for both methods.
        width: each layer's in and out features.
        layers: how many layers are adapted.

    Returns:
        (LoRA's count, VeRA's count).
    """
    lora = layers * lora_trainable_per_layer(width, width, r)
    vera = layers * vera_trainable_per_layer(width, r)
    fig, ax = plt.subplots(figsize=(7, 2.4))
    ax.barh(["VeRA", "LoRA"], [vera, lora], color=["tab:orange", "tab:blue"])
    ax.set_xscale("log")
    ax.set_xlim(1e2, 1e10)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_title(
        f"{layers} layers of {width} × {width} at r = {r}: LoRA trains "
        f"{lora / vera:,.1f}× VeRA's"
    )
    fig.tight_layout()
    plt.show()
    return lora, vera


draw_counts()

# %% tags=["widget"]
rank_slider = widgets.SelectionSlider(
    options=[2**k for k in range(13)], value=256, description="rank r"
)
width_choice = widgets.Dropdown(
    options=[768, 1024, 2048, 4096, 8192], value=4096, description="width"
)
counts_control = widgets.interactive(
    draw_counts,
    r=rank_slider,
    width=width_choice,
    layers=widgets.IntSlider(value=64, min=2, max=160, step=2, description="layers"),
)
display(counts_control)

# %% tags=["widget"]
# Moving a control calls draw_counts again: its result is the new pair of counts.
rank_slider.value = 1024
width_choice.value = 8192
assert counts_control.result == (64 * 1024 * (8192 + 8192), 64 * (1024 + 8192))
# VeRA at rank 1024 still trains fewer numbers than LoRA at rank 8.
rank_slider.value, width_choice.value = 8, 4096
lora_at_8, _ = counts_control.result
assert 64 * (1024 + 8192) < lora_at_8

# %% [markdown]
# ## Exercise: predict a model's trainable parameters
#
# BERT-base has 12 layers; adapt `query` and `value` (both 768 × 768) in each. How many
# numbers does VeRA train at r = 256, and how many does LoRA train at r = 8? Work it out by
# hand, write your numbers in the cell below (a worked solution is there, collapsed: try
# first, then compare), and run the checker after it: it says what is right or what is off.

# %% jupyter={"source_hidden": true}
# Worked solution: replace the numbers with your own and run the checker below.
bert_layers = [(768, 768)] * 24  # (out, in) of 12 × (query, value)
my_vera = 24 * (256 + 768)  # λ_d (r) + λ_b (out), per layer
my_lora = 24 * 8 * (768 + 768)  # A (r × in) + B (out × r), per layer

# %%
from veralab import exercises

feedback = exercises.check_trainable_parameters(bert_layers, 256, vera=my_vera)
print(feedback)
assert feedback
feedback = exercises.check_trainable_parameters(bert_layers, 8, lora=my_lora)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [02 · The shared random projections](02_shared_random_projections.ipynb): where
# `A` and `B` come from, and how a seed can stand in for them.
