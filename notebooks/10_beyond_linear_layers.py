# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · Beyond linear layers: embeddings and convolutions
#
# The VeRA paper adapts linear layers. But its idea, a frozen weight plus `Λ_b B_s Λ_d A_s` with
# `A_s`, `B_s` slices of one shared random pair, needs nothing more than a weight that *is* a matrix.
# An embedding table is one, and so is a convolution's kernel once it is seen the right way.
#
# **What you will learn**
#
# 1. Why an embedding table `E (num_embeddings, dim)` is the linear map `W = Eᵀ` of one-hot inputs, so
#    VeRA adapts it with `A_s = vera_A[:, :num_embeddings]`; why the adapted lookup *gathers* columns of
#    `A_s` and never builds the adapted table; what happens at `padding_idx`.
# 2. How a small language model learns new tokens through VeRA on `embed_tokens`: resizing the
#    vocabulary, why tied input/output embeddings are refused, and how far 128 trained numbers go.
# 3. Why a convolution's kernel `(out, in, *k)` is the matrix `(out, in·∏k)`, so that `A_s` runs as a
#    convolution with `r` output channels and `B_s` as a 1×1 convolution; what merging adds.
# 4. How to adapt a small CNN and a ViT (whose patch embedding is a `Conv2d`) with `veralab.fast`, and
#    that merging and unmerging give the same outputs and the same weights back.
# 5. What each kind of layer costs in trained numbers, VeRA against LoRA, at real model sizes, and the
#    one cost that grows: the width of the frozen `vera_A`.
#
# Each step is first written out with the textbook, `veralab.reference` (§7 embeddings, §8
# convolutions), then run with the production path, `veralab.fast.get_model`.

# %%
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is local: no hub

import copy
import tempfile
import warnings

import matplotlib.pyplot as plt
import peft
import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from veralab import VeraConfig
from veralab import reference as ref
from veralab.counting import build_meta_model, count_adapter
from veralab.fast import VeraModel, get_model

# PEFT 0.21 calls a transformers method that transformers 5 deprecates; nothing to act
# on here.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

# %% [markdown]
# ## 1. An embedding is a linear map of one-hot inputs
#
# Looking up token `id` in a table `E (num_embeddings, dim)` returns row `id`. Write the id as a one-hot
# vector `onehot(id)` of length `num_embeddings`: then the lookup is `onehot(id) E`, a linear layer with
# weight `W = Eᵀ` of shape `(out, in) = (dim, num_embeddings)` and no bias.

# %%
torch.manual_seed(0)
table = nn.Embedding(12, 5)  # E: 12 tokens of 5 numbers each
ids = torch.tensor([[3, 0, 7], [11, 3, 5]])  # (batch 2, 3 tokens)
one_hot = F.one_hot(ids, num_classes=12).float()  # (2, 3, 12)
W = table.weight.T  # (out, in) = (embedding_dim, num_embeddings) = (5, 12)
print("W (out, in):", tuple(W.shape))

# %%
# Exact, not approximate: each output adds one product 1·E[id, j] and zeros.
assert torch.equal(one_hot @ W.T, table(ids))

# %% [markdown]
# So VeRA adapts it as any linear layer (notebook 04): `in = num_embeddings`, `out = embedding_dim`,
#
# ```text
# A_s = vera_A[:, :num_embeddings]      (r, num)
# B_s = vera_B[:dim, :]                 (dim, r)
# y   = E[id] + λ_b ⊙ ((λ_d ⊙ A_s onehot(id)) B_sᵀ)
# ```
#
# and since the input is one-hot, `A_s onehot(id)` is column `id` of `A_s`: a *gather*, never a matmul.
# `ref.embedding_forward` (§7) computes exactly that; `ref.vera_forward` (§4) on the one-hot inputs must
# agree with it.

# %%
r = 4
vera_A, vera_B = ref.init_projections(r, max_in=12, max_out=5, prng_key=0)
lambda_d, lambda_b = torch.randn(r), torch.randn(5)  # non-zero: the adapter acts

