# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Merge and unmerge
#
# Without dropout, VeRA's update is linear in the input, so it folds into the frozen weight:
#
# $$ W = W_0 + \Delta W, \qquad \Delta W = (\lambda_b \odot B_s)(\lambda_d \odot A_s) $$
#
# (row `o` of `B_s` scaled by `λ_b[o]`, row `k` of `A_s` by `λ_d[k]`). A merged model is a plain model again:
# inference costs exactly what the base model costs.
#
# **What you will learn**
#
# 1. Merge and unmerge on one layer with the reference code, and how exact "unmerge" is.
# 2. The same on a whole model with `veralab.fast`: `merge_adapter`, `unmerge_adapter`, `merge_and_unload`,
#    and merged inference equal to unmerged inference.
# 3. What merging buys: the extra work of an unmerged adapter counted exactly, and both timed.
#
# In the code: §5 of `veralab.reference` (`delta_weight`, `merge`, `unmerge`), and `VeraLinear.merge` (§6).

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import VeraLinear, get_model

# %% [markdown]
# ## 1. One layer, with the reference
#
# `init_weights=False` gives random non-zero λ vectors, standing in for trained ones (a fresh adapter has
# `λ_b = 0`, and merging it would change nothing).

# %%
torch.manual_seed(0)
base_layer = nn.Linear(48, 32)
vera_A, vera_B = ref.init_projections(r=16, max_in=48, max_out=32, prng_key=0)
layer = ref.VeraLinear(
    base_layer, ref.SharedProjections(vera_A, vera_B), init_weights=False
)
x = torch.randn(10, 48)

W0 = base_layer.weight.detach().clone()
unmerged_output = layer(x).detach()
# W0 + ΔW written into base_layer.weight; forward is now just the base layer
layer.merge()
merged_output = layer(x).detach()
layer.unmerge()  # (W0 + ΔW) - ΔW
restored = base_layer.weight.detach()

print(
    "max |merged - unmerged| output:",
    (merged_output - unmerged_output).abs().max().item(),
)
print("max |restored - W0| weight:    ", (restored - W0).abs().max().item())

# %% [markdown]
# Neither difference is zero, and neither should be: `x (W0 + ΔW)ᵀ` rounds differently from
# `x W0ᵀ + x ΔWᵀ`, and `(W0 + ΔW) - ΔW` loses the low bits of `W0` that did not fit next to `ΔW`. Both stay
# within float32 rounding: two roundings of half a unit in the last place each, so the restored weight is off
# by at most one unit in the last place of the larger of `W0` and `W0 + ΔW`.

# %%
torch.testing.assert_close(merged_output, unmerged_output)
eps = torch.finfo(torch.float32).eps
merged_weight = (W0 + layer.delta_weight()).detach()
assert (
    (restored - W0).abs() <= eps * torch.maximum(merged_weight.abs(), W0.abs())
).all()

# %% [markdown]
# ## 2. A whole model, with `veralab.fast`
#
# A small Llama, every linear layer adapted at VeRA's usual rank 256. We set the λ vectors to small random
# values, as a trained adapter would have.

# %%
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
model = get_model(
    LlamaForCausalLM(config).eval(), VeraConfig(r=256, target_modules="all-linear")
)
with torch.no_grad():
    for _, vera_layer in model.vera_layers():
        # λ_d keeps d_initial = 0.1
        vera_layer.vera_lambda_b["default"].normal_(std=0.05)
input_ids = torch.randint(0, config.vocab_size, (8, 64))  # batch 8, 64 tokens


def logits():
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def base_weights():
    return {
        name: vera_layer.get_base_weight().clone()
        for name, vera_layer in model.vera_layers()
    }


with model.disable_adapter():
    base_logits = logits()
unmerged_logits = logits()
weights_before = base_weights()

model.merge_adapter()
merged_logits = logits()
model.unmerge_adapter()
weights_after = base_weights()

print(
    "adapter's effect on the logits:  ",
    (unmerged_logits - base_logits).abs().max().item(),
)
print(
    "max |merged - unmerged| logits:   ",
    (merged_logits - unmerged_logits).abs().max().item(),
)
print(
    "max |unmerged - original| weights:",
    max(
        (weights_after[n] - weights_before[n]).abs().max().item()
        for n in weights_before
    ),
)

# %%
# The adapter changes the logits a thousand times more than merging does, and merging
# stays within float32
# tolerance of the unmerged model.
assert (unmerged_logits - base_logits).abs().max() > 1000 * (
    merged_logits - unmerged_logits
).abs().max()
torch.testing.assert_close(merged_logits, unmerged_logits)
for name, weight in weights_before.items():
    torch.testing.assert_close(weights_after[name], weight)

