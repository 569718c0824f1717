# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 11 · Adapter groups: different ranks and keys, one model, one batch
#
# Notebook 08 served many adapters that all read one frozen pair `vera_A`, `vera_B`.
# But a pair is drawn by `init_projections(r, max_in, max_out, projection_prng_key)`:
# an adapter of another rank, another key or other target sizes reads another pair.
# veralab gives every adapter exactly the pair it would read as the model's only
# adapter (so its outputs and files are what they would be alone), keeps the adapters
# whose four numbers agree in one *group* around one shared pair, and serves rows of
# every group in one batch.
#
# **What you will learn**
#
# 1. Which adapters share a pair: `model.projection_groups()`,
#    `model.projections_of(name)`, and the buffers that hold the pairs: `vera_A` and
#    `vera_B` for the first group, then `vera_A_1`/`vera_B_1`, ...
# 2. How to train adapters of different ranks and keys on one model, each on its own
#    task, without touching the others.
# 3. How to serve them in ONE mixed batch (`adapter_names=[...]`), every row equal to
#    its adapter run alone, and what that costs: one pair of thin matmuls per group
#    present, counted to the FLOP.
# 4. What the projections weigh: bytes per group, against one pair per adapter; and
#    which adapter files must carry their pair.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # all below is local; never reach a hub

import json
import tempfile

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch, Rectangle
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import BASE_ROW, get_model

# %% [markdown]
# ## 1. Four adapters, three pairs
#
# A tiny Llama (2 layers, width 32, vocabulary 96), built from a config: no download.
# Four adapters on the same layers:
#
# | adapter | r | key | its pair |
# |---|---|---|---|
# | alpha | 16 | 0 | drawn for alpha |
# | beta | 16 | 0 | the same four numbers as alpha: alpha's pair |
# | gamma | 4 | 0 | another rank: its own pair |
# | delta | 32 | 7 | another rank and key: its own pair |
#
# The targets include `lm_head`: the base model is random and tiny, and with its
# output layer frozen the λ vectors could move its predictions only a little in a few
# steps.

# %%
torch.manual_seed(0)
llama_config = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=88,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
base_model = LlamaForCausalLM(llama_config)
targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
adapters = {
    "alpha": VeraConfig(r=16, target_modules=targets),
    "beta": VeraConfig(r=16, target_modules=targets),
    "gamma": VeraConfig(r=4, target_modules=targets),
    "delta": VeraConfig(r=32, projection_prng_key=7, target_modules=targets),
}
first, *others = adapters
model = get_model(base_model, adapters[first], adapter_name=first)
for name in others:
    model.add_adapter(name, adapters[name])

groups = model.projection_groups()
print(f"{'buffers':<20}{'r':>4}{'max_in':>8}{'max_out':>9}{'key':>5}   adapters")
for pair, names in groups:
    buffers = "/".join(model.projection_buffer_names(names[0]))
    sizes = f"{pair.r:>4}{pair.max_in:>8}{pair.max_out:>9}"
    print(f"{buffers:<20}{sizes}{pair.prng_key:>5}   {', '.join(names)}")

# %%
assert [names for _, names in groups] == [["alpha", "beta"], ["gamma"], ["delta"]]
assert model.projections_of("beta") is model.projections_of("alpha")  # one object
assert model.projections_of("gamma") is not model.projections_of("alpha")
assert model.projection_buffer_names("beta") == ("vera_A", "vera_B")
assert model.projection_buffer_names("gamma") == ("vera_A_1", "vera_B_1")
assert model.projection_buffer_names("delta") == ("vera_A_2", "vera_B_2")
assert model.projections_of("delta").vera_A is model.vera_A_2
# Every adapter reads exactly the pair it would draw alone over its own targets...
for name, config in adapters.items():
    layers = [layer for _, layer in model.vera_layers() if name in layer.r]
    shapes = [(m.out_features, m.in_features) for m in layers]
    max_in, max_out = ref.find_max_dims(shapes)
    key = config.projection_prng_key
    vera_A, vera_B = ref.init_projections(config.r, max_in, max_out, key)
    pair = model.projections_of(name)
    assert torch.equal(pair.vera_A, vera_A) and torch.equal(pair.vera_B, vera_B), name
# ...and every layer reads it through the model's one object for the group.
for _, layer in model.vera_layers():
    for name in adapters:
        assert layer.projections_of(name) is model.projections_of(name)