as_linear = ref.vera_forward(one_hot, W, None, vera_A, vera_B, lambda_d, lambda_b)
as_lookup = ref.embedding_forward(ids, table.weight, vera_A, vera_B, lambda_d, lambda_b)
A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features=12, out_features=5)
gathered = A_s.T[ids]  # (2, 3, r): one column of A_s per token
print("max |lookup - linear map|:", (as_lookup - as_linear).abs().max().item())

# %%
assert torch.equal(gathered, one_hot @ A_s.T)  # the gather is the one-hot matmul
torch.testing.assert_close(as_lookup, as_linear)  # equal up to float32 rounding
assert (as_lookup - table(ids)).abs().max() > 0.1  # the adapter changes the lookups

# %% [markdown]
# Why the gather matters: the adapted table is `E + ΔWᵀ` with `ΔW = Λ_b B_s Λ_d A_s` (notebook 05).
# Building it costs `num · r · dim` multiply-adds and a second table in memory, on every training step
# (the λ vectors change). The gather costs `r · dim` per looked-up token. For a Llama-2 table (32,000 ×
# 4,096) at r = 256 and a batch of 8 × 512 tokens:

# %%
vocab, dim, rank, tokens = 32_000, 4_096, 256, 8 * 512
table_macs = vocab * rank * dim  # building ΔWᵀ once
gather_macs = tokens * rank * dim  # (λ_d ⊙ h) B_sᵀ per token; h is a gather
table_megabytes = vocab * dim * 4 / 1e6  # a float32 copy of the adapted table
print(f"build the table: {table_macs / 1e9:.1f} G MACs, {table_megabytes:.0f} MB")
print(f"gather per batch: {gather_macs / 1e9:.1f} G MACs, no table")

# %%
# The table costs vocab / tokens ≈ 7.8 times the gather, and grows with the vocabulary.
assert table_macs / gather_macs == vocab / tokens

# %% [markdown]
# ### `padding_idx`: the row that never moves
#
# `nn.Embedding(..., padding_idx=p)` keeps row `p` fixed: it receives no gradient. VeRA keeps it fixed
# too: the adapter term is zero wherever `id == p`, as if column `p` of `A_s` were zero, so the padding
# row's output stays `E[p]` and it sends no gradient to the λ vectors. `ref.VeraEmbedding` is the
# layer; `init_weights=False` draws random non-zero λ vectors, so every term is at work.

# %%
padded = nn.Embedding(12, 5, padding_idx=0)
projections = ref.SharedProjections(vera_A, vera_B)
layer = ref.VeraEmbedding(padded, projections, init_weights=False)
y = layer(ids)
print("ids:", ids.tolist())
print("padding positions:", (ids == 0).nonzero().tolist())

# %%
assert torch.equal(y[ids == 0], padded.weight[0].expand(int((ids == 0).sum()), 5))
assert (y[ids != 0] - padded(ids)[ids != 0]).abs().amax(-1).min() > 0  # other rows move
only_padding = torch.zeros(2, 4, dtype=torch.long)
layer(only_padding).sum().backward()
assert torch.count_nonzero(layer.vera_lambda_b.grad) == 0  # no gradient from padding
assert torch.count_nonzero(layer.vera_lambda_d.grad) == 0

# %% [markdown]
# Merging adds `ΔWᵀ` to the table once, for inference: lookups then cost exactly a plain embedding. The
# padding row is left alone, and unmerging subtracts the same numbers.

# %%
original_table = padded.weight.detach().clone()
with torch.no_grad():
    unmerged = layer(ids)
    layer.merge()
    merged = layer(ids)
    merged_table = padded.weight.detach().clone()
    layer.unmerge()
print("max |merged - unmerged| lookup:", (merged - unmerged).abs().max().item())

