# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Lambda scaling: the forward pass, one equation at a time
#
# VeRA's layer computes
#
# $$ y = W_0 x + b + \Lambda_b B_s \Lambda_d A_s x, \qquad \Lambda_b = \mathrm{diag}(\lambda_b),\ \Lambda_d =
# \mathrm{diag}(\lambda_d) $$
#
# with the frozen slices `A_s (r × in)`, `B_s (out × r)` of the shared pair (notebooks 02 and 03) and the two
# trained vectors `λ_d (r)` and `λ_b (out)`.
#
# **What you will learn**
#
# 1. The forward pass step by step, with the reference code `veralab.reference.vera_forward`, and the same
#    thing as one merged weight.
# 2. Why `λ_b = 0` makes a fresh adapter the identity — and which vector learns first because of it.
# 3. What `d_initial` (the starting value of `λ_d`) does to the first gradient and to training.
# 4. That the production path `veralab.fast` computes the same outputs and gradients as the reference.
#
# In the code: §4 of `veralab.reference` (`vera_forward`), and its layer `VeraLinear` (§6).

# %%
from collections import OrderedDict

import matplotlib.pyplot as plt
import torch
from torch import nn

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import get_model

# %% [markdown]
# ## 1. The forward pass
#
# One frozen layer with 24 inputs and 40 outputs, a pair of rank 8 sized for it, and random λ vectors (a
# fresh adapter has `λ_b = 0`, which would hide most of the computation; section 2 comes back to that).

# %%
torch.manual_seed(0)
in_features, out_features, r = 24, 40, 8
base_layer = nn.Linear(in_features, out_features)
vera_A, vera_B = ref.init_projections(
    r, max_in=in_features, max_out=out_features, prng_key=0
)
lambda_d = torch.randn(r)
lambda_b = torch.randn(out_features)
x = torch.randn(5, in_features)  # a batch of 5 inputs

# %% [markdown]
# | step | equation | shape |
# |---|---|---|
# | slice the shared pair | $A_s = A_{[:, :\mathrm{in}]}$, $B_s = B_{[:\mathrm{out}, :]}$ | `(r, in)`, `(out, r)` |
# | project into the random subspace | $h = x A_s^\top$ | `(N, r)` |
# | scale each random direction (trained) | $h_d = \lambda_d \odot h$ | `(N, r)` |
# | lift back with the random `B` | $u = h_d B_s^\top$ | `(N, out)` |
# | scale each output feature (trained) | $\delta = \lambda_b \odot u$ | `(N, out)` |
# | add to the frozen layer | $y = x W_0^\top + b + \delta$ | `(N, out)` |

# %%
A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features, out_features)
h = x @ A_s.T
h_d = lambda_d * h
u = h_d @ B_s.T
delta = lambda_b * u
y = nn.functional.linear(x, base_layer.weight, base_layer.bias) + delta
for name, tensor in [("h", h), ("h_d", h_d), ("u", u), ("delta", delta), ("y", y)]:
    print(f"{name:<6}{tuple(tensor.shape)}")

# %%
y_reference = ref.vera_forward(
    x, base_layer.weight, base_layer.bias, vera_A, vera_B, lambda_d, lambda_b
)
# the same operations in the same order: the same bits
assert torch.equal(y, y_reference)

# %% [markdown]
# Without dropout the adapter is linear in `x`, so it folds into one weight:
# `ΔW = (λ_b B_s)(λ_d A_s)` (each row of `B_s` scaled by `λ_b`, each row of `A_s` by `λ_d`), and
# `y = x (W_0 + ΔW)ᵀ + b`. Rounding happens in a different order, so this agrees to float32 precision
# rather than bit for bit. (Notebook 05 builds merging on this.)

# %%
delta_W = ref.delta_weight(
    vera_A, vera_B, lambda_d, lambda_b, in_features, out_features
)
assert delta_W.shape == (out_features, in_features)
torch.testing.assert_close(
    nn.functional.linear(x, base_layer.weight + delta_W, base_layer.bias), y
)

# %% [markdown]
# ## 2. `λ_b = 0`: the adapter starts as the identity
#
# A fresh adapter sets `λ_b = 0` and every entry of `λ_d` to `d_initial` (0.1 by default). Then
# `δ = λ_b ⊙ u = 0` whatever `x` is, and the adapted layer returns exactly what the base layer returns.
# Training starts from the pretrained model, not from a perturbed one.

# %%
# the one pair every adapted layer reads
projections = ref.SharedProjections(vera_A, vera_B)
adapted = ref.VeraLinear(base_layer, projections, d_initial=0.1)
assert torch.equal(adapted.vera_lambda_b, torch.zeros(out_features))
assert torch.equal(adapted(x), base_layer(x))  # exactly, not approximately

# %% [markdown]
# The zero also decides which vector learns first. By the chain rule, with `g = ∂L/∂y`:
#
# - `∂L/∂λ_b = Σ_batch g ⊙ u`, where `u` is proportional to `λ_d = d_initial`: **non-zero**;
# - `∂L/∂λ_d = Σ_batch h ⊙ ((g ⊙ λ_b) B_s)`, which contains `λ_b = 0`: **exactly zero**.
#
# So the first step moves only `λ_b`; `λ_d` starts learning once `λ_b` is non-zero. (LoRA has the same
# structure: `B = 0` at init, so only `B` receives a gradient at first.)

