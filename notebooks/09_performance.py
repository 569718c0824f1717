# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Performance: the cost model against the clock and the memory
#
# An adapted layer with `x (N × in)`, a frozen `W (out × in)` and the slices `A_s (r × in)`, `B_s (out × r)`
# computes `y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ x A_sᵀ) B_sᵀ)` (notebook 04). How much does that cost to *train*, in
# arithmetic and in memory? `docs/design.md` writes it down as a cost model, and `veralab.fast` uses the model
# to decide, layer by layer, how to compute the adapter. This notebook checks the model against what PyTorch
# actually does.
#
# **What you will learn**
#
# 1. The cost model of one layer: the frozen base, VeRA the way PEFT computes it ("activation space"), and
#    veralab's two exact paths; where weight space becomes cheaper, the crossover `choose_path` uses — and
#    that `path_costs` is what PyTorch's `FlopCounterMode` counts, to the FLOP.
# 2. The clock: training steps of one layer, timed, against the multiply-adds the model predicts.
# 3. The memory: what autograd keeps for the backward of a small Llama, measured byte for byte and equal to
#    the prediction — PEFT keeps `N × (r + out)` numbers per layer, veralab `N × r` per *group* of layers.
# 4. That none of this trades away correctness: on both paths veralab computes what the reference and PEFT
#    compute, to float32 rounding.
# 5. Where the full-size numbers are.

# %%
import os

# everything below is local; never reach for a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import statistics
import time
import warnings
from collections import OrderedDict

import matplotlib.pyplot as plt
import numpy as np
import peft
import torch
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import get_model
from veralab.fast.diagnostics import layers_sharing_inputs, saved_activation_bytes
from veralab.fast.dispatch import (
    ACTIVATION_SPACE,
    WEIGHT_SPACE,
    choose_path,
    path_costs,
)
from veralab.fast.functional import (
    activation_space_vera,
    scaled_projection,
    weight_space_vera,
)

# PEFT 0.21 calls a transformers method that transformers 5 deprecates; nothing to act
# on here.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
# One thread: the cost model counts work, not parallelism, and one thread times more
# steadily on a shared
# machine.
torch.set_num_threads(1)

# %% [markdown]
# ## 1. The cost model of one layer
#
# Count multiply-adds (MACs; one MAC is two FLOPs) for one training step of one layer, with `N` tokens. The
# base layer is frozen, but the step still back-propagates through it to its input (the layers below need that
# gradient), so the base costs `N·in·out` forward and `N·out·in` backward. On top of that:
#
# | | forward | backward | kept for the backward |
# |---|---|---|---|
# | PEFT (activation space) | `h = x A_sᵀ`, `u = (λ_d ⊙ h) B_sᵀ`: `N·r·(in + out)` | `∂u → ∂h → ∂x`: `N·r·(out
# + in)`; λ gradients elementwise | `h (N × r)` and `u (N × out)` |
# | veralab, activation space | `h`, then `h Sᵀ` with `S = B_s ⊙ (λ_bᵀ λ_d)`: `N·r·(in + out)` | `G S`, `(G S)
# A_s` and `P = Gᵀ h`: `N·r·(in + 2·out)` | `h` |
# | veralab, weight space | `h`, and `W + S A_s` once: `N·r·in + out·in·(r + 1)` | `W + S A_s` again, `P = Gᵀ
# h`: `out·in·(r + 1) + N·r·out` | `h` |
#
# (`G` is the output gradient.) veralab gets both λ gradients exactly from the small `P = Gᵀ h (out × r)`
# instead of from `u`, so it never keeps an `N × out` activation; the price is the matmul `Gᵀ h`. Weight space
# goes further: it folds the adapter into one matmul with `W + ΔW`, whose backward yields the input gradient
# for free. Its cost has a part that grows with `N`, half of PEFT's, and a part that does not: building `ΔW`
# twice (it is rebuilt in the backward rather than kept alive). `path_costs` returns the extra MACs of
# veralab's two paths; `choose_path` takes weight space where it is exact (float32/float64 dense weight, no
# dropout) and cheaper.
#
# Our layer is 768 → 768 (the width of BERT-base and GPT-2 small) at VeRA's usual rank 256.

# %%
in_features = out_features = 768
r = 256


def peft_macs(tokens):
    """PEFT's extra multiply-adds per training step: two thin matmuls forward, two
    backward."""
    return 2 * tokens * r * (in_features + out_features)


def veralab_path(tokens):
    costs = path_costs(tokens, in_features, out_features, r, needs_grad=True)
    return choose_path(
        costs,
        weight_dtype=torch.float32,
        input_dtype=torch.float32,
        dropout_active=False,
        weight_space_supported=True,
    )


token_axis = np.unique(np.logspace(0, 4.2, 400).astype(int))  # 1 to 15,848 tokens
costs = [
    path_costs(int(n), in_features, out_features, r, needs_grad=True)
    for n in token_axis
]
activation_per_token = np.array([c[ACTIVATION_SPACE] for c in costs]) / token_axis
weight_per_token = np.array([c[WEIGHT_SPACE] for c in costs]) / token_axis
chosen_per_token = (
    np.array([c[veralab_path(int(n))] for c, n in zip(costs, token_axis, strict=True)])
    / token_axis
)