# %% [markdown]
# ## 2. Each adapter learns its own task
#
# The toy task: each adapter's users write only tokens from their own quarter of the
# vocabulary (alpha 0-23, beta 24-47, gamma 48-71, delta 72-95), so each adapter
# should learn to predict tokens of its quarter. `set_adapter(name)` makes that
# adapter's λ vectors the only trainable parameters; then 25 steps of Adam on the
# next-token loss, plain torch.

# %%
BAND = llama_config.vocab_size // len(adapters)
band_of = {name: index for index, name in enumerate(adapters)}


def band_batch(name, rows, generator, length=12):
    """`rows` sequences of tokens from adapter `name`'s quarter of the vocabulary."""
    start = BAND * band_of[name]
    return torch.randint(start, start + BAND, (rows, length), generator=generator)


def lambdas_of(name):
    parameters = model.named_parameters()
    return {k: p.detach().clone() for k, p in parameters if k.endswith(f".{name}")}


def train(name, steps=25, lr=0.1):
    model.set_adapter(name)
    model.train()
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.endswith(f".{name}") for k in trainable)
    assert all(".vera_lambda_" in k for k in trainable)
    optimizer = torch.optim.Adam(trainable.values(), lr=lr)
    generator = torch.Generator().manual_seed(band_of[name])
    losses = []
    for _ in range(steps):
        input_ids = band_batch(name, 8, generator)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


losses, trained = {}, {}
for name in adapters:
    losses[name] = train(name)
    trained[name] = lambdas_of(name)
    print(f"{name:<6} loss {losses[name][0]:.2f} -> {losses[name][-1]:.2f}")
model.eval()

# %% [markdown]
# How much of its next-token probability each adapter puts on its own quarter, over
# held-out sequences of that quarter (the base model spreads it about evenly):