# %%
torch.testing.assert_close(merged, unmerged)
assert torch.equal(merged_table[0], original_table[0])  # the padding row is untouched
torch.testing.assert_close(padded.weight, original_table)  # unmerge restores the table

# %% [markdown]
# ## 2. A language model learns new tokens
#
# A common reason to adapt an embedding: new tokens. We take a small Llama (built from a config, random
# weights), add four tokens, and teach it what they mean with VeRA on `embed_tokens` alone.
#
# First, a trap. Many language models *tie* their input and output embeddings: `lm_head.weight` is the
# same tensor as `embed_tokens.weight`. VeRA's term changes the lookups only, while merging would write
# `ΔWᵀ` into the shared tensor and so change the output layer too: the merged model would not be the
# adapted one. veralab refuses such a target, before touching the model, and says what to do.

# %%
torch.manual_seed(0)
llama_config = LlamaConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)
lm = LlamaForCausalLM(llama_config)
refusal = None
try:
    get_model(lm, VeraConfig(r=64, target_modules=["embed_tokens"]))
except ValueError as error:
    refusal = str(error)
print(refusal)

# %%
assert refusal is not None and "tied input and output embeddings" in refusal
assert lm.lm_head.weight is lm.model.embed_tokens.weight  # the model was left as it was

# %% [markdown]
# The fix the message names: untie them, giving `lm_head` its own copy of the table (for a model you
# build yourself, `tie_word_embeddings=False` in its config does the same from the start). Then resize
# the vocabulary from 64 to 68 tokens; transformers initialises the new rows of both tables from the
# mean and covariance of the old ones.

# %%
lm.config.tie_word_embeddings = False
lm.lm_head.weight = nn.Parameter(lm.lm_head.weight.detach().clone())
lm.resize_token_embeddings(68)
new_tokens = torch.arange(64, 68)
print("embed_tokens:", lm.model.embed_tokens, " lm_head:", lm.lm_head)

# %%
assert lm.lm_head.weight is not lm.model.embed_tokens.weight
assert lm.model.embed_tokens.num_embeddings == 68 and lm.lm_head.out_features == 68

# %% [markdown]
# The task: each new token has a *meaning*, the old token that always follows it (`64 → 10`,
# `65 → 20`, `66 → 30`, `67 → 40`). Sequences are random old tokens with three new tokens placed in
# them, each followed by its meaning; the loss is on predicting the token after each new one. Only
# `embed_tokens` is adapted, at r = 64: λ_d (64) and λ_b (64), 128 trained numbers.

# %%
meaning = torch.tensor([10, 20, 30, 40])
positions = torch.tensor([2, 6, 9])  # where the new tokens go in a 12-token sequence


def new_token_batch(size, generator):
    input_ids = torch.randint(0, 64, (size, 12), generator=generator)
    which = torch.randint(0, 4, (size, len(positions)), generator=generator)
    input_ids[:, positions] = new_tokens[which]
    input_ids[:, positions + 1] = meaning[which]
    return input_ids