# %% [markdown]
# Where do the paths cross? Weight space is cheaper than veralab's activation space once
# `N·r·(in + out) + 2·out·in·(r + 1) < N·r·(2·in + 3·out)`, i.e. `N > 2·out·in·(r + 1) / (r·(in + 2·out))`,
# and cheaper than PEFT's activation space once `N > 2·out·in·(r + 1) / (r·(in + out))`. For a square layer
# these are about `2·in/3` and `in` tokens.

# %%
tie_with_activation = (
    2 * out_features * in_features * (r + 1) / (r * (in_features + 2 * out_features))
)
tie_with_peft = (
    2 * out_features * in_features * (r + 1) / (r * (in_features + out_features))
)
# the first N at which weight space is strictly cheaper
crossover = int(tie_with_activation) + 1
below_peft = int(tie_with_peft) + 1
print(
    f"weight space is cheaper than activation space from N = {crossover} (the two tie "
    "at "
    f"{tie_with_activation})"
)
print(
    f"weight space is cheaper than PEFT's computation from N = {below_peft} (tie at "
    f"{tie_with_peft})"
)

# %%
# choose_path switches exactly there, and the layer veralab builds switches with it.
assert [veralab_path(n) for n in (crossover - 1, crossover)] == [
    ACTIVATION_SPACE,
    WEIGHT_SPACE,
]
assert next(n for n in range(1, 10_000) if veralab_path(n) == WEIGHT_SPACE) == crossover

torch.manual_seed(0)
layer_model = get_model(
    nn.Sequential(OrderedDict(proj=nn.Linear(in_features, out_features))),
    # random non-zero λ, as if trained
    VeraConfig(r=r, target_modules=["proj"], init_weights=False),
)
_, layer = next(layer_model.vera_layers())
for n, path in [(crossover - 1, ACTIVATION_SPACE), (crossover, WEIGHT_SPACE)]:
    assert layer.plan(torch.empty(n, in_features, requires_grad=True)).path == path

# Weight space costs a fixed part (the two ΔW builds) plus a part in N that is exactly
# half of PEFT's;
# activation space costs (2·in + 3·out) / (2·(in + out)) of PEFT's: 5/4 for a square
# layer.
fixed = path_costs(0, in_features, out_features, r, needs_grad=True)[WEIGHT_SPACE]
assert fixed == 2 * out_features * in_features * (r + 1)
for n in (1, crossover, 4096):
    costs_n = path_costs(n, in_features, out_features, r, needs_grad=True)
    assert 2 * (costs_n[WEIGHT_SPACE] - fixed) == peft_macs(n)
    assert 4 * costs_n[ACTIVATION_SPACE] == 5 * peft_macs(n)

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
ax.axhline(
    2 * in_features * out_features,
    color="gray",
    linestyle=":",
    label="(for scale: the frozen base's own cost)",
)
ax.axhline(peft_macs(1), color="tab:red", label="PEFT (activation space)")
ax.plot(
    token_axis,
    activation_per_token,
    color="tab:blue",
    linestyle="--",
    label="veralab, activation space",
)
ax.plot(
    token_axis,
    weight_per_token,
    color="tab:orange",
    linestyle="--",
    label="veralab, weight space",
)
ax.plot(
    token_axis,
    chosen_per_token,
    color="tab:green",
    linewidth=5,
    alpha=0.35,
    label="veralab: what choose_path runs",
)
ax.axvline(crossover, color="tab:green", linewidth=1)
ax.annotate(
    f"choose_path switches\nat N = {crossover}",
    (crossover, 4e6),
    xytext=(-4, 0),
    textcoords="offset points",
    ha="right",
)
ax.axvline(below_peft, color="tab:red", linewidth=1, linestyle=":")
ax.annotate(
    f"below PEFT\nfrom N = {below_peft}",
    (below_peft, 2e6),
    xytext=(4, 0),
    textcoords="offset points",
)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_ylim(2e5, 1e7)
ax.set_xlabel("tokens N in the step")
ax.set_ylabel("extra multiply-adds per token")
ax.set_title(
    f"One training step of a {in_features} → {out_features} layer, VeRA r = {r}"
)
ax.grid(True, which="both", alpha=0.3)
ax.legend(loc="lower left", fontsize=9)
plt.show()

# %% [markdown]
# Below the crossover, veralab runs activation space and does *more* arithmetic than PEFT — a quarter more
# here, the `Gᵀ h` that replaces keeping `u` — in exchange for keeping `N × out` fewer numbers (section 3).
# Above it the ΔW builds are spread over enough tokens, and from about `in` tokens on veralab does less than
# PEFT, heading for half. Training batches are thousands of tokens (8 × 512 in the benchmarks), so weight
# space
# is what runs in practice.
#
# ### The model is what PyTorch counts
#
# `FlopCounterMode` sees every matmul PyTorch runs, forward and backward, and counts `2·m·n·k` FLOPs for an
# `(m × k) @ (k × n)` product (`addmm`'s added matrix is not counted: it is no multiply). Two differences from
# `path_costs` follow, both exact:
#
# - `path_costs` counts the `+ W` of `W + S A_s` as `out·in` multiply-adds per build (`out·in·(r + 1)`); the
#   counter does not, so weight space counts `2 · out·in` MACs less;
# - `path_costs` leaves out four tiny products with the λ vectors: `S = B_s ⊙ (λ_bᵀ λ_d)` is an
#   `(out × 1) @ (1 × r)` matmul, built in the forward and again in the backward, and the λ gradients
#   `λ_b Q` and `λ_d Qᵀ` (with `Q = B_s ⊙ P`) are two more: `4 · out · r` MACs, independent of `N`.
#
# PEFT's formula is counted the same way, written here exactly as `peft/tuners/vera/layer.py` computes it.