# %%
def logits(input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def band_mass(logits_):
    """Mean next-token probability on each quarter of the vocabulary: (..., 4)."""
    probabilities = logits_.softmax(-1).unflatten(-1, (len(adapters), BAND))
    return probabilities.sum(-1).mean(-2)


held_out = torch.Generator().manual_seed(100)
mass, base_mass = {}, {}
for name in adapters:
    input_ids = band_batch(name, 16, held_out)
    model.set_adapter(name)
    mass[name] = band_mass(logits(input_ids)).mean(0)[band_of[name]].item()
    with model.disable_adapter():
        base_mass[name] = band_mass(logits(input_ids)).mean(0)[band_of[name]].item()
    print(f"{name:<6} on its quarter: {mass[name]:.2f}", end="   ")
    print(f"base model: {base_mass[name]:.2f}")

# %%
for name in adapters:
    assert sum(losses[name][-5:]) / 5 < losses[name][0] - 0.5  # fell by > 0.5 nat
    assert mass[name] > 0.6 > 0.4 > base_mass[name]
    # Training the adapters after it (beta reads its pair) left its λ vectors alone.
    current = lambdas_of(name)
    assert all(torch.equal(current[k], trained[name][k]) for k in current)

# %% [markdown]
# ## 3. All four in one batch
#
# One batch of eight rows: two for alpha, one for beta, two for gamma, two for delta,
# one for the base model (`"__base__"`). Each row holds tokens of its adapter's
# quarter.
#
# Every row must equal its adapter run alone (`set_adapter`). Not bit for bit: alone,
# a layer may compute the adapter term in another order (through `Λ_b B_s Λ_d`, or a
# merged weight), and float32 sums taken in another order round differently. One
# reordered dot product of length `n` can move by up to about `2 n ε` times the sum of
# its terms' magnitudes; the longest here is the MLP's, `n = 88`. We allow that much
# relative to the largest logit, `2 · 88 · ε ≈ 2e-5`, and check that it is tiny beside
# what a wrong answer would be: the same row under any other adapter, or none.

# %%
rows = ["alpha", "gamma", BASE_ROW, "delta", "beta", "gamma", "alpha", "delta"]
batch_generator = torch.Generator().manual_seed(200)
row_bands = ["alpha" if row == BASE_ROW else row for row in rows]
input_ids = torch.cat([band_batch(row, 1, batch_generator) for row in row_bands])
mixed = logits(input_ids, adapter_names=rows)


def alone(name, input_ids):
    if name == BASE_ROW:
        with model.disable_adapter():
            return logits(input_ids)
    model.set_adapter(name)
    return logits(input_ids)


candidates = [*adapters, BASE_ROW]
each_alone = {name: alone(name, input_ids) for name in candidates}
EPS = torch.finfo(torch.float32).eps
tolerance = 2 * 88 * EPS * mixed.abs().max().item()


def gap(a, b):
    return (a - b).abs().max().item()


errors, nearest_wrong = [], []
for row, name in enumerate(rows):
    gaps = {other: gap(mixed[row], each_alone[other][row]) for other in candidates}
    errors.append(gaps.pop(name))
    nearest_wrong.append(min(gaps.values()))
print(f"tolerance {tolerance:.1e}")
print(f"largest |mixed row - its adapter alone|:         {max(errors):.1e}")
print(f"smallest |mixed row - another adapter or none|:  {min(nearest_wrong):.1e}")

# %%
assert max(errors) <= tolerance  # every row is its own adapter's output...
assert min(nearest_wrong) > 1000 * tolerance  # ...and far from every other's

# %% [markdown]
# What the batch costs. In every adapted layer, for each group of projections that
# some row uses, a mixed batch computes two thin matmuls over the whole batch,
# `h = x A_sᵀ` and `(Λ_d[row] ⊙ h) B_sᵀ` (rows of other groups get zero λ vectors
# there), then scales each row by its `Λ_b[row]`. That is `2 · N · r · (in + out)`
# FLOPs per layer for `N` tokens, less the `in` term for `v_proj`, which reads
# `q_proj`'s input through the same slice of `A` and reuses its `h`. Adapters sharing
# a pair share these matmuls: beta's rows beside alpha's cost nothing more. PyTorch's
# `FlopCounterMode` counts the matmul FLOPs.


# %%
def flops(names):
    """Matmul FLOPs of one forward over the 8-row batch, row i for adapter names[i]."""
    with FlopCounterMode(display=False) as counter:
        if names is None:
            alone(BASE_ROW, input_ids)
        else:
            logits(input_ids, adapter_names=names)
    return counter.get_total_flops()


tokens = input_ids.numel()


def thin_matmuls(r):
    """Predicted FLOPs of one group's two thin matmuls in every adapted layer."""
    total = 0
    for layer_name, layer in model.vera_layers():
        in_features = 0 if layer_name.endswith("v_proj") else layer.in_features
        total += 2 * tokens * r * (in_features + layer.out_features)
    return total


base_flops = flops(None)
cost = {
    "alpha only": flops(["alpha"] * 8),
    "alpha and beta (one group)": flops(["alpha", "beta"] * 4),
    "gamma only": flops(["gamma"] * 8),
    "delta only": flops(["delta"] * 8),
    "the batch above (3 groups)": flops(rows),
}
print(f"base model: {base_flops / 1e6:.2f} MFLOP")
for label, value in cost.items():
    print(f"{label:<28} base + {(value - base_flops) / 1e6:.2f} MFLOP")

# %%
extra = {label: value - base_flops for label, value in cost.items()}
assert extra["alpha only"] == thin_matmuls(16)  # counted to the FLOP
assert extra["gamma only"] == thin_matmuls(4)
assert extra["delta only"] == thin_matmuls(32)
assert extra["alpha and beta (one group)"] == extra["alpha only"]  # sharing is free
# One pair of thin matmuls per group present, not per adapter:
three_groups = thin_matmuls(16) + thin_matmuls(4) + thin_matmuls(32)
assert extra["the batch above (3 groups)"] == three_groups

# %% [markdown]
# ## 4. What the projections weigh
#
# A group's pair holds `r · (max_in + max_out)` numbers, once, however many adapters
# and layers read it. Had every adapter its own pair, beta would hold a second copy of
# alpha's.


# %%
def tensor_bytes(tensor):
    return tensor.numel() * tensor.element_size()


def pair_bytes(pair):
    return tensor_bytes(pair.vera_A) + tensor_bytes(pair.vera_B)


held = {", ".join(names): pair_bytes(pair) for pair, names in groups}
one_pair_each = {name: pair_bytes(model.projections_of(name)) for name in adapters}
buffers = dict(model.named_buffers(recurse=False))
buffer_bytes = sum(tensor_bytes(b) for k, b in buffers.items() if k.startswith("vera_"))
lambdas = [p for k, p in model.named_parameters() if ".vera_lambda_" in k]
lambda_bytes = sum(tensor_bytes(p) for p in lambdas)
for label, size in held.items():
    print(f"group {label:<13}{size:>7,d} bytes of projections")
print(f"held by the model:  {buffer_bytes:>7,d} bytes in its vera_A*/vera_B* buffers")
print(f"one pair each:      {sum(one_pair_each.values()):>7,d} bytes")
print(f"λ vectors:          {lambda_bytes:>7,d} bytes, all four adapters")

# %%
for pair, _ in groups:
    assert pair_bytes(pair) == 4 * pair.r * (pair.max_in + pair.max_out)  # float32
assert buffer_bytes == sum(held.values())  # the model holds one pair per group...
assert sum(one_pair_each.values()) - buffer_bytes == one_pair_each["beta"]
# ...and no layer holds a copy: every pair any layer reads lives in those buffers.
pointers = {b.data_ptr() for k, b in buffers.items() if k.startswith("vera_A")}
read = set()
for _, layer in model.vera_layers():
    read |= {layer.projections_of(name).vera_A.data_ptr() for name in adapters}
assert read == pointers and len(pointers) == len(groups)

# %% [markdown]
# ## 5. On disk
#
# PEFT holds one pair per model: it draws the first adapter's and gives every later
# adapter that same pair. So a file without its pair would load into PEFT beside
# another adapter with the wrong one. With `save_projection=False` (λ vectors only),
# veralab leaves the pair out of alpha's and beta's files, which regenerate it from
# their key, but writes gamma's and delta's into theirs, whatever the config says:
# PEFT then loads such a file alone exactly, and refuses it beside another adapter
# instead of running it with the wrong pair.

# %%
with tempfile.TemporaryDirectory() as directory:
    for name in adapters:
        model.peft_config[name].save_projection = False
    model.save_pretrained(directory)
    in_file, saved_flag = {}, {}
    for name in adapters:
        path = os.path.join(directory, name, "adapter_model.safetensors")
        with safe_open(path, "pt") as file:
            in_file[name] = {
                key.rsplit(".", 1)[-1]: tuple(file.get_slice(key).get_shape())
                for key in file.keys()
                if ".vera_lambda_" not in key
            }
        with open(os.path.join(directory, name, "adapter_config.json")) as file:
            saved_flag[name] = json.load(file)["save_projection"]
        print(f"{name:<6} save_projection={saved_flag[name]!s:<6} {in_file[name]}")

# %%
assert in_file["alpha"] == in_file["beta"] == {}  # the first group: drawn from the key
assert not saved_flag["alpha"] and not saved_flag["beta"]
for name in ("gamma", "delta"):
    pair = model.projections_of(name)
    shapes = {"vera_A": (pair.r, pair.max_in), "vera_B": (pair.max_out, pair.r)}
    assert in_file[name] == shapes and saved_flag[name]

# %% [markdown]
# ## 6. The picture
#
# Left: each group's pair drawn to scale (one unit a number), `vera_B (max_out × r)`
# beside `vera_A (r × max_in)`, with the adapters that read it. Middle: the
# projections' bytes, held once per group against one pair per adapter. Right: the
# mixed batch of section 3, row by row: where each row's next-token probability goes,
# by quarter of the vocabulary.

# %%
colors = {
    "alpha": "tab:blue",
    "beta": "tab:blue",
    "gamma": "tab:orange",
    "delta": "tab:green",
}
fig, (ax_pairs, ax_bytes, ax_rows) = plt.subplots(
    1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [1.5, 1, 0.8]}
)