def follow_up(model, input_ids):
    """(loss, accuracy) of predicting the token after each new token."""
    logits = model(input_ids=input_ids).logits[:, positions]  # (batch, 3, vocab)
    targets = input_ids[:, positions + 1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, (logits.argmax(-1) == targets).float().mean().item()


base_lm = copy.deepcopy(lm)  # get_model adapts lm in place; keep the base for reloading
model = get_model(lm, VeraConfig(r=64, target_modules=["embed_tokens"]))
held_out = new_token_batch(64, torch.Generator().manual_seed(99))
with torch.no_grad():
    loss_before, accuracy_before = follow_up(model, held_out)
trained = [p for p in model.parameters() if p.requires_grad]
print("trained numbers:", sum(p.numel() for p in trained))
print(f"before: loss {loss_before.item():.2f}, accuracy {accuracy_before:.2f}")

# %%
assert sum(p.numel() for p in trained) == 64 + 64  # r + embedding_dim

# %%
optimizer = torch.optim.AdamW(trained, lr=5e-2)
generator = torch.Generator().manual_seed(1)
for _ in range(15):
    loss, _ = follow_up(model, new_token_batch(16, generator))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
with torch.no_grad():
    loss_after, accuracy_after = follow_up(model, held_out)
print(f"after 15 steps: loss {loss_after.item():.2f}, accuracy {accuracy_after:.2f}")

# %%
assert accuracy_before < 0.3 and accuracy_after > 0.9  # the new tokens mean something
assert loss_after < loss_before

# %% [markdown]
# 128 numbers taught the model four tokens well enough to pick the right follower every time, though
# not yet confidently (the loss is still high: the right token only just wins). Note what VeRA *can*
# move: every row of the table gets `λ_b ⊙ ((λ_d ⊙ A_s[:, id]) B_sᵀ)`, one linear map of the row's own
# random column `A_s[:, id]`, and that map, `r + dim` trained numbers, is shared by all rows. That was
# enough here, where the model only had to tell four tokens apart. It cannot give thousands of new
# tokens embeddings of their own; to do that, train those rows in full.
#
# The adapter saves and loads like any other. PEFT's VeRA, though, adapts only linear layers
# (`nn.Linear`, transformers' `Conv1D` and quantized linear layers): it refuses this directory with an
# error, while `save_as_lora` writes a standard LoRA adapter (PEFT's LoRA does adapt embeddings) with
# the same outputs.

# %%
sample = held_out[:4]
with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory)
    reloaded = VeraModel.from_pretrained(copy.deepcopy(base_lm), directory)
    peft_refusal = None
    try:
        peft.PeftModel.from_pretrained(copy.deepcopy(base_lm), directory)
    except (TypeError, ValueError) as error:
        peft_refusal = f"{type(error).__name__}: {error}"
    model.save_as_lora(directory + "/lora")
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base_lm), directory + "/lora")
    with torch.no_grad():
        ours = model(input_ids=sample).logits
        reloaded_logits = reloaded(input_ids=sample).logits
        lora_logits = lora(input_ids=sample).logits
print("PEFT's VeRA:", peft_refusal)
print("max |LoRA export - VeRA| logits:", (lora_logits - ours).abs().max().item())

# %%
assert torch.equal(reloaded_logits, ours)
assert peft_refusal is not None
assert "No layers types compatible with VeRA" in peft_refusal
torch.testing.assert_close(lora_logits, ours)

# %% [markdown]
# ## 3. A convolution's kernel is a matrix
#
# A convolution with `groups=1` applies, at every output position, the same linear map to the patch of
# input it sees. Flatten each patch into a vector of `in · ∏k` numbers (`F.unfold` does it for all
# positions at once) and the kernel `W (out, in, *k)` is the matrix `(out, in · ∏k)`:

# %%
torch.manual_seed(0)
conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
x = torch.randn(2, 3, 10, 10)
patches = F.unfold(x, kernel_size=3, padding=1)  # (N, in·k·k, positions)
W_conv = conv.weight.reshape(8, -1)  # (out, in·∏k) = (8, 27)
as_matmul = (W_conv @ patches + conv.bias[:, None]).reshape(2, 8, 10, 10)
print("patches:", tuple(patches.shape), " kernel as a matrix:", tuple(W_conv.shape))

# %%
torch.testing.assert_close(as_matmul, conv(x))
assert ref.conv_matrix_shape(conv) == (8, 27)  # (out_channels, in_channels · 3 · 3)

# %% [markdown]
# VeRA adapts that matrix (§8): `A_s = vera_A[:, :27]` is `r` rows of 27 numbers, i.e. `r` kernels of
# shape `(3, 3, 3)`: a convolution with `r` output channels and the layer's own stride, padding and
# dilation. `B_s = vera_B[:8, :]` maps `r` channels to 8 at each position: a 1×1 convolution.
#
# ```text
# h = conv(x, A_s as (r, in, *k))                         (N, r, *positions)
# y = conv(x, W) + b + λ_b ⊙ conv1x1(λ_d ⊙ h, B_s)        (N, out, *positions)
# ```
#
# Convolution is linear in its kernel, so this is `conv(x, W + ΔW)` with `ΔW = Λ_b B_s Λ_d A_s`
# reshaped to `(out, in, *k)`: merging adds one kernel.

