# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · VeRA over quantized bases: what is exact, what is approximate
#
# A frozen base model does not need full precision: bitsandbytes stores its weights in 8 bits (LLM.int8()) or
# 4 bits (QLoRA's nf4 and fp4), and VeRA's few float32 parameters train on top. `veralab.fast.get_model` sees
# the
# bitsandbytes layers and wraps them in `veralab.fast.backends.bnb.Linear8bitLt` / `Linear4bit`, which add the
# adapter
# term to the quantized layer's output.
#
# **What you will learn**
#
# 1. What an 8-bit and a 4-bit weight store, how far each is from the float32 weight, and the error bound each
#    scheme implies: int8 row-wise absmax, nf4 and fp4 blockwise — measured and plotted side by side.
# 2. That the adapter over a quantized base is *exact*: its term equals the reference's to float32 rounding,
#    while the base output is off by the quantization error, some 10⁵ times more.
# 3. That merging into a quantized weight is *approximate*: it requantizes `W + ΔW`, within the same bound,
# and
#    what that does to a small adapter.
#
# Everything runs on the CPU, on layers built directly (bitsandbytes quantizes a layer when it is moved to a
# device: `.to("cpu")`).

# %%
import logging

# bitsandbytes logs that its int8 matmul rounds inputs to fp16 (section 2 says so) and,
# on some CPUs, that an
# optional kernel package is missing: neither changes a result here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# %%
import warnings

import bitsandbytes as bnb
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import get_model
from veralab.fast.backends.bnb import Linear4bit, Linear8bitLt

# unit roundoff: a rounding to fp16 errs by at most u16 · |value|
U16 = torch.finfo(torch.float16).eps / 2
U32 = torch.finfo(torch.float32).eps / 2

# %% [markdown]
# ## 1. Three ways to store a weight
#
# Take one linear layer, `256 → 512`, with weights drawn like a pretrained transformer's (normal, std 0.02),
# and store it three ways:
#
# | scheme | stores | one value is | worst rounding |
# |---|---|---|---|
# | int8 (`Linear8bitLt`) | int8 codes, one fp32 scale per output row | `code · rowmax / 127` | `rowmax / 254`
# |
# | nf4 (`Linear4bit`) | 4-bit codes, one scale per block of 64 | `absmax · nf4[code]` | `absmax · (largest
# gap in nf4) / 2` |
# | fp4 (`Linear4bit`) | 4-bit codes, one scale per block of 64 | `absmax · fp4[code]` | `absmax · (largest
# gap in fp4) / 2` |
#
# Rows are rows of the `(out, in)` weight; blocks are 64 consecutive values of the flattened weight. The 16
# nf4
# values are quantiles of a normal distribution, the 16 fp4 values those of a tiny floating-point format.
# (int8
# first rounds the weight to fp16, which adds `u16 · |W|`.) We turn off 4-bit *double quantization*, which
# quantizes the scales too, so that the bound stays this simple.

# %%
torch.manual_seed(0)
fp32_layer = nn.Linear(256, 512)
nn.init.normal_(fp32_layer.weight, std=0.02)
W = fp32_layer.weight.detach().clone()
SCHEMES = ["int8", "nf4", "fp4"]


def quantized(linear, scheme):
    """A bitsandbytes copy of `linear`, quantized when moved to the CPU.

    Args:
        linear: the float32 nn.Linear to copy.
        scheme: "int8", "nf4" or "fp4".
    """
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, has_fp16_weights=False
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            compute_dtype=torch.float32,
            # no double quantization: one exact fp32 scale per block
            compress_statistics=False,
            quant_type=scheme,
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def dequantized(layer):
    """The dense float32 (out, in) weight a bitsandbytes layer stands for."""
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(
            layer.weight.data, layer.weight.SCB
        )
    return bnb.functional.dequantize_4bit(
        layer.weight.data, layer.weight.quant_state
    ).float()