# %%
W, bias = layer.base_layer.weight, layer.base_layer.bias
# The pair is sized for this one layer, so A_s = vera_A and B_s = vera_B.
vera_A, vera_B = layer_model.vera_A, layer_model.vera_B
lambda_d, lambda_b = layer.vera_lambda_d["default"], layer.vera_lambda_b["default"]


def peft_vera(x):
    """PEFT's VeRA forward for one adapter: base + λ_b ⊙ F.linear(λ_d ⊙ F.linear(x,
    A_s), B_s)."""
    return F.linear(x, W, bias) + lambda_b * F.linear(
        lambda_d * F.linear(x, vera_A), vera_B
    )


def frozen_base(x):
    return F.linear(x, W, bias)


def training_step_flops(forward, n):
    """FLOPs of one forward and backward (to x, and to the λ vectors where they are
    used) over n tokens."""
    # a fresh input: veralab caches h per input tensor
    x = torch.randn(n, in_features, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        forward(x).backward(torch.randn(n, out_features))
    lambda_d.grad = lambda_b.grad = None
    return counter.get_total_flops()


print(
    f"{'N':>6}  "
    f"{'path':<17}{'veralab extra FLOPs':>21}{'2·(path_costs ± exact terms)':>30}"
    f"{'PEFT extra FLOPs':>18}"
)
for n in (64, crossover - 1, crossover, 2048):
    path = layer.plan(torch.empty(n, in_features, requires_grad=True)).path
    base_flops = training_step_flops(frozen_base, n)
    # forward and input gradient
    assert base_flops == 2 * 2 * n * in_features * out_features
    veralab_extra = training_step_flops(layer, n) - base_flops
    peft_extra = training_step_flops(peft_vera, n) - base_flops
    predicted = 2 * path_costs(n, in_features, out_features, r, needs_grad=True)[path]
    predicted += 2 * (4 * out_features * r)  # the λ products path_costs leaves out
    if path == WEIGHT_SPACE:  # the two "+ W" path_costs counts and the counter does not
        predicted -= 2 * (2 * out_features * in_features)
    print(f"{n:>6}  {path:<17}{veralab_extra:>21,d}{predicted:>30,d}{peft_extra:>18,d}")
    assert veralab_extra == predicted
    assert peft_extra == 2 * peft_macs(n)

# %% [markdown]
# ## 2. The clock
#
# Multiply-adds are not seconds, but on a CPU a large matmul runs at a steady rate, so the two should track.
# We time one training step (forward, then backward to the input and the λ vectors) of the layer at token
# counts from 32 to 2048, five ways:
#
# - the frozen base layer alone;
# - PEFT's formula (`peft_vera` above);
# - veralab's activation space and weight space, each forced, through the autograd Functions that
#   `VeraLinear` calls (`activation_space_vera`, `weight_space_vera`, with `h` computed once without grad);
# - the `VeraLinear` layer itself, which picks one of the two per call.
#
# The variants are interleaved (A B C D E A B C D E ...) so that a busy spell of the machine hits all of them
# alike, and each keeps the median of 8 timed rounds after a warm-up round. Timings depend on the machine and
# on whatever else runs on it, so nothing here is asserted: the counts of section 1 are the facts.


# %%
def veralab_activation_space(x):
    with torch.no_grad():
        h = F.linear(x, vera_A)  # (N, r): the only activation kept for the backward
    lambdas = lambda_d[None], lambda_b[None]  # (K = 1, r), (K = 1, out)
    S = scaled_projection(vera_B, *lambdas)  # (out, r)
    return activation_space_vera(
        F.linear(x, W, bias), x, h, S, vera_A, vera_B, *lambdas
    )


def veralab_weight_space(x):
    with torch.no_grad():
        h = F.linear(x, vera_A)
    lambdas = lambda_d[None], lambda_b[None]
    S = scaled_projection(vera_B, *lambdas)
    return weight_space_vera(x, h, S, W, bias, vera_A, vera_B, *lambdas)


variants = {
    "frozen base": frozen_base,
    "PEFT (activation space)": peft_vera,
    "veralab, activation space": veralab_activation_space,
    "veralab, weight space": veralab_weight_space,
    "veralab.fast VeraLinear": layer,
}
token_counts = [32, 64, 128, 256, 512, 1024, 2048]
generator = torch.Generator().manual_seed(1)
batches = {
    n: (
        torch.randn(n, in_features, generator=generator),
        torch.randn(n, out_features, generator=generator),
    )
    for n in token_counts
}


def step_seconds(forward, n):
    x_values, grad_output = batches[n]
    # a new input tensor each step, as in training
    x = x_values.clone().requires_grad_(True)
    start = time.perf_counter()
    forward(x).backward(grad_output)
    seconds = time.perf_counter() - start
    lambda_d.grad = lambda_b.grad = None
    return seconds


times = {(name, n): [] for name in variants for n in token_counts}
for round_index in range(1 + 8):
    for n in token_counts:
        for name, forward in variants.items():
            seconds = step_seconds(forward, n)
            if round_index > 0:  # round 0 warms up
                times[name, n].append(seconds)
median_ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}