below = {"ha": "center", "va": "top", "fontsize": 8}
x = 0
for pair, names in groups:
    color = colors[names[0]]
    name_A, name_B = model.projection_buffer_names(names[0])
    a_left, a_bottom = x + pair.r + 4, pair.max_out - pair.r
    ax_pairs.add_patch(Rectangle((x, 0), pair.r, pair.max_out, color=color, alpha=0.35))
    ax_pairs.add_patch(Rectangle((a_left, a_bottom), pair.max_in, pair.r, color=color))
    ax_pairs.text(x + pair.r / 2, -6, name_B, **below)
    ax_pairs.text(a_left + pair.max_in / 2, a_bottom - 3, name_A, **below)
    label = f"r={pair.r}, key={pair.prng_key}\nread by {', '.join(names)}"
    ax_pairs.text(x, pair.max_out + 6, label, fontsize=9, va="bottom")
    x = a_left + pair.max_in + 20
ax_pairs.set_xlim(-5, x)
ax_pairs.set_ylim(-16, 132)
ax_pairs.set_aspect("equal")
ax_pairs.axis("off")
ax_pairs.set_title("one pair per group, to scale")

per_adapter = [(name, one_pair_each[name], colors[name]) for name in adapters]
per_group = [("\n".join(n), pair_bytes(p), colors[n[0]]) for p, n in groups]
bars = {"one pair\nper adapter": per_adapter, "held: one\nper group": per_group}
for y, segments in enumerate(bars.values()):
    left = 0
    for text, size, color in segments:
        kib = size / 1024
        ax_bytes.barh(y, kib, left=left, height=0.6, color=color, edgecolor="white")
        if kib > 5:  # gamma's 2.9 KiB shows by its colour only
            ax_bytes.text(left + kib / 2, y, text, ha="center", va="center", fontsize=8)
        left += kib
    ax_bytes.text(left, y, f" {left:.1f} KiB", va="center", fontsize=9)