# %%
r = 6
vera_A, vera_B = ref.init_projections(r, max_in=27, max_out=8, prng_key=0)
lambda_d, lambda_b = torch.randn(r), torch.randn(8)
A_s, B_s = ref.slice_projections(vera_A, vera_B, in_features=27, out_features=8)
kernel_A = A_s.reshape(r, 3, 3, 3)  # r random kernels
h = F.conv2d(x, kernel_A, padding=1)  # (2, r, 10, 10)
kernel_B = B_s.reshape(8, r, 1, 1)  # a 1×1 convolution from r channels to 8
u = F.conv2d(lambda_d.view(1, r, 1, 1) * h, kernel_B)
y = conv(x) + lambda_b.view(1, 8, 1, 1) * u
delta_kernel = ref.conv_delta_kernel(conv, vera_A, vera_B, lambda_d, lambda_b)
y_merged = F.conv2d(x, conv.weight + delta_kernel, conv.bias, padding=1)
print("h:", tuple(h.shape), " ΔW kernel:", tuple(delta_kernel.shape))

# %%
textbook = ref.conv_forward(x, conv, vera_A, vera_B, lambda_d, lambda_b)
torch.testing.assert_close(y, textbook)
torch.testing.assert_close(y_merged, y)  # one convolution with W + ΔW
# Every ΔW kernel is a mix of the same r random kernels: as a matrix, its rank is at
# most r.
assert torch.linalg.matrix_rank(delta_kernel.reshape(8, 27)) <= r

# %% [markdown]
# What that looks like: the top row shows the `r = 6` random kernels `A_s` (input channel 0 of each),
# the bottom row the first six kernels of `ΔW` (same channel). Each `ΔW` kernel `o` is
# `λ_b[o] Σ_k B_s[o, k] λ_d[k] A_s[k]`: the λ vectors choose how much of each random kernel to add;
# they cannot draw a kernel outside the span of `A_s`.

# %%
fig, axes = plt.subplots(2, 6, figsize=(9, 3.8))
for k in range(6):
    axes[0, k].imshow(kernel_A[k, 0], cmap="coolwarm")
    axes[0, k].set_title(f"A_s[{k}]", fontsize=9)
    axes[1, k].imshow(delta_kernel[k, 0], cmap="coolwarm")
    axes[1, k].set_title(f"ΔW[{k}]", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("r = 6 random 3×3 kernels (top), ΔW kernels mixed from them (bottom)")
fig.tight_layout()
plt.show()

# %% [markdown]
# A grouped convolution (`groups > 1`, e.g. depthwise) applies several separate kernels, not one matrix;
# it is refused with the reason and what to adapt instead.

# %%
try:
    ref.conv_matrix_shape(nn.Conv2d(4, 8, 3, groups=2))
    grouped_refusal = None
except ValueError as error:
    grouped_refusal = str(error)
print(grouped_refusal)

# %%
assert grouped_refusal is not None and "groups=2" in grouped_refusal

# %% [markdown]
# ## 4. A small CNN and a ViT with `veralab.fast`
#
# `get_model` adapts `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d` targets as it adapts linear layers, with
# the same API, files and guarantees. Here a small CNN with three convolutions and a linear head;
# `init_weights=False` gives random non-zero λ vectors (for training keep the default, λ_b = 0, so the
# adapter starts as the identity).


# %%
class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(images))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