def predicted_macs(name, n):
    """The cost model's multiply-adds for one training step of variant `name` over n
    tokens."""
    base = 2 * n * in_features * out_features
    layer_costs = path_costs(n, in_features, out_features, r, needs_grad=True)
    extra = {
        "frozen base": 0,
        "PEFT (activation space)": peft_macs(n),
        "veralab, activation space": layer_costs[ACTIVATION_SPACE],
        "veralab, weight space": layer_costs[WEIGHT_SPACE],
        "veralab.fast VeraLinear": layer_costs[veralab_path(n)],
    }[name]
    return base + extra


print(
    f"{'N':>6}"
    + "".join(f"{name:>27}" for name in variants)
    + "   (median ms per step)"
)
for n in token_counts:
    print(f"{n:>6}" + "".join(f"{median_ms[name, n]:>27.2f}" for name in variants))

# %% [markdown]
# To turn multiply-adds into seconds we need one number, the machine's rate. We take it from the frozen base
# at
# the largest `N` (one big matmul forward, one backward: as close to the machine's peak as this gets) and draw
# every prediction with it. Left: time per token against `N`, the axes of section 1's plot, measured as
# markers and predicted as lines. Right: every variant at every `N`, measured time against predicted
# multiply-adds; a step on the black line runs at the base's rate.

# %%
macs_per_second = predicted_macs("frozen base", token_counts[-1]) / (
    median_ms["frozen base", token_counts[-1]] / 1e3
)
print(
    f"frozen base at N = {token_counts[-1]}: {macs_per_second / 1e9:.0f} GMAC/s on one "
    "thread"
)

min_gmac = predicted_macs("frozen base", token_counts[0]) / 1e9
max_gmac = predicted_macs("PEFT (activation space)", token_counts[-1]) / 1e9
styles = {
    "frozen base": dict(color="gray", marker="o"),
    "PEFT (activation space)": dict(color="tab:red", marker="s"),
    "veralab, activation space": dict(color="tab:blue", marker="v"),
    "veralab, weight space": dict(color="tab:orange", marker="^"),
    "veralab.fast VeraLinear": dict(color="tab:green", marker="D"),
}
fig, (ax_time, ax_model) = plt.subplots(1, 2, figsize=(12, 4.8))
for name, style in styles.items():
    measured_ms = np.array([median_ms[name, n] for n in token_counts])
    predicted_ms = np.array(
        [1e3 * predicted_macs(name, n) / macs_per_second for n in token_counts]
    )
    per_token = 1e3 / np.array(token_counts)  # ms per step -> µs per token
    if name == "veralab.fast VeraLinear":
        ax_time.plot(
            token_counts,
            measured_ms * per_token,
            color=style["color"],
            linewidth=6,
            alpha=0.3,
            label=name,
        )
    else:
        ax_time.plot(
            token_counts, measured_ms * per_token, linestyle="none", label=name, **style
        )
        ax_time.plot(
            token_counts, predicted_ms * per_token, color=style["color"], linewidth=1
        )
    predicted_gmac = [predicted_macs(name, n) / 1e9 for n in token_counts]
    ax_model.plot(predicted_gmac, measured_ms, linestyle="none", label=name, **style)
ax_time.axvline(crossover, color="tab:green", linewidth=1)
ax_time.set_xscale("log", base=2)
ax_time.set_yscale("log")
ax_time.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 10, 20, 50, 100, ...
ax_time.yaxis.set_major_formatter(ScalarFormatter())
ax_time.yaxis.set_minor_formatter(NullFormatter())
ax_time.set_xlabel("tokens N in the step")
ax_time.set_ylabel("µs per token (median of 8 steps)")
ax_time.set_title("Measured (markers), the cost model at the base's rate (lines)")
ax_time.grid(True, which="both", alpha=0.3)
ax_time.legend(fontsize=8)
macs_axis = np.logspace(np.log10(0.5 * min_gmac), np.log10(2 * max_gmac), 50)
ax_model.plot(
    macs_axis,
    1e3 * macs_axis * 1e9 / macs_per_second,
    color="black",
    linewidth=1,
    label="the base's rate",
)
ax_model.set_xscale("log")
ax_model.set_yscale("log")
ax_model.set_xlabel("predicted multiply-adds per step (GMAC)")
ax_model.set_ylabel("measured ms per step (median of 8)")
ax_model.set_title("Time against the cost model, every variant and N")
ax_model.grid(True, which="both", alpha=0.3)
ax_model.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
print(
    f"{'N':>6}{'PEFT extra ms':>15}{'veralab extra ms':>18}{'measured ratio':>16}"
    f"{'predicted ratio':>17}"
)
for n in token_counts:
    peft_extra = median_ms["PEFT (activation space)", n] - median_ms["frozen base", n]
    ours_extra = median_ms["veralab.fast VeraLinear", n] - median_ms["frozen base", n]
    predicted_ratio = (
        predicted_macs("veralab.fast VeraLinear", n) - predicted_macs("frozen base", n)
    ) / peft_macs(n)
    measured_ratio = ours_extra / peft_extra
    print(
        f"{n:>6}{peft_extra:>15.2f}{ours_extra:>18.2f}{measured_ratio:>16.2f}"
        f"{predicted_ratio:>17.2f}"
    )