# %% [markdown]
# `veralab.fast` builds `ΔW` in float32 and rounds once into the weight's dtype, whatever that dtype is, so
# merging a bf16 model loses no more than one bf16 rounding.
#
# For deployment, `merge_and_unload()` merges and hands back the plain transformers model: no VeRA modules,
# no λ vectors, no shared pair — and the same outputs.

# %%
plain = model.merge_and_unload()
print(
    type(plain).__name__,
    "| VeRA layers left:",
    sum(isinstance(m, VeraLinear) for m in plain.modules()),
)
with torch.no_grad():
    plain_logits = plain(input_ids=input_ids).logits
assert type(plain) is LlamaForCausalLM
assert not any(isinstance(m, VeraLinear) for m in plain.modules())
assert not any("vera" in name for name, _ in plain.named_parameters())
torch.testing.assert_close(plain_logits, unmerged_logits)

# %% [markdown]
# ## 3. What merging buys
#
# An unmerged adapted layer computed the way the formula reads (PEFT's way, "activation space") runs the base
# matmul (`2·N·in·out` FLOPs for `N` tokens) plus two thin ones, `x A_sᵀ` and `h_d B_sᵀ`: `2·N·r·(in + out)`
# more. At VeRA's high ranks on small layers that is *more* than the layer itself: here `r = 256` on 128-wide
# layers. (For LLaMA 7B's 4096 × 4096 `q_proj` at `r = 256` it is 12.5% extra.) `veralab.fast` picks the
# cheaper of that and "weight space", one matmul with `W + ΔW` (notebook 09 shows the cost model), so its
# unmerged forward costs at most that much. A merged layer is a plain linear layer.
#
# PyTorch's `FlopCounterMode` counts the matmul FLOPs of a forward pass exactly, so we can check both
# statements to the FLOP.

# %%
model = get_model(
    LlamaForCausalLM(config).eval(), VeraConfig(r=256, target_modules="all-linear")
)
tokens = input_ids.numel()
adapter_flops = sum(
    2 * tokens * 256 * (layer.in_features + layer.out_features)
    for _, layer in model.vera_layers()
)


def forward_flops():
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=input_ids)
    return counter.get_total_flops()


with model.disable_adapter():
    flops_base = forward_flops()
flops_unmerged = forward_flops()
model.merge_adapter()
flops_merged = forward_flops()
model.unmerge_adapter()
for state, flops in [
    ("base", flops_base),
    ("unmerged", flops_unmerged),
    ("merged", flops_merged),
]:
    print(f"{state:<9}{flops / 1e9:.3f} GFLOP per forward")

# %%
assert flops_merged == flops_base  # merged inference costs exactly the base model
# unmerged costs more than the base, and at most the activation-space 2·N·r·(in + out)
# per layer on top
assert flops_base < flops_unmerged <= flops_base + adapter_flops

# %% [markdown]
# Now the clock. The three states are timed in interleaved rounds, so that a busy spell of the machine hits
# all of them alike, and each keeps its fastest run (the one least disturbed). Timings depend on the machine,
# so nothing here is asserted: the FLOP counts above are the facts, and the times should follow them.


# %%
def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


best = dict.fromkeys(["base", "unmerged", "merged", "merge", "unmerge"], float("inf"))
logits()  # warm-up
for _ in range(7):
    with model.disable_adapter():
        best["base"] = min(best["base"], seconds(logits))
    best["unmerged"] = min(best["unmerged"], seconds(logits))
    best["merge"] = min(best["merge"], seconds(model.merge_adapter))
    best["merged"] = min(best["merged"], seconds(logits))
    best["unmerge"] = min(best["unmerge"], seconds(model.unmerge_adapter))

layers = sum(1 for _ in model.vera_layers())
for state in ("base", "unmerged", "merged"):
    print(f"forward, {state:<9}{1e3 * best[state]:6.1f} ms")
print(f"merge_adapter()   {1e3 * best['merge']:6.1f} ms ({layers} layers)")
print(f"unmerge_adapter() {1e3 * best['unmerge']:6.1f} ms")

fig, (ax_flops, ax_time) = plt.subplots(1, 2, figsize=(10, 3.5))
labels = ["base", "unmerged", "merged"]
ax_flops.bar(
    labels,
    [flops_base / 1e9, flops_unmerged / 1e9, flops_merged / 1e9],
    color=["gray", "tab:red", "tab:green"],
)
ax_flops.set_ylabel("GFLOP per forward (counted)")
ax_time.bar(
    labels,
    [1e3 * best[label] for label in labels],
    color=["gray", "tab:red", "tab:green"],
)
ax_time.set_ylabel("ms per forward (best of 7)")
fig.suptitle(
    "Llama, 2 layers of width 128, all linear layers adapted at r = 256; batch 8 × 64 "
    "tokens"
)
fig.tight_layout()
plt.show()