torch.manual_seed(0)
convolutions = ["conv1", "conv2", "conv3"]
cnn_config = VeraConfig(r=32, target_modules=convolutions, init_weights=False)
cnn = get_model(SmallCNN(), cnn_config).eval()
for name, vera_layer in cnn.vera_layers():
    print(f"{name}: {type(vera_layer).__name__}, as a matrix (out, in) =",
          (vera_layer.out_features, vera_layer.in_features))  # fmt: skip
print("vera_A", tuple(cnn.vera_A.shape), " vera_B", tuple(cnn.vera_B.shape))

# %%
assert cnn.vera_A.shape == (32, 32 * 9)  # max_in: conv3's 32 channels × 3 × 3
assert cnn.vera_B.shape == (32, 32)  # max_out: 32 output channels

# %% [markdown]
# The fast layer computes what the textbook computes: `conv2` of the adapted model against
# `ref.conv_forward` with the same λ vectors and the model's shared pair.

# %%
images = torch.randn(4, 3, 16, 16)
conv2 = cnn.model.conv2
feature_map = torch.randn(4, 16, 16, 16)  # conv2's input
with torch.no_grad():
    fast_output = conv2(feature_map)
    textbook_output = ref.conv_forward(
        feature_map,
        conv2.base_layer,
        cnn.vera_A,
        cnn.vera_B,
        conv2.vera_lambda_d["default"],
        conv2.vera_lambda_b["default"],
    )

# %%
torch.testing.assert_close(fast_output, textbook_output)


# %% [markdown]
# Merging writes `W + ΔW` into every adapted kernel, after which the model costs exactly the base CNN;
# unmerging subtracts the same `ΔW`. The outputs agree, and the kernels come back, to float32
# rounding: merging and unmerging round once each, so an entry moves by at most `eps · (|W| + |ΔW|)`.


# %%
def merge_round_trip(model, run):
    """(unmerged output, merged output, max |restored - original| weight entry, the
    bound that drift must keep), where `run()` computes the model's output."""
    layers = dict(model.vera_layers())
    originals = {n: layer.get_base_weight().clone() for n, layer in layers.items()}
    deltas = {n: layer.delta_weight("default") for n, layer in layers.items()}
    with torch.no_grad():
        unmerged_output = run()
        model.merge_adapter()
        merged_output = run()
        model.unmerge_adapter()
    drift, bound = 0.0, 0.0
    for n, layer in layers.items():
        drift = max(drift, (layer.get_base_weight() - originals[n]).abs().max().item())
        # Merging rounds once, unmerging once: at most eps · (|W| + |ΔW|) an entry.
        scale = (originals[n].abs() + deltas[n].abs()).max().item()
        bound = max(bound, torch.finfo(torch.float32).eps * scale)
    return unmerged_output, merged_output, drift, bound


cnn_unmerged, cnn_merged, drift, bound = merge_round_trip(cnn, lambda: cnn(images))
difference = (cnn_merged - cnn_unmerged).abs().max().item()
print("max |merged - unmerged| logits:", difference)
print(f"max |restored - original| kernel entry: {drift:.1e} (bound {bound:.1e})")

# %%
torch.testing.assert_close(cnn_merged, cnn_unmerged)
assert drift <= bound

# %% [markdown]
# A ViT turns an image into tokens with one convolution: `patch_embeddings.projection`, a `Conv2d` whose
# kernel and stride are the patch size. As a matrix it is `(hidden, 3 · patch²)`. We adapt it together
# with the attention's `q_proj` and `v_proj` (transformers 5 names ViT's attention like Llama's).
#
# Note that `target_modules="all-linear"` keeps its PEFT meaning, every *linear* layer: it never picks
# the patch embedding. Convolutions and embeddings are adapted only when named.