ax_bytes.set_yticks(range(len(bars)), list(bars))
ax_bytes.set_xlim(0, 1.3 * sum(one_pair_each.values()) / 1024)
legend = [Patch(color=colors[n[0]], label=", ".join(n)) for _, n in groups]
ax_bytes.legend(handles=legend, loc="center right", fontsize=8)
ax_bytes.set_xlabel("KiB of projections (float32)")
ax_bytes.set_title("memory of the projections")

image = ax_rows.imshow(band_mass(mixed).numpy(), cmap="Greys", vmin=0, vmax=1)
ax_rows.set_yticks(range(len(rows)), [f"{i}: {name}" for i, name in enumerate(rows)])
quarters = [f"{BAND * i}-{BAND * i + BAND - 1}" for i in band_of.values()]
ax_rows.set_xticks(range(len(adapters)), quarters, rotation=45, fontsize=8)
ax_rows.set_xlabel("next-token mass on tokens")
ax_rows.set_title("the mixed batch, row by row")
fig.colorbar(image, ax=ax_rows, fraction=0.046)
fig.tight_layout()
plt.show()

# %% [markdown]
# Each row of the one batch lands on its own adapter's quarter, whichever of the
# three pairs that adapter reads; the base-model row spreads its mass. beta costs no
# memory for projections and no extra matmuls beside alpha; gamma and delta each add
# their own pair and their own two thin matmuls per layer.

# %% [markdown]
# ## Exercise: which adapters share a pair?
#
# Five adapters of one model, each given as its rank, the `(out, in)` shapes of the layers it
# targets, and its `projection_prng_key`. Group them by the pair they read: which ones share
# one, and which read their own? Write your answer as a list of groups of names and run the
# checker; it says which two adapters you put together (or apart) wrongly, and why.

# %%
five_adapters = {
    "alpha": (16, [(64, 64), (64, 64)], 0),
    "beta": (16, [(64, 64)], 0),
    "gamma": (32, [(64, 64)], 0),
    "delta": (16, [(64, 64), (172, 64)], 0),
    "epsilon": (16, [(64, 64)], 7),
}

# %% jupyter={"source_hidden": true}
# Worked solution: replace the groups with your own and run the checker below.
# A pair is init_projections(r, max_in, max_out, key): adapters share one when
# their four numbers agree. delta's widest layer has 172 outputs, so max_out = 172.
my_groups = [{"alpha", "beta"}, {"gamma"}, {"delta"}, {"epsilon"}]

# %%
from veralab import exercises

feedback = exercises.check_projection_groups(five_adapters, my_groups)
print(feedback)
assert feedback

# %% [markdown]
# ## Where next
#
# - [08 · Many adapters](08_many_adapters.ipynb): many adapters of one group, timed,
#   weighed on disk and exported as LoRA.
# - [09 · Performance](09_performance.ipynb): the cost model behind the thin matmuls.
# - An adapter of any group loads back with `model.load_adapter(path, name)` and
#   rejoins the group of its pair; `model.set_projections(vera_A, vera_B, name)`
#   replaces one group's pair for every layer reading it.
#
# This is the last notebook of the path: back to the
# [learning path](../docs/index.md#learning-paths) for where to go from here, whether that is
# fine-tuning your own model, coming from PEFT, or contributing to veralab.