# %% [markdown]
# Merging takes milliseconds (one `out × r × in` product per layer), and from then on every forward
# pass costs what the base model costs. So: train unmerged (the λ vectors need their gradients), merge for
# inference, and unmerge (or keep the unmerged copy) to train further or switch adapters. When many
# adapters must serve one batch at once, merging is not an option; that is the topic of a later notebook.

# %% [markdown]
# ## Try it: the weight's dtype and merge rounding
#
# Merging writes `W0 + ΔW` into the weight's own dtype, and unmerging writes `W - ΔW` back:
# each write rounds once. Pick a dtype and the adapter's size: the histogram shows how far
# each restored weight is from `W0`, in units of that dtype's rounding step,
# `eps · (|W0| + |ΔW|)`. Merging and unmerging never lose more than that one unit: a float32
# or float64 model gets its weights back almost exactly, a bf16 or fp16 one to its own (coarse)
# precision. (The figure shows bfloat16 at the defaults; in Jupyter the controls redraw it.)

# %%
import ipywidgets as widgets
from IPython.display import display

rounding_weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(5)) / 10
rounding_A, rounding_B = ref.init_projections(r=32, max_in=96, max_out=64, prng_key=0)
rounding_lambda_d = torch.full((32,), 0.1)
rounding_lambda_b = torch.randn(64, generator=torch.Generator().manual_seed(6))


def draw_merge_rounding(dtype="bfloat16", adapter_scale=0.1):
    """Merge and unmerge in `dtype`; plot |restored - W0|; returns its largest value.

    The errors are in units of `dtype`'s rounding step, eps · (|W0| + |ΔW|).

    Args:
        dtype: the weight's dtype, a name of torch's.
        adapter_scale: multiplies λ_b, so ΔW's size relative to W0.
    """
    torch_dtype = getattr(torch, dtype)
    weight = rounding_weight.to(torch_dtype)  # W0 as the model stores it
    # The adapter in float64, so that only the two writes into `dtype` round.
    adapter = (
        rounding_A.double(),
        rounding_B.double(),
        rounding_lambda_d.double(),
        adapter_scale * rounding_lambda_b.double(),
    )
    merged = ref.merge(weight.double(), *adapter).to(torch_dtype)
    restored = ref.unmerge(merged.double(), *adapter).to(torch_dtype)
    delta = ref.delta_weight(*adapter, in_features=96, out_features=64)
    step = torch.finfo(torch_dtype).eps * (weight.double().abs() + delta.abs())
    units = ((restored.double() - weight.double()).abs() / step).flatten()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(units.numpy(), bins=40, range=(0, 1.25), color="tab:purple")
    ax.axvline(1.0, color="black", linestyle="--", label="one rounding step")
    ax.set_yscale("log")
    ax.set_xlabel(f"|unmerge(merge(W0)) - W0| / (eps · (|W0| + |ΔW|)), {dtype}")
    ax.set_ylabel("weights")
    ax.legend()
    plt.show()
    return float(units.max())


draw_merge_rounding()

# %% tags=["widget"]
dtype_choice = widgets.Dropdown(
    options=["float64", "float32", "bfloat16", "float16"],
    value="bfloat16",
    description="dtype",
)
merge_control = widgets.interactive(
    draw_merge_rounding,
    dtype=dtype_choice,
    adapter_scale=widgets.FloatLogSlider(value=0.1, base=10, min=-3, max=1),
)
display(merge_control)

# %% tags=["widget"]
# Each dtype, through the control: a merge and an unmerge cost at most one rounding
# step.
worst = {}
for dtype in dtype_choice.options:
    dtype_choice.value = dtype
    worst[dtype] = merge_control.result
    assert worst[dtype] <= 1.0, (dtype, worst[dtype])
assert worst["bfloat16"] > 0 and worst["float16"] > 0  # and it does round

# %% [markdown]
# ## Exercise: write ΔW
#
# Write `my_delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features)`: the
# `ΔW` that merging adds to a linear layer's weight, shape `(out, in)`, from the slices of the
# shared pair and the two λ vectors. The checker tries two layer shapes with non-zero λ
# vectors and compares with the reference to float32 rounding.


# %% jupyter={"source_hidden": true}
# Worked solution: replace the body with your own and run the checker below.
def my_delta_weight(vera_A, vera_B, lambda_d, lambda_b, in_features, out_features):
    A_s, B_s = vera_A[:, :in_features], vera_B[:out_features, :]
    return (lambda_b[:, None] * B_s) @ (lambda_d[:, None] * A_s)  # (out, r) @ (r, in)


# %%
from veralab import exercises

feedback = exercises.check_delta_weight(my_delta_weight)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [06 · Fine-tuning a real model](06_finetune_a_real_model.ipynb): VeRA against LoRA
# on a pretrained sentence encoder.