# %% [markdown]
# What to look for (on a quiet machine; a loaded one scatters the points):
#
# - As `N` grows the points close in on the cost model's lines (within about ten percent at 1024 and 2048
# tokens in our runs, PEFT's excepted, see below): the matmuls become the time. At small `N` every variant
# sits
#   above its line, because a step also pays a fixed cost per call (Python, dispatch, allocations) that no
#   multiply-add count contains; the custom autograd Functions pay a little more of it than plain PyTorch ops.
# - The two forced veralab paths cross near the `N` where `choose_path` switches (the vertical line), and the
#   `VeraLinear` band follows the lower of the two.
# - PEFT's points sit above its line even at large `N`: besides the matmuls it makes elementwise passes over
#   `N × out` tensors (`λ_b ⊙ u`, the sum, their backward) that a matmul count leaves out. So the measured
#   ratio of veralab's overhead to PEFT's can come out below the predicted one.
#
# ## 3. The memory: what autograd keeps for the backward
#
# During a training forward autograd keeps the tensors each backward will need. Those *saved activations*
# grow with the batch, and they are what limits the batch size when training with a frozen base. We measure
# them with `torch.autograd.graph.saved_tensors_hooks`, whose `pack` hook sees every tensor as it is saved:
# `veralab.fast.diagnostics.saved_activation_bytes` counts each storage once (a tensor and its views share
# one) and leaves
# out the parameters and buffers, which exist whether or not anything is saved.
#
# The model: a small Llama (2 blocks, width 128, MLP 344), VeRA at rank 64 on all seven linear layers of each
# block, once with PEFT and once with veralab, and the frozen base for comparison; the same batch of
# 4 × 64 = 256 tokens, back-propagated to the input embeddings so that the frozen base does the same backward.


# %%
def saved_bytes(model, input_ids):
    """Saved activations of one training forward, back-propagated to the input
    embeddings."""
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    return saved_activation_bytes(
        model, lambda: model(inputs_embeds=embeds, labels=input_ids).loss
    )


torch.manual_seed(0)
llama_config = LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
llama_r = 64
frozen = LlamaForCausalLM(llama_config).requires_grad_(False)
peft_model = peft.get_peft_model(
    copy.deepcopy(frozen),
    peft.VeraConfig(r=llama_r, target_modules=targets, vera_dropout=0.0),
)
veralab_model = get_model(
    copy.deepcopy(frozen), VeraConfig(r=llama_r, target_modules=targets)
)
vera_layers = [vera_layer for _, vera_layer in veralab_model.vera_layers()]

input_ids = torch.randint(
    0, llama_config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2)
)
n_tokens = input_ids.numel()
measured = {
    "frozen base": saved_bytes(frozen, input_ids),
    "PEFT VeRA": saved_bytes(peft_model, input_ids),
    "veralab.fast": saved_bytes(veralab_model, input_ids),
}
for name, nbytes in measured.items():
    print(
        f"{name:<14}{nbytes / 2**20:7.3f} MiB saved   extra "
        f"{(nbytes - measured['frozen base']) / 2**20:6.3f} MiB"
    )

# %% [markdown]
# The prediction, in float32 numbers (4 bytes each):
#
# - **PEFT** keeps, per adapted layer, `h = x A_sᵀ` (`N × r`, for `λ_d`'s gradient) and `u` (`N × out`, for
#   `λ_b`'s gradient). `A_s`, `B_s` are views of its buffers and the λ vectors are parameters: free.
# - **veralab** keeps only `h`, and computes it once for all the layers that read the same input tensor
#   through the same slice of `A` (`SharedProjections.hidden`): per block, one `h` for q, k and v, one for o,
#   one for gate and up, one for down — four `N × r` tensors instead of seven. The rest does not grow with
#   `N`: each layer's autograd Function keeps its λ vectors stacked into `(1 × r)` and `(1 × out)` copies, and
#   the model keeps one contiguous copy of `A_s = vera_A[:, :in]` per input width narrower than `vera_A`
#   (a column slice of a matrix is not contiguous; the row slices `B_s = vera_B[:out]` are views).
#
# Which layers share an input is not taken on trust: `veralab.fast.diagnostics.layers_sharing_inputs` records,
# with forward
# pre-hooks, the input tensor each adapted layer receives in one forward.


# %%
groups = layers_sharing_inputs(
    veralab_model, lambda: veralab_model(input_ids=input_ids)
)
print([[name.rsplit(".", 1)[-1] for name, _ in group] for group in groups[:4]], "...")
max_in = veralab_model.vera_A.shape[1]
narrow_widths = {
    vera_layer.in_features
    for vera_layer in vera_layers
    if vera_layer.in_features < max_in
}

predicted_extra = {
    "PEFT VeRA": 4
    * sum(n_tokens * (llama_r + vera_layer.out_features) for vera_layer in vera_layers),
    "veralab.fast": 4 * n_tokens * llama_r * len(groups)  # one h per group
    # the stacked λ copies
    + 4 * sum(llama_r + vera_layer.out_features for vera_layer in vera_layers)
    # contiguous column slices of vera_A
    + 4 * sum(llama_r * width for width in narrow_widths),
}
for name, predicted in predicted_extra.items():
    print(
        f"{name:<14}extra measured {measured[name] - measured['frozen base']:>9,d} B   "
        "predicted "
        f"{predicted:>9,d} B"
    )