def quantization_bound(weight, layer):
    """Elementwise bound on |Q(weight) - weight| for the scheme of `layer`.

    The bound is derived from how the scheme rounds.

    Args:
        weight: the float32 (out, in) weight being quantized.
        layer: a bitsandbytes layer holding Q(weight) (it gives the scheme, its code
            values and block size).
    """
    if isinstance(layer, bnb.nn.Linear8bitLt):
        # the scale, taken after the fp16 cast
        rowmax = weight.abs().amax(dim=1, keepdim=True) * (1 + U16)
        bound = rowmax / 254 + U16 * weight.abs()
    else:
        state = layer.weight.quant_state
        code = state.code.sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        blocks = weight.reshape(-1, state.blocksize)  # (blocks, 64)
        bound = (
            (blocks.abs().amax(dim=1, keepdim=True) * half_gap)
            .expand_as(blocks)
            .reshape(weight.shape)
        )
    return bound * (1 + 4 * U32)  # and the float32 rounding of dequantizing


layers = {scheme: quantized(fp32_layer, scheme) for scheme in SCHEMES}
errors = {scheme: (dequantized(layer) - W).abs() for scheme, layer in layers.items()}
bounds = {scheme: quantization_bound(W, layer) for scheme, layer in layers.items()}
stored_bytes = {
    scheme: layer.weight.data.nbytes
    + (
        layer.weight.SCB.nbytes
        if scheme == "int8"
        else layer.weight.quant_state.absmax.nbytes
    )
    for scheme, layer in layers.items()
}
for scheme in SCHEMES:
    print(
        f"{scheme}: {stored_bytes[scheme]:>7,d} bytes (fp32: {W.nbytes:,d})   |error| "
        "mean "
        f"{errors[scheme].mean():.2e}  max {errors[scheme].max():.2e}   max error / "
        "bound "
        f"{(errors[scheme] / bounds[scheme]).max():.3f}"
    )

# %%
out_features, in_features = W.shape
# a byte a weight, a scale a row
assert stored_bytes["int8"] == out_features * in_features + 4 * out_features
for scheme in ("nf4", "fp4"):  # half a byte a weight, a float32 scale per 64 weights
    assert stored_bytes[scheme] == out_features * in_features // 2 + 4 * (
        out_features * in_features // 64
    )
for scheme in SCHEMES:
    # every element within its scheme's bound
    assert (errors[scheme] <= bounds[scheme]).all(), scheme
# For normally distributed weights, nf4's normal quantiles beat fp4's grid, and 8 bits
# beat both.
mean_error = {scheme: errors[scheme].mean().item() for scheme in SCHEMES}
assert mean_error["int8"] < mean_error["nf4"] < mean_error["fp4"]
assert mean_error["nf4"] > 5 * mean_error["int8"]

# %%
nf4_code = layers["nf4"].weight.quant_state.code.sort().values.numpy()
fp4_code = layers["fp4"].weight.quant_state.code.sort().values.numpy()
block_scaled = (
    (W.reshape(-1, 64) / W.reshape(-1, 64).abs().amax(dim=1, keepdim=True))
    .reshape(-1)
    .numpy()
)

fig, (ax_error, ax_code) = plt.subplots(1, 2, figsize=(12, 4))
bins = np.logspace(-8, -1.5, 60)
colors = {"int8": "tab:green", "nf4": "tab:blue", "fp4": "tab:orange"}
for scheme in SCHEMES:
    ax_error.hist(
        errors[scheme].reshape(-1).numpy(),
        bins=bins,
        histtype="step",
        lw=2,
        color=colors[scheme],
        label=f"{scheme}: mean {mean_error[scheme]:.1e}",
    )
    ax_error.axvline(bounds[scheme].max().item(), color=colors[scheme], ls="--")
ax_error.set_xscale("log")
ax_error.set_xlabel("|Q(W) − W| per weight (dashed: the largest bound)")
ax_error.set_ylabel("weights")
ax_error.set_title("Quantization error of a 256 → 512 layer, weights ~ N(0, 0.02²)")
ax_error.legend(loc="upper left")