# %%
target = torch.randn(5, out_features)
loss = ((adapted(x) - target) ** 2).mean()
loss.backward()
print("|grad λ_b| =", adapted.vera_lambda_b.grad.norm().item())
print("|grad λ_d| =", adapted.vera_lambda_d.grad.norm().item())

# %%
assert adapted.vera_lambda_b.grad.abs().sum() > 0
assert torch.equal(adapted.vera_lambda_d.grad, torch.zeros(r))

# %% [markdown]
# ## 3. The effect of `d_initial`
#
# Since `u ∝ λ_d`, the first gradient of `λ_b` is proportional to `d_initial`: ten times smaller
# `d_initial`, ten times smaller first gradient.


# %%
def first_gradient_of_lambda_b(d_initial):
    layer = ref.VeraLinear(base_layer, projections, d_initial=d_initial)
    ((layer(x) - target) ** 2).mean().backward()
    return layer.vera_lambda_b.grad


d_values = [1e-3, 1e-2, 1e-1, 1.0]
gradients = {d: first_gradient_of_lambda_b(d) for d in d_values}
for d, gradient in gradients.items():
    # proportional to d_initial
    torch.testing.assert_close(gradient, d * gradients[1.0])

# %% [markdown]
# What does that do to training? With an adaptive optimiser such as Adam, less than you might think: Adam
# divides each gradient by its running scale, so every coordinate moves by about `lr` per step whatever the
# gradient's size. What `d_initial` does set is *where `λ_d` starts*, and with Adam's steps of about `lr`,
# how long it takes to get anywhere else.
#
# To see it, a layer learns a target that VeRA can represent exactly: the output of a "teacher" adapter on
# the same pair, whose `λ_d` has random entries of both signs. Same data, same learning rate, only
# `d_initial` changes.

# %%
teacher_lambda_d, teacher_lambda_b = torch.randn(r), 0.1 * torch.randn(out_features)
inputs = torch.randn(256, in_features)
with torch.no_grad():
    targets = ref.vera_forward(
        inputs,
        base_layer.weight,
        base_layer.bias,
        vera_A,
        vera_B,
        teacher_lambda_d,
        teacher_lambda_b,
    )