# %%
# (q, k, v), (o), (gate, up), (down) per block
assert len(groups) == 4 * llama_config.num_hidden_layers
for name, predicted in predicted_extra.items():
    assert measured[name] - measured["frozen base"] == predicted  # to the byte

# %% [markdown]
# Both paths keep the same: at 16 tokens veralab's layers run in activation space, at 256 in weight space, and
# the extra bytes follow the same formula. (PEFT's would too; its formula has no second path.)

# %%
few_ids = input_ids[:1, :16]
assert {
    vera_layer.plan(torch.empty(16, vera_layer.in_features, requires_grad=True)).path
    for vera_layer in vera_layers
} == {ACTIVATION_SPACE}
assert {
    vera_layer.plan(
        torch.empty(n_tokens, vera_layer.in_features, requires_grad=True)
    ).path
    for vera_layer in vera_layers
} == {WEIGHT_SPACE}
few_extra = saved_bytes(veralab_model, few_ids) - saved_bytes(frozen, few_ids)
assert few_extra == predicted_extra["veralab.fast"] - 4 * (
    n_tokens - 16
) * llama_r * len(groups)

# %%
mib = 2**20
names = list(measured)
base_part = [measured["frozen base"] / mib] * 3
extra_part = [(measured[name] - measured["frozen base"]) / mib for name in names]
fig, (ax_total, ax_extra) = plt.subplots(1, 2, figsize=(11, 3.8))
ax_total.bar(names, base_part, color="lightgray", label="what the frozen model keeps")
ax_total.bar(
    names[1:2],
    extra_part[1:2],
    bottom=base_part[1:2],
    color="tab:red",
    label="PEFT's extra",
)
ax_total.bar(
    names[2:],
    extra_part[2:],
    bottom=base_part[2:],
    color="tab:green",
    label="veralab's extra",
)
for position, name in enumerate(names):
    ax_total.text(
        position,
        measured[name] / mib,
        f"{measured[name] / measured['frozen base']:.2f}×",
        ha="center",
        va="bottom",
    )
ax_total.set_ylabel("saved activations (MiB)")
ax_total.set_title("One training forward, 256 tokens")
ax_total.set_ylim(top=1.15 * max(measured.values()) / mib)
ax_total.legend(loc="upper right", fontsize=8)

h_peft = 4 * n_tokens * llama_r * len(vera_layers) / mib
u_peft = 4 * n_tokens * sum(vera_layer.out_features for vera_layer in vera_layers) / mib
h_ours = 4 * n_tokens * llama_r * len(groups) / mib
small_ours = predicted_extra["veralab.fast"] / mib - h_ours
adapted = ["PEFT VeRA", "veralab.fast"]
ax_extra.bar(adapted, [h_peft, h_ours], color="tab:purple", label="h = x A_sᵀ (N × r)")
ax_extra.bar(
    adapted, [u_peft, 0], bottom=[h_peft, h_ours], color="tab:red", label="u (N × out)"
)
ax_extra.bar(
    adapted,
    [0, small_ours],
    bottom=[h_peft + u_peft, h_ours],
    color="tab:olive",
    label="λ copies, A slice",
)
ax_extra.plot(
    adapted,
    [(measured[name] - measured["frozen base"]) / mib for name in adapted],
    "k_",
    markersize=40,
    label="measured",
)
ax_extra.set_ylim(top=1.1 * h_peft + 1.1 * u_peft)
ax_extra.set_ylabel("extra saved activations (MiB)")
ax_extra.set_title(
    f"Predicted parts ({len(vera_layers)} layers, {len(groups)} groups) and measured"
)
ax_extra.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# PEFT's extra is almost as large as everything the frozen model keeps (width 128, rank 64: `u` alone is the
# size of a layer's output, seven times per block); veralab's is a small fraction of it. The ratio to expect
# at
# any size follows from the formula: `4·r` numbers per token and block against `Σ (r + out)` over the seven
# layers.
#
# ## 4. Correctness is not traded
#
# The same layer of section 1, against `veralab.reference.vera_forward`, with random non-zero λ vectors (with
# `λ_b = 0`, as at init, a wrong `λ_d` gradient would go unnoticed: notebook 04). Each path reorders float32
# operations, so "the same" means: veralab's rounding error, measured against the reference computed in
# float64, is at most twice the error the reference itself makes in float32 (the rule of flash-attention's
# tests; STYLE.md). We measure errors normwise (the L2 norm of the difference): the largest of a few hundred
# rounding errors is itself a noisy number.

# %%
EPS32 = torch.finfo(torch.float32).eps


def rounding_error(result, truth):
    return (result.double() - truth).norm().item()


def assert_as_accurate(result, same_precision_reference, truth):
    """result's error against the float64 truth is at most twice the reference's.

    The reference is computed in the same precision as result. The floor, one float32
    unit of the truth's norm, covers a reference that happens to be exact.
    """
    error = rounding_error(result, truth)
    allowed = (
        2 * rounding_error(same_precision_reference, truth)
        + EPS32 * truth.norm().item()
    )
    assert error <= allowed, (error, allowed)