ax_code.hist(
    block_scaled, bins=80, color="lightgray", density=True, label="W / block absmax"
)
ax_code.eventplot(
    [nf4_code, fp4_code],
    lineoffsets=[2.2, 1.4],
    linelengths=0.6,
    colors=[colors["nf4"], colors["fp4"]],
)
ax_code.text(-1.0, 2.6, "nf4 codes", color=colors["nf4"])
ax_code.text(-1.0, 1.8, "fp4 codes", color=colors["fp4"])
ax_code.annotate(
    "4 codes within ±0.005",
    (0, 1.1),
    xytext=(0.12, 0.75),
    color=colors["fp4"],
    arrowprops={"arrowstyle": "->", "color": colors["fp4"]},
)
ax_code.set_xlabel("value in units of the block's absmax")
ax_code.set_title("The 16 values a 4-bit code can take, over the weights they round")
ax_code.legend(loc="upper right")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each scheme stays within its bound, and the bound is nearly reached: rounding to the nearest code errs by up
# to
# half a gap. int8 has 255 levels per row, and its errors are 10 times smaller than the 4-bit ones. Between
# the
# 4-bit schemes, nf4 puts its 16 values where normally distributed weights are dense, near 0; fp4 spends four
# of
# its 16 codes within 0.0052 of zero (+0 and −0 among them) and leaves wide gaps from ±0.67 to ±1. So nf4 errs
# less on average, for the same 4.5 bits a weight (the codes and one float32 scale per 64).

# %% [markdown]
# ## 2. The adapter is exact over a quantized base
#
# Now VeRA. A small two-layer block, `up` (256 → 512) and `down` (512 → 256), in float32 and in each of the
# three
# quantized forms. `get_model` picks the VeRA layer for each bitsandbytes layer; every copy gets the same
# shared
# projections (same `projection_prng_key`) and the same λ vectors, random around the sizes a trained adapter
# has
# (λ_d near its initial 0.1, λ_b of order 0.1): they move the block's output by a few percent.


# %%
class Block(nn.Module):
    """up → GELU → down, the shape of a transformer's MLP."""

    def __init__(self, up, down):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


torch.manual_seed(1)
up, down = nn.Linear(256, 512), nn.Linear(512, 256)
for linear in (up, down):
    nn.init.normal_(linear.weight, std=0.02)
config = VeraConfig(r=64, target_modules=["up", "down"])
models = {"fp32": get_model(Block(up, down), config)}
models.update(
    {
        scheme: get_model(Block(quantized(up, scheme), quantized(down, scheme)), config)
        for scheme in SCHEMES
    }
)
generator = torch.Generator().manual_seed(2)
trained_lambdas = {
    name: (0.1 + 0.05 * torch.randn(param.shape, generator=generator))
    if "vera_lambda_d" in name
    else 0.1 * torch.randn(param.shape, generator=generator)
    for name, param in models["fp32"].named_parameters()
    if "vera_lambda_" in name
}