def train(d_initial, steps=200, lr=1e-2):
    layer = ref.VeraLinear(base_layer, projections, d_initial=d_initial)
    optimizer = torch.optim.Adam([layer.vera_lambda_d, layer.vera_lambda_b], lr=lr)
    losses = []
    for _ in range(steps):
        loss = ((layer(inputs) - targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


curves = {d: train(d) for d in d_values}
fig, ax = plt.subplots(figsize=(7, 4))
for (d, losses), style in zip(curves.items(), [":", "--", "-", "-"], strict=True):
    ax.semilogy(losses, style, linewidth=2, label=f"d_initial = {d:g}")
ax.set_xlabel("Adam step (lr = 1e-2)")
ax.set_ylabel("mean squared error to the teacher")
ax.set_title("Small d_initial values train alike; d_initial = 1 is slow")
ax.legend()
ax.grid(True, which="both", alpha=0.3)
plt.show()
for d, losses in curves.items():
    print(
        f"d_initial = {d:<6g} loss after 20 steps {losses[19]:.2e}   after 200 steps "
        f"{losses[-1]:.2e}"
    )

# %% [markdown]
# `0.001`, `0.01` and `0.1` give almost the same curve: from a small start, `λ_d` reaches the scale and the
# signs it needs within a few steps of size `lr`. From `d_initial = 1` every entry of `λ_d` starts at 1 and
# must travel about 1 — a hundred steps of `lr` — to flip the signs the teacher needs. (Only the product
# matters: `c·λ_b` with `λ_d / c` gives the same output, so from a small start the student settles on a small
# `λ_d` and a larger `λ_b`.) This is why PEFT and
# veralab default to `d_initial = 0.1` and recommend small values. (The learning rate is the real knob: VeRA
# trains well at 1e-2 to 2e-2, about ten times LoRA's usual rate; notebook 06 uses 2e-2.)

# %%
for d in (1e-3, 1e-2, 1e-1):
    assert curves[d][-1] < 1e-6  # learned the teacher almost exactly
assert curves[1.0][-1] > 100 * max(curves[d][-1] for d in (1e-3, 1e-2, 1e-1))

# %% [markdown]
# ## 4. The production path computes the same thing
#
# `veralab.fast` is what you train with: PEFT's API and parameter names, per-adapter λ vectors in
# `nn.ParameterDict`s, one shared pair per model, and cached contiguous slices. It must agree with the
# reference. We adapt a one-layer module with `get_model`, give its λ vectors the values from section 1, and
# compare outputs and gradients with `vera_forward`.

# %%
module = nn.Sequential(OrderedDict(proj=base_layer))
model = get_model(
    module, VeraConfig(r=r, target_modules=["proj"], projection_prng_key=0)
)
# get_model swapped the nn.Linear for a veralab.fast.VeraLinear
fast_layer = module.proj
with torch.no_grad():
    fast_layer.vera_lambda_d["default"].copy_(lambda_d)
    fast_layer.vera_lambda_b["default"].copy_(lambda_b)

# The same pair: sized by the same layer and drawn from the same key.
assert torch.equal(model.vera_A, vera_A) and torch.equal(model.vera_B, vera_B)

x_fast = x.clone().requires_grad_(True)
y_fast = model(x_fast)
y_fast.pow(2).sum().backward()

reference_lambda_d = lambda_d.clone().requires_grad_(True)
reference_lambda_b = lambda_b.clone().requires_grad_(True)
x_reference = x.clone().requires_grad_(True)
y_reference = ref.vera_forward(
    x_reference,
    base_layer.weight,
    base_layer.bias,
    vera_A,
    vera_B,
    reference_lambda_d,
    reference_lambda_b,
)
y_reference.pow(2).sum().backward()

# %% [markdown]
# The fast path gets the λ gradients from `P = G^T h` (the cost model of `docs/design.md`) rather than
# through autograd's chain, so its float32 sums run in another order and may differ in the last bits: we
# compare with a relative tolerance of 1e-5 (about 80 float32 units in the last place) rather than bit for
# bit.

# %%
fp32_sums = {"rtol": 1e-5, "atol": 1e-5}
torch.testing.assert_close(y_fast, y_reference)
torch.testing.assert_close(
    fast_layer.vera_lambda_d["default"].grad, reference_lambda_d.grad, **fp32_sums
)
torch.testing.assert_close(
    fast_layer.vera_lambda_b["default"].grad, reference_lambda_b.grad, **fp32_sums
)
torch.testing.assert_close(x_fast.grad, x_reference.grad, **fp32_sums)
print("fast and reference agree: outputs, both λ gradients and the input gradient")

# %% [markdown]
# The comparison uses float32 tolerances (`torch.testing.assert_close`): the fast path may order its
# floating-point operations differently (it uses `F.linear` on cached contiguous slices), so the last bits can
# differ, but never more than float32 rounding allows.

# %% [markdown]
# ## Try it: d_initial and the learning rate
#
# Train the layer of section 3 against the same teacher with your own `d_initial` and Adam
# learning rate: the curve is the mean squared error over 200 steps, next to the default
# (`d_initial = 0.1`, `lr = 1e-2`, in gray). The figure is drawn once at the defaults; in
# Jupyter the controls below retrain and redraw it (a fraction of a second a run).

# %%
import ipywidgets as widgets
from IPython.display import display


def draw_training(d_initial=0.1, lr=1e-2):
    """Train with `d_initial` and `lr`, plot the loss; returns the final loss."""
    losses = train(d_initial, lr=lr)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.semilogy(curves[0.1], color="lightgray", linewidth=3, label="default")
    ax.semilogy(losses, linewidth=2, label=f"d_initial = {d_initial:g}, lr = {lr:g}")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("mean squared error to the teacher")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    plt.show()
    return losses[-1]


draw_training()

# %% tags=["widget"]
d_slider = widgets.SelectionSlider(
    options=[1e-3, 1e-2, 1e-1, 0.5, 1.0, 2.0], value=0.1, description="d_initial"
)
lr_slider = widgets.SelectionSlider(
    options=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], value=1e-2, description="lr"
)
training_control = widgets.interactive(draw_training, d_initial=d_slider, lr=lr_slider)
display(training_control)

# %% tags=["widget"]
# Moving a control retrains: d_initial = 1 is slow at lr = 1e-2 (section 3) ...
d_slider.value = 1.0
assert training_control.result > 100 * curves[0.1][-1]
# ... and a ten times smaller learning rate is slow from the default start, too.
d_slider.value, lr_slider.value = 0.1, 1e-3
assert training_control.result > 100 * curves[0.1][-1]

# %% [markdown]
# ## Exercise: write the forward pass
#
# Write `my_forward(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b)`, the adapted layer's
# output for an input `x (..., in)`, step by step as in section 1: slice the pair, project,
# scale by `λ_d`, lift back, scale by `λ_b`, add the base layer. The checker runs it on
# batched inputs with and without a bias, with non-zero λ vectors, and compares with the
# reference to float32 rounding.


# %% jupyter={"source_hidden": true}
# Worked solution: replace the body with your own and run the checker below.
def my_forward(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b):
    out_features, in_features = weight.shape
    A_s, B_s = vera_A[:, :in_features], vera_B[:out_features, :]
    h = x @ A_s.T  # (..., r)
    u = (lambda_d * h) @ B_s.T  # (..., out)
    return nn.functional.linear(x, weight, bias) + lambda_b * u


# %%
from veralab import exercises

feedback = exercises.check_forward(my_forward)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [05 · Merge and unmerge](05_merge_and_unmerge.ipynb): folding the adapter into the
# weight, and back.