def checked_error_ratios(quantities, results, same_precision_references, truths):
    """assert_as_accurate for each quantity; returns 'name error/reference-error' for
    each, to print."""
    ratios = []
    for quantity, result, reference, truth in zip(
        quantities, results, same_precision_references, truths, strict=True
    ):
        assert_as_accurate(result, reference, truth)
        ratios.append(
            f"{quantity} "
            f"{rounding_error(result, truth) / rounding_error(reference, truth):.2f}"
        )
    return "   ".join(ratios)


def reference_step(x, grad_output, dtype):
    """vera_forward and its gradients (x, λ_d, λ_b) with every tensor in `dtype`."""
    # a copy: never mark the caller's x as requiring grad
    x = x.to(dtype, copy=True).requires_grad_(True)
    ref_lambda_d = lambda_d.detach().to(dtype).requires_grad_(True)
    ref_lambda_b = lambda_b.detach().to(dtype).requires_grad_(True)
    y = ref.vera_forward(
        x,
        W.to(dtype),
        bias.to(dtype),
        vera_A.to(dtype),
        vera_B.to(dtype),
        ref_lambda_d,
        ref_lambda_b,
    )
    y.backward(grad_output.to(dtype))
    return y.detach(), x.grad, ref_lambda_d.grad, ref_lambda_b.grad


def veralab_step(forward, x, grad_output):
    x = x.clone().requires_grad_(True)
    y = forward(x)
    y.backward(grad_output)
    result = y.detach(), x.grad, lambda_d.grad.clone(), lambda_b.grad.clone()
    lambda_d.grad = lambda_b.grad = None
    return result


cases = [
    ("VeraLinear", layer, crossover - 1, ACTIVATION_SPACE),
    ("VeraLinear", layer, crossover, WEIGHT_SPACE),
    ("activation space, forced", veralab_activation_space, 2048, None),
    ("weight space, forced", veralab_weight_space, 64, None),
]
for label, forward, n, expected_path in cases:
    if expected_path is not None:
        assert (
            layer.plan(torch.empty(n, in_features, requires_grad=True)).path
            == expected_path
        )
        label = f"VeraLinear ({expected_path})"
    x = torch.randn(n, in_features, generator=generator)
    grad_output = torch.randn(n, out_features, generator=generator)
    truth = reference_step(x, grad_output, torch.float64)
    reference_fp32 = reference_step(x, grad_output, torch.float32)
    ours = veralab_step(forward, x, grad_output)
    errors = checked_error_ratios(
        ["y", "∂x", "∂λ_d", "∂λ_b"], ours, reference_fp32, truth
    )
    print(f"{label:<31}N = {n:<5} error / reference's float32 error:  " + errors)

# %% [markdown]
# And the whole Llama of section 3 against PEFT: the same λ vectors in both models (non-zero, copied by
# parameter name: veralab's are PEFT's without the leading `base_model.`), the same shared pair (drawn from
# the same key), and PEFT in
# float64 as the truth. At 256 tokens veralab's layers run in weight space, at 16 in activation space. We
# compare the logits, the input gradient, and the gradients of all λ_d and all λ_b.

# %%
peft_parameters = dict(peft_model.named_parameters())
veralab_parameters = dict(veralab_model.named_parameters())
with torch.no_grad():
    for name, parameter in peft_parameters.items():
        if "vera_lambda" in name:
            parameter.normal_(std=1.0 if "lambda_d" in name else 0.1)
            veralab_parameters[name.removeprefix("base_model.")].copy_(parameter)
peft_float64 = copy.deepcopy(peft_model).double()
assert torch.equal(veralab_model.vera_A, peft_model.base_model.vera_A["default"])


def llama_step(model, ids, grad_logits):
    """logits, the input-embedding gradient, and all λ_d / λ_b gradients, concatenated.

    One training step's results, to compare across implementations.
    """
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits.backward(grad_logits.to(logits.dtype))
    lambda_grads = {
        kind: torch.cat(
            [p.grad.flatten() for n, p in model.named_parameters() if kind in n]
        )
        for kind in ("vera_lambda_d", "vera_lambda_b")
    }
    model.zero_grad(set_to_none=True)
    return (
        logits.detach(),
        embeds.grad,
        lambda_grads["vera_lambda_d"],
        lambda_grads["vera_lambda_b"],
    )


for ids in (input_ids, few_ids):
    grad_logits = torch.randn(*ids.shape, llama_config.vocab_size, generator=generator)
    truth = llama_step(peft_float64, ids, grad_logits)
    peft_fp32 = llama_step(peft_model, ids, grad_logits)
    ours = llama_step(veralab_model, ids, grad_logits)
    assert ours[2].abs().min() > 0  # no λ gradient is trivially zero
    errors = checked_error_ratios(
        ["logits", "∂embeds", "∂λ_d", "∂λ_b"], ours, peft_fp32, truth
    )
    print(f"{ids.numel():>4} tokens, error / PEFT's float32 error:  " + errors)