def set_lambdas(model, scale=1.0):
    """Give `model` the λ vectors in `trained_lambdas`, with λ_b times `scale`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda_" in name:
                param.copy_(
                    trained_lambdas[name] * (scale if "vera_lambda_b" in name else 1.0)
                )


for model in models.values():
    set_lambdas(model)
    model.eval()
print({name: type(model.model.up).__name__ for name, model in models.items()})

x_block = torch.randn(64, 256, generator=generator)
with torch.no_grad():
    adapted_output = models["fp32"](x_block)
    with models["fp32"].disable_adapter():
        base_output = models["fp32"](x_block)
adapter_effect = ((adapted_output - base_output).norm() / base_output.norm()).item()
print(f"the adapter moves the float32 block's output by {adapter_effect:.1%}")

# %%
# a trained adapter's size: it changes the output, it does not replace it
assert 0.02 < adapter_effect < 0.2
assert isinstance(models["int8"].model.up, Linear8bitLt)
assert isinstance(models["nf4"].model.up, Linear4bit) and isinstance(
    models["fp4"].model.down, Linear4bit
)
for model in models.values():  # one and the same shared pair everywhere
    assert torch.equal(model.vera_A, models["fp32"].vera_A) and torch.equal(
        model.vera_B, models["fp32"].vera_B
    )

# %% [markdown]
# For each adapted layer we split the output in two: the base layer's output, and the rest, which is the
# adapter
# term. The reference (`veralab.reference.vera_forward` with a zero weight) gives the adapter term in exact
# float32 arithmetic, and the float32 `nn.Linear` gives the exact base output.
#
# The adapter term is two sums, over `in` and over `r` products, and two elementwise scalings, so float32
# rounding
# can move it by at most `(in + r + 2) · u32 · Σ|terms|`; adding it to the base output and subtracting that
# back
# adds a rounding of each one's size.

# %%
x = {
    "up": torch.randn(16, 256, generator=generator),
    "down": torch.randn(16, 512, generator=generator),
}


def reference_adapter_term(layer, vera_A, vera_B, x, absolute=False):
    """The adapter term by `veralab.reference`; with `absolute`, Σ|terms| (the size of
    what was summed)."""
    A_s, B_s = ref.slice_projections(
        vera_A, vera_B, layer.in_features, layer.out_features
    )
    lambda_d, lambda_b = (
        layer.vera_lambda_d["default"].detach(),
        layer.vera_lambda_b["default"].detach(),
    )
    tensors = (x, A_s, B_s, lambda_d, lambda_b)
    if absolute:
        tensors = tuple(t.abs() for t in tensors)
    x, A_s, B_s, lambda_d, lambda_b = tensors
    zero = torch.zeros(layer.out_features, layer.in_features)
    return ref.vera_forward(x, zero, None, A_s, B_s, lambda_d, lambda_b)


rows = []
for scheme in SCHEMES:
    model = models[scheme]
    for layer_name in ("up", "down"):
        layer, exact_base = (
            getattr(model.model, layer_name),
            getattr(models["fp32"].model, layer_name).base_layer,
        )
        with torch.no_grad():
            output, base_output = layer(x[layer_name]), layer.base_layer(x[layer_name])
            exact_base_output = exact_base(x[layer_name])
        term = reference_adapter_term(layer, model.vera_A, model.vera_B, x[layer_name])
        magnitude = reference_adapter_term(
            layer, model.vera_A, model.vera_B, x[layer_name], absolute=True
        )
        bound = (layer.in_features + layer.r["default"] + 2) * U32 * magnitude
        bound = bound + 2 * U32 * (output.abs() + base_output.abs())
        rows.append(
            {
                "scheme": scheme,
                "layer": layer_name,
                "adapter error": ((output - base_output) - term).abs().max().item(),
                "adapter within bound": bool(
                    (((output - base_output) - term).abs() <= bound).all()
                ),
                "base error": (base_output - exact_base_output).abs().max().item(),
                "adapter size": term.abs().max().item(),
            }
        )
print(
    f"{'':<12}{'|adapter term - reference|':>28}{'|base - fp32 base|':>20}"
    f"{'|adapter term|':>16}"
)
for row in rows:
    print(
        f"{row['scheme']:<5}{row['layer']:<7}{row['adapter error']:>28.2e}"
        f"{row['base error']:>20.2e}"
        f"{row['adapter size']:>16.2e}"
    )

# %%
for row in rows:
    # the adapter term is the reference's, to float32 rounding
    assert row["adapter within bound"], row
    # the base is quantization-approximate
    assert row["base error"] > 1000 * row["adapter error"], row

# %% [markdown]
# The adapter term is the reference's to the last few bits; the base output is off by `x (Q(W) − W)ᵀ`, the
# quantization error of section 1 — about 10⁻² for 8 bits and 10⁻¹ for 4 bits here. Over 4 bits that is as
# large
# as the adapter's whole effect, and it does not matter: the adapter is trained on the quantized model, as
# QLoRA
# trains LoRA, and what it adds is added exactly.
# (In eval mode `Linear8bitLt` also rounds the *input* to int8, row by row: LLM.int8()'s matmul.) VeRA's
# layers compute the adapter term in float32 whatever the base's compute dtype, so the λ vectors get exact
# gradients over an approximate base; `tests/test_bnb.py` checks those gradients against the reference.

# %% [markdown]
# ## 3. Merging into a quantized weight rounds
#
# `merge_adapter()` computes `W̃ + ΔW` in float32, with `W̃` the dequantized base weight, and *requantizes* it
# with the layer's own scheme. The result is a quantized weight again — so it is within the bound of section 1
# of
# `W̃ + ΔW`, not equal to it. veralab says so with a warning.

# %%
merge_rows = {}
for scheme in SCHEMES:
    model = models[scheme]
    targets = {
        name: layer.get_base_weight().float() + layer.delta_weight("default")
        for name, layer in model.vera_layers()
    }
    with torch.no_grad():
        unmerged = {name: layer(x[name]) for name, layer in model.vera_layers()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    merge_rows[scheme] = {
        "warned": any("requantizes" in str(w.message) for w in caught)
    }
    for name, layer in model.vera_layers():
        merged_weight = layer.get_base_weight().float()
        with torch.no_grad():
            merged = layer(x[name])
        merge_rows[scheme][name] = {
            "weight error / bound": (
                (merged_weight - targets[name]).abs()
                / quantization_bound(targets[name], layer.base_layer)
            )
            .max()
            .item(),
            "output error": (merged - unmerged[name]).abs().max().item(),
        }
    model.unmerge_adapter()
    print(
        f"{scheme}: warned={merge_rows[scheme]['warned']}  "
        + "  ".join(
            f"{name}: max |merged W - (W̃ + ΔW)| / bound "
            f"{merge_rows[scheme][name]['weight error / bound']:.3f}, max |merged - "
            "unmerged| output "
            f"{merge_rows[scheme][name]['output error']:.2e}"
            for name in ("up", "down")
        )
    )

# %%
for scheme in SCHEMES:
    assert merge_rows[scheme]["warned"]
    for name in ("up", "down"):
        # requantized within the scheme's bound
        assert merge_rows[scheme][name]["weight error / bound"] <= 1
        row = next(r for r in rows if r["scheme"] == scheme and r["layer"] == name)
        # not float32 rounding
        assert merge_rows[scheme][name]["output error"] > 1000 * row["adapter error"]

# %% [markdown]
# How much that matters depends on how large `ΔW` is next to the quantization step. A trained adapter's `ΔW`
# is
# small (λ_b starts at zero), and a merge rounds it to the base's grid: part of it, or all of it, can vanish.
# We
# scale λ_b from 1/100 to 100 times the adapter above and measure what merging loses: the error of the merged
# output, `|merged − unmerged|`, over the adapter's own effect, `|unmerged − base|` (whole block, 64 inputs).
# At
# 1 the adapter is lost entirely: the merged model is the base model again.

# %%
scales = np.logspace(-2, 2, 9)  # 1 is in it: the adapter as set above
relative_merge_error = {scheme: [] for scheme in SCHEMES}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the requantization warning, once per merge
    for scheme in SCHEMES:
        model = models[scheme]
        for scale in scales:
            set_lambdas(model, scale)
            with torch.no_grad():
                unmerged = model(x_block)
                with model.disable_adapter():
                    base = model(x_block)
                model.merge_adapter()
                merged = model(x_block)
                model.unmerge_adapter()
            relative_merge_error[scheme].append(
                ((merged - unmerged).norm() / (unmerged - base).norm()).item()
            )
        set_lambdas(model)
for scheme in SCHEMES:
    print(f"{scheme}: " + "  ".join(f"{e:8.3f}" for e in relative_merge_error[scheme]))

fig, ax = plt.subplots(figsize=(7, 4))
for scheme in SCHEMES:
    ax.loglog(
        scales, relative_merge_error[scheme], "o-", color=colors[scheme], label=scheme
    )
ax.axhline(1, color="gray", ls=":", label="merged = base (adapter lost)")
ax.axvline(1, color="black", lw=0.8)
ax.text(1.15, 1.3, "the adapter of sections 2 and 3", fontsize=9)
ax.set_xlabel("adapter scale (λ_b × this)")
ax.set_ylabel("|merged − unmerged| / |unmerged − base|")
ax.set_ylim(0.01, 2.5)
ax.set_title("How much of the adapter a merge into a quantized weight loses")
ax.grid(True, which="both", alpha=0.3)
ax.legend(loc="lower left")
plt.show()

# %%
as_trained = list(scales).index(1.0)
for scheme in SCHEMES:
    # an adapter 100 times smaller is rounded away
    assert relative_merge_error[scheme][0] > 0.9
    # one 100 times larger mostly survives
    assert relative_merge_error[scheme][-1] < 0.25
# The adapter of sections 2-3: a merge into int8 keeps most of it, a merge into 4 bits
# loses most of it.
assert relative_merge_error["int8"][as_trained] < 0.5
assert (
    min(
        relative_merge_error["nf4"][as_trained], relative_merge_error["fp4"][as_trained]
    )
    > 0.8
)

# %% [markdown]
# Slightly above 1 on the left: a tiny `ΔW` is rounded away, and requantizing also moves the grid a little, so
# the merged model is the base model plus a fresh rounding. On the right `ΔW` outgrows `W` itself, the
# requantization error grows with it, and the ratio settles at each scheme's relative precision: about 2% for
# int8, 14-19% for 4 bits.
#
# So over a quantized base, keep VeRA *unmerged*: the adapter term is exact and costs two thin matmuls per
# layer. A merge into 8 bits keeps an adapter that moves the weights by more than the int8 step; a merge into
# 4 bits is a new quantization of the model, and an adapter of a trained size is lost in it. To deploy a
# merged model, merge
# into a dequantized (fp16 / bf16) copy of the base instead, and quantize the result once if you must.
#
# One practical trap, handled for you: on CPUs with AVX-512 bf16, bitsandbytes repacks a 4-bit weight in place
# the first time the layer runs in eval mode without gradients, into a layout that breaks training gradients
# and
# dequantizing (so merging). `get_model` turns the repacking off for every `Linear4bit` of the model
# (`veralab.fast.backends.bnb.keep_standard_layouts`); that is why everything above ran in eval mode and still
# merged
# correctly.

# %%
state = models["nf4"].model.up.base_layer.weight.quant_state
# still bitsandbytes' standard layout
assert not getattr(state, "packing_format_for_cpu", False)

# %% [markdown]
# ## 4. Beyond bitsandbytes: torchao, Quanto and HQQ on one model
#
# bitsandbytes is one library among several. `veralab.fast` adapts the quantized layers of torchao
# (`nn.Linear` with an int8 or int4 weight tensor), optimum-quanto (`QLinear`) and HQQ (`HQQLinear`) the same
# way, each through its backend's weight seam (`veralab.fast.backends`): the base forward is the library's
# own, the adapter term is exact on top, and a merge requantizes `W̃ + ΔW` with the layer's own scheme. We load
# one small Llama as `veralab finetune --quantize` does (`veralab.app.base_model.load_model`) with every
# scheme whose library is installed here, and compare:
#
# - the memory of the base (its weights as stored: codes, scales, zero points);
# - the time of a training step (forward, backward, AdamW on the lambdas; printed, not asserted: it varies);
# - how exact the adapter is: its term against the reference on the dequantized weight;
# - what merging costs: the time of `merge_adapter()`, how far the merged weight lands from `W̃ + ΔW` (as a
#   fraction of `ΔW`: the part of the delta the requantization loses), and how far the merged output moves
#   from the unmerged one, as a fraction of the adapter's own effect on the output.

# %%
import tempfile
import time

from transformers import LlamaConfig, LlamaForCausalLM

from veralab.app.base_model import load_model
from veralab.app.options import QUANTIZATIONS
from veralab.fast.backends import unavailable_reason
from veralab.fast.diagnostics import weight_bytes

torch.manual_seed(0)
llama_config = LlamaConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
)
model_dir = tempfile.mkdtemp()
LlamaForCausalLM(llama_config).save_pretrained(model_dir)
ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
available = ["float32"] + [
    q for q in QUANTIZATIONS if unavailable_reason(QUANTIZATIONS[q][0]) is None
]
print("schemes measured here:", available)
for q in QUANTIZATIONS:
    if q not in available:
        print(f"{q}: skipped, {unavailable_reason(QUANTIZATIONS[q][0])}")


# %%
def compare(scheme: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # PEFT-compatible notices, the requantization warning
        base = load_model(model_dir, None if scheme == "float32" else scheme)
        row = {"scheme": scheme, "weights (MB)": weight_bytes(base) / 2**20}
        model = get_model(
            base, VeraConfig(r=64, target_modules=["q_proj", "v_proj", "down_proj"])
        )
        for _, layer in model.vera_layers():
            with torch.no_grad():
                layer.vera_lambda_b["default"].normal_(0, 0.1)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3
        )
        for _ in range(3):  # the first step warms up
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            row["step (ms)"] = (time.perf_counter() - start) * 1000
        layer = model.model.model.layers[0].self_attn.q_proj
        x = torch.randn(
            8, layer.in_features, generator=torch.Generator().manual_seed(2)
        )
        A_s, B_s = ref.slice_projections(
            model.vera_A, model.vera_B, layer.in_features, layer.out_features
        )
        lambdas = (
            layer.vera_lambda_d["default"].detach(),
            layer.vera_lambda_b["default"].detach(),
        )
        with torch.no_grad():
            term = layer(x) - layer.base_layer(x)
            zero = torch.zeros(layer.out_features, layer.in_features)
            reference_term = ref.vera_forward(x, zero, None, A_s, B_s, *lambdas)
            row["adapter term error"] = (
                (term - reference_term).norm() / reference_term.norm()
            ).item()
            target = layer.get_base_weight().float() + layer.delta_weight("default")
            delta = layer.delta_weight("default")
            unmerged, base_output = layer(x), layer.base_layer(x)
            start = time.perf_counter()
            model.merge_adapter()
            row["merge (ms)"] = (time.perf_counter() - start) * 1000
            row["delta lost in merge"] = (
                (layer.get_base_weight().float() - target).norm() / delta.norm()
            ).item()
            row["merged output moved"] = (
                (layer(x) - unmerged).norm() / (unmerged - base_output).norm()
            ).item()
    return row


comparison = [compare(scheme) for scheme in available]
columns = list(comparison[0])
print(" | ".join(f"{c:>20}" for c in columns))
for row in comparison:
    print(
        " | ".join(
            f"{row[c]:>20}" if isinstance(row[c], str) else f"{row[c]:>20.4g}"
            for c in columns
        )
    )

# %%
by_scheme = {row["scheme"]: row for row in comparison}
for row in comparison:
    assert (
        row["adapter term error"] < 1e-5
    )  # exact over every base: float32 rounding only
    if row["scheme"] == "float32":
        assert row["delta lost in merge"] < 1e-5
    else:
        assert (
            row["weights (MB)"] < by_scheme["float32"]["weights (MB)"]
        )  # the point of quantizing
        assert (
            row["delta lost in merge"] > 1e-3
        )  # a merge into a quantized weight rounds
int8_rows = [
    row
    for name, row in by_scheme.items()
    if name.endswith("8bit") or name.endswith("int8")
]
int4_rows = [
    row
    for name, row in by_scheme.items()
    if name.endswith("4bit") or name.endswith("int4")
]
if int8_rows and int4_rows:  # a coarser grid loses more of the delta
    assert max(r["delta lost in merge"] for r in int8_rows) < min(
        r["delta lost in merge"] for r in int4_rows
    )

# %% [markdown]
# What the table says, scheme by scheme (step times vary with the machine; the tests pin the rest):
#
# - **Memory.** The table counts the whole model, whose tied embedding table stays float32 in every scheme.
#   int8 schemes store the linear weights in a quarter of float32; bitsandbytes' nf4, Quanto's int4 and HQQ
#   pack two 4-bit codes a byte, plus group scales (and zero points). torchao's CPU int4 layout
#   (`IntxWeightOnlyConfig`) keeps each 4-bit code unpacked in an int8 with a scale and zero point per group
#   of 32, so it takes *more* than its int8 scheme: it is the layout torchao's CPU kernels want, not a
#   compact one (`Int4WeightOnlyConfig` packs, on a GPU).
# - **Step time.** On a CPU every quantized forward dequantizes (or runs an integer kernel): the base is
#   slower than float32, by a factor that depends on the library's CPU kernels, not on VeRA, whose term runs
#   in float32 on two thin matrices. `python -m benchmarks.bench_quantized` measures this on a larger model,
#   next to PEFT over the same base.
# - **The adapter is exact** over every base (first assert): only the base is approximate.
# - **Merging costs a requantization**: a fraction of `ΔW` is rounded away, more on a coarser grid, as in
#   section 3; on a 4-bit grid the error can exceed `ΔW` itself (a ratio above 1: the requantization also
#   moves the grid under the weights the adapter did not change). GPTQ and AWQ layers
#   (`pip install 'veralab[gptq]'`) come out of a calibrated quantization that
#   one layer cannot redo: there `merge_adapter()` raises `MergeNotSupportedError` before anything changes,
#   and the adapter keeps working unmerged.

# %% [markdown]
# ## Exercise: int8 row-wise quantization, and its error bound
#
# Write `my_int8_roundtrip(weight)`: quantize an `(out, in)` float32 weight the way
# `Linear8bitLt` stores it (each row scaled so that its largest magnitude maps to 127,
# rounded to integers) and dequantize it back to float32. Every weight should come back
# within `rowmax / 254` of where it was. The checker uses rows of very different scales.


# %% jupyter={"source_hidden": true}
# Worked solution: replace the body with your own and run the checker below.
def my_int8_roundtrip(weight):
    scale = weight.abs().amax(dim=1, keepdim=True) / 127  # one scale per row
    return torch.round(weight / scale) * scale


# %%
from veralab import exercises

feedback = exercises.check_int8_roundtrip(my_int8_roundtrip)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [08 · Many adapters](08_many_adapters.ipynb): one model, one batch, many users.