# %%
torch.manual_seed(0)
vit_config = ViTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=5,
)
vit = ViTForImageClassification(vit_config).eval()
all_linear_count = count_adapter(vit, VeraConfig(target_modules="all-linear"), lora_r=8)
all_linear = [layer.name for layer in all_linear_count.layers]
vit_targets = ["projection", "q_proj", "v_proj"]
vit_vera_config = VeraConfig(r=64, target_modules=vit_targets, init_weights=False)
vera_vit = get_model(vit, vit_vera_config)
for name, vera_layer in vera_vit.vera_layers():
    print(f"{name}: {type(vera_layer).__name__}",
          (vera_layer.out_features, vera_layer.in_features))  # fmt: skip

# %%
assert not any("projection" in name for name in all_linear)  # linear layers only
patch = dict(vera_vit.vera_layers())["vit.embeddings.patch_embeddings.projection"]
assert (patch.out_features, patch.in_features) == (32, 3 * 8 * 8)
assert vera_vit.vera_A.shape == (64, 192)  # the patch embedding is the widest input

# %%
pixels = torch.randn(2, 3, 32, 32)
vit_unmerged, vit_merged, vit_drift, vit_bound = merge_round_trip(
    vera_vit, lambda: vera_vit(pixel_values=pixels).logits
)
with torch.no_grad(), vera_vit.disable_adapter():
    vit_base_logits = vera_vit(pixel_values=pixels).logits
effect = (vit_unmerged - vit_base_logits).abs().max().item()
difference = (vit_merged - vit_unmerged).abs().max().item()
print("adapter's effect on the logits:", effect)
print("max |merged - unmerged| logits:", difference)
print(f"max |restored - original| weight: {vit_drift:.1e} (bound {vit_bound:.1e})")

# %%
torch.testing.assert_close(vit_merged, vit_unmerged)
assert (vit_unmerged - vit_base_logits).abs().max() > 0.01  # the adapter does something
assert vit_drift <= vit_bound

# %% [markdown]
# ## 5. What each layer type costs
#
# Per adapted layer VeRA trains `r + out` numbers, LoRA `r · (in + out)` (notebook 01). For embeddings
# and convolutions `in` is large (`num_embeddings`; `in · ∏k`), which LoRA pays for and VeRA does not.
# `veralab.counting` counts both on models built on the meta device (shapes, no weights), here at real
# sizes: Llama-2-7B's `embed_tokens` and `q_proj`, ViT-base's patch embedding, and a ResNet-style 3×3
# convolution of 256 channels; VeRA at r = 256, LoRA at r = 8.

# %%
llama7b = build_meta_model(
    LlamaConfig(
        vocab_size=32_000,
        hidden_size=4_096,
        intermediate_size=11_008,
        num_hidden_layers=1,  # one block is enough: the counts are per layer
        num_attention_heads=32,
        tie_word_embeddings=False,
    )
)
vit_base = build_meta_model(ViTConfig(num_hidden_layers=1))  # 768 wide, 16×16 patches
with torch.device("meta"):
    resnet_block = nn.ModuleDict({"conv3x3": nn.Conv2d(256, 256, 3, padding=1)})
cases = [
    ("Llama-2-7B embed_tokens", llama7b, "embed_tokens"),
    ("Llama-2-7B q_proj", llama7b, "q_proj"),
    ("ViT-base patch projection", vit_base, "projection"),
    ("ResNet 3×3 conv, 256 ch.", resnet_block, "conv3x3"),
]
counts = {
    label: count_adapter(module, VeraConfig(r=256, target_modules=[target]), lora_r=8)
    for label, module, target in cases
}
header = ["layer", "(out, in)", "VeRA r=256", "LoRA r=8", "vera_A"]
print(f"{header[0]:27} {header[1]:>14} {header[2]:>11} {header[3]:>10} {header[4]:>12}")
for label, count in counts.items():
    (layer,) = count.layers
    shape = f"({layer.out_features}, {layer.in_features})"
    print(
        f"{label:27} {shape:>14} {count.vera_parameters:>11,d}"
        f" {count.lora_parameters:>10,d} {count.r * count.max_in:>12,d}"
    )