# %% [markdown]
# veralab's float32 results are as close to the float64 truth as PEFT's own float32 results, on both paths:
# the savings come from *what* is computed and kept, not from computing something else.
#
# ## 5. The full-size numbers
#
# `benchmarks/` measures the same three things on a larger Llama (hidden 512, MLP 1376, 4 blocks, a batch of
# 8 × 512 tokens, VeRA r = 256 on all seven linear layers, AdamW), next to PEFT VeRA and PEFT LoRA r = 8:
#
# ```bash
# python -m benchmarks.bench_training    # step time, variants interleaved, medians
# python -m benchmarks.bench_memory      # saved activations (as in section 3) and peak RSS
# python -m benchmarks.bench_inference   # merged / unmerged forward, mixed-adapter batches
# ```
#
# Their latest tables, and the machine they ran on, are in `docs/performance.md` (the site's Performance
# page). `bench_training` prints the cost model's limit for veralab's adapter overhead against PEFT's; it is
# the arithmetic of section 1 summed over that model's layers, `h` counted once per group:

# %%
full_tokens, full_r = 8 * 512, 256
# (in, out) of the layers of one block, grouped by the input they share
full_block = [[(512, 512)] * 3, [(512, 512)], [(512, 1376)] * 2, [(1376, 512)]]
ours_macs = peft_style_macs = 0
for group in full_block:
    for position, (layer_in, layer_out) in enumerate(group):
        costs_here = path_costs(
            full_tokens, layer_in, layer_out, full_r, needs_grad=True
        )
        path = choose_path(
            costs_here,
            weight_dtype=torch.float32,
            input_dtype=torch.float32,
            dropout_active=False,
            weight_space_supported=True,
        )
        assert path == WEIGHT_SPACE  # 4096 tokens: far above every layer's crossover
        # h once per group
        ours_macs += costs_here[path] - (position > 0) * full_tokens * full_r * layer_in
        peft_style_macs += 2 * full_tokens * full_r * (layer_in + layer_out)
print(
    f"veralab / PEFT adapter multiply-adds per step: {ours_macs / peft_style_macs:.3f}"
)

# %% [markdown]
# About half: at 4096 tokens every layer of that model runs in weight space, where the per-token work is half
# of PEFT's; sharing `h` saves a little and the `ΔW` builds cost a little. `docs/performance.md` sets the
# measured overhead ratios against this limit; as in section 2, a measured ratio can fall below it, since
# PEFT's elementwise passes cost time that no multiply-add count sees.

# %% [markdown]
# ## Try it: the rank and the number of tokens against the cost model
#
# Pick a rank and a number of tokens `N` for the 768 → 768 layer of section 1: the bars are
# the extra multiply-adds of one training step on each path, as `path_costs` predicts them,
# and the highlighted one is the path `choose_path` takes. (The figure is drawn once at
# r = 256 and N = 512; in Jupyter the controls redraw it.)

# %%
import ipywidgets as widgets
from IPython.display import display


def draw_costs(rank=256, tokens=512):
    """The extra MACs of PEFT's computation and of veralab's two paths, as bars.

    Returns:
        The path veralab takes.
    """
    costs = path_costs(tokens, in_features, out_features, rank, needs_grad=True)
    taken = choose_path(
        costs,
        weight_dtype=torch.float32,
        input_dtype=torch.float32,
        dropout_active=False,
        weight_space_supported=True,
    )
    labels = ["PEFT", ACTIVATION_SPACE, WEIGHT_SPACE]
    values = [2 * tokens * rank * (in_features + out_features)] + [
        costs[path] for path in labels[1:]
    ]
    colors = ["tab:gray"] + [
        "tab:green" if path == taken else "tab:blue" for path in labels[1:]
    ]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.barh(labels, values, color=colors)
    ax.set_xlabel("extra multiply-adds per training step")
    ax.set_title(f"r = {rank}, N = {tokens}: veralab takes {taken} (green)")
    fig.tight_layout()
    plt.show()
    return taken


draw_costs()

# %% tags=["widget"]
tokens_slider = widgets.SelectionSlider(
    options=[2**k for k in range(13)], value=512, description="tokens N"
)
costs_control = widgets.interactive(
    draw_costs,
    rank=widgets.SelectionSlider(
        options=[16, 64, 256, 1024], value=256, description="rank r"
    ),
    tokens=tokens_slider,
)
display(costs_control)

# %% tags=["widget"]
# Moving the slider re-plans: few tokens take activation space, many take weight space.
tokens_slider.value = 4
assert costs_control.result == ACTIVATION_SPACE
tokens_slider.value = 4096
assert costs_control.result == WEIGHT_SPACE

# %% [markdown]
# ## Exercise: the extra FLOPs of an unmerged layer
#
# Write `my_adapter_flops(n_tokens, in_features, out_features, r)`: the FLOPs the adapter adds
# to one *forward* pass of an unmerged layer computed the way the formula reads (activation
# space), counting 2 FLOPs per multiply-add as `FlopCounterMode` does. The checker compares
# your formula with what PyTorch counts on the reference's `vera_forward`.


# %% jupyter={"source_hidden": true}
# Worked solution: replace the body with your own and run the checker below.
def my_adapter_flops(n_tokens, in_features, out_features, r):
    # x A_sᵀ: (N × in) by (in × r); then (λ_d ⊙ h) B_sᵀ: (N × r) by (r × out)
    return 2 * n_tokens * r * in_features + 2 * n_tokens * r * out_features


# %%
from veralab import exercises

feedback = exercises.check_adapter_flops(my_adapter_flops)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [10 · Beyond linear layers](10_beyond_linear_layers.ipynb): VeRA over embedding
# tables and convolutions.