# %%
embedding = counts["Llama-2-7B embed_tokens"]
assert embedding.vera_parameters == 256 + 4_096
assert embedding.lora_parameters == 8 * (32_000 + 4_096)
assert counts["ResNet 3×3 conv, 256 ch."].layers[0].in_features == 256 * 9
assert counts["ViT-base patch projection"].layers[0].in_features == 3 * 16 * 16

# %%
labels = list(counts)
fig, (ax_trained, ax_frozen) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
rows = range(len(labels))
ax_trained.barh([i + 0.2 for i in rows], [counts[k].vera_parameters for k in labels],
                height=0.4, label="VeRA r=256", color="tab:green")  # fmt: skip
ax_trained.barh([i - 0.2 for i in rows], [counts[k].lora_parameters for k in labels],
                height=0.4, label="LoRA r=8", color="tab:red")  # fmt: skip
ax_trained.set_xscale("log")
ax_trained.set_yticks(list(rows), labels)
ax_trained.set_xlabel("trained numbers in the layer (log scale)")
ax_trained.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2)
frozen = [counts[k].r * counts[k].max_in for k in labels]
ax_frozen.barh(list(rows), [n / 1e6 for n in frozen], color="tab:gray")
ax_frozen.set_xlabel("frozen vera_A, millions of numbers (r × max_in)")
fig.suptitle("Per layer: what VeRA and LoRA train, and how wide the shared vera_A gets")
fig.tight_layout()
plt.show()

# %% [markdown]
# The left panel is the gain: LoRA on a 32,000-token embedding trains 288,768 numbers, VeRA 4,352 (66
# times fewer), against 15 times fewer on `q_proj`; on the convolutions VeRA trains 12 to 40 times
# fewer. The right panel is the price: `vera_A` is
# `r × max_in`, and an embedding's `in` is the vocabulary, so adapting `embed_tokens` makes the frozen
# pair 8.2 M numbers (33 MB in float32), 7.8 times what the linear layers need. It is never trained,
# and with `save_projection=False` it is not saved either (veralab regenerates it from
# `projection_prng_key` and checks its fingerprint), but it is in memory.

# %%
assert embedding.r * embedding.max_in == 256 * 32_000
q_proj = counts["Llama-2-7B q_proj"]
ratio = embedding.r * embedding.max_in / (q_proj.r * q_proj.max_in)
assert ratio == 32_000 / 4_096  # ≈ 7.8

# %% [markdown]
# ## Exercise: ΔW for a convolution's kernel
#
# A `Conv2d` kernel `(out, in, kh, kw)` is the matrix `(out, in · kh · kw)` applied to each
# flattened input patch, so VeRA adapts it as that matrix (section 3, and §8 of
# `veralab.reference`). Write `my_conv_delta_kernel(conv, vera_A, vera_B, lambda_d, lambda_b)`:
# the `ΔW` that merging adds to `conv.weight`, in the kernel's shape. The checker tries two convolutions with non-zero λ
# vectors.


# %% jupyter={"source_hidden": true}
# Worked solution: replace the body with your own and run the checker below.
def my_conv_delta_kernel(conv, vera_A, vera_B, lambda_d, lambda_b):
    out_features = conv.out_channels
    in_features = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    A_s, B_s = vera_A[:, :in_features], vera_B[:out_features, :]
    delta = (lambda_b[:, None] * B_s) @ (lambda_d[:, None] * A_s)  # (out, in·kh·kw)
    return delta.reshape(conv.weight.shape)


# %%
from veralab import exercises

feedback = exercises.check_conv_delta_kernel(my_conv_delta_kernel)
print(feedback)
assert feedback

# %% [markdown]
# ## Where next
#
# Every adapter so far shared one pair of projections with the other adapters of its model.
#
# **Next:** [11 · Adapter groups](11_adapter_groups.ipynb) lets adapters of different ranks,
# sizes and keys live in one model and serve one mixed batch. All the notebooks are listed,
# with a summary each, on the [Concepts](../docs/concepts.md) page.
