r"""Trainable-parameter arithmetic: VeRA against LoRA, from configs alone.

Kopiczko, Blankevoort, Asano. "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024.
https://arxiv.org/abs/2310.11454
Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
https://arxiv.org/abs/2106.09685

For one adapted layer with a frozen weight W (out x in):

    LoRA trains B (out x r) and A (r x in):            r * (in + out) numbers
    VeRA trains λ_d (r) and λ_b (out); A, B are frozen: r + out        numbers

so a count needs only the (out, in) shape of every adapted layer. This module finds those shapes in a
transformers model built on the meta device (no weights are allocated, so even a 13B model builds in a
fraction of a second), selects the layers with PEFT's `target_modules` rules, and reproduces the VeRA
paper's tables of trainable parameters (`PAPER_TABLE`, `paper_table_rows`):

    model = build_meta_model(LlamaConfig(...))
    shapes = adapted_layer_shapes(model, ["q_proj", "v_proj"])
    vera_trainable_parameters(shapes, r=1024), lora_trainable_parameters(shapes, r=64)

GPT-2 computes q, k and v with one fused `c_attn` layer, and the papers adapt only its q and v blocks:
`FusedTarget("c_attn", blocks=("q", "v"))` counts each adapted block as a layer of shape (out / 3, in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModel, GPT2Config, LlamaConfig, PretrainedConfig, RobertaConfig, ViTConfig
from transformers.pytorch_utils import Conv1D

from veralab.reference import lora_trainable_per_layer, vera_trainable_per_layer
from veralab.targets import ALL_LINEAR, name_matches_entry, weight_shape

# ---------------------------------------------------------------------------------------------------
# Building a model without weights
# ---------------------------------------------------------------------------------------------------


def build_meta_model(config: PretrainedConfig, auto_class: type = AutoModel) -> nn.Module:
    """Build a transformers model from a config on the meta device: every shape, no memory.

    Args:
        config: the model's configuration, e.g. `LlamaConfig(hidden_size=4096, ...)`.
        auto_class: the transformers auto class that picks the architecture; `AutoModel` gives the bare
            model (no task head), `AutoModelForCausalLM` adds the language-model head.
    """
    with torch.device("meta"):
        return auto_class.from_config(config)


# ---------------------------------------------------------------------------------------------------
# Which layers are adapted, and their (out, in) shapes
# ---------------------------------------------------------------------------------------------------


class LayerShape(NamedTuple):
    """One adapted layer: its name and the (out_features, in_features) shape of its weight."""

    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class FusedTarget:
    """A fused projection (one layer computing several equal blocks) of which only some blocks are adapted.

    Each adapted block counts as a layer of its own, of shape (out / len(split_into), in), and is named
    `"<module name>[<block>]"`, e.g. `h.0.attn.c_attn[q]`. This is how the LoRA paper adapts GPT-2's
    `c_attn` (loralib's `MergedLinear` with `enable_lora=[True, False, True]`).

    Args:
        name: matched like a name in a `target_modules` list: the module's full name, or its last
            dot-separated parts.
        blocks: the blocks to adapt, e.g. `("q", "v")`.
        split_into: all blocks of the fused output, in order; the output is split into equal parts.
    """

    name: str
    blocks: tuple[str, ...]
    split_into: tuple[str, ...] = ("q", "k", "v")

    def __post_init__(self) -> None:
        unknown = [block for block in self.blocks if block not in self.split_into]
        if not self.blocks or unknown or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(
                f"FusedTarget({self.name!r}) got blocks={self.blocks!r}; pass one or more distinct blocks "
                f"out of split_into={self.split_into!r}"
            )


Target = str | FusedTarget


def is_adaptable(module: nn.Module) -> bool:
    """True for the layer types VeRA and LoRA adapt here: nn.Linear and transformers' Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def output_head_name(model: nn.Module) -> str | None:
    """The name of the module `model.get_output_embeddings()` returns (e.g. `lm_head`), if there is one."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if get_output_embeddings is not None else None
    if head is None:
        return None
    return next(name for name, module in model.named_modules() if module is head)


def _all_linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear / Conv1D except the output head, as PEFT resolves `"all-linear"`."""
    head = output_head_name(model)
    return [(name, module) for name, module in model.named_modules() if is_adaptable(module) and name != head]


def _layers_matching_regex(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """Every module whose full name the regex matches entirely (PEFT's rule for a string target)."""
    return [(name, module) for name, module in model.named_modules() if re.fullmatch(pattern, name)]


def _layers_matching_names(
    model: nn.Module, targets: Sequence[Target]
) -> list[tuple[str, nn.Module, Target]]:
    """Every module a name in `targets` matches, with the target that matched it.

    Stricter than PEFT on purpose: a count that silently skips a misspelt target is wrong, so every
    target must match at least one module.
    """
    matches, unmatched = [], set(targets)
    for name, module in model.named_modules():
        hits = [target for target in targets if name_matches_entry(name, _target_name(target))]
        if not hits:
            continue
        unmatched.difference_update(hits)
        if len(set(hits)) > 1 and any(isinstance(target, FusedTarget) for target in hits):
            raise ValueError(f"module {name!r} is matched by several targets {hits!r}; keep one of them")
        matches.append((name, module, hits[0]))
    if unmatched:
        missing = [target for target in targets if target in unmatched]
        raise ValueError(
            f"target_modules {missing!r} matched no module of {type(model).__name__}; a name must equal a "
            f"module's full name or its last dot-separated parts (adaptable layers: {_some_layer_names(model)})"
        )
    return matches


def _target_name(target: Target) -> str:
    return target.name if isinstance(target, FusedTarget) else target


def _some_layer_names(model: nn.Module, limit: int = 8) -> str:
    """A short list of the model's Linear / Conv1D names, for error messages."""
    names = [name for name, module in model.named_modules() if is_adaptable(module)]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _fused_block_shapes(name: str, module: nn.Module, target: FusedTarget) -> list[LayerShape]:
    """One (out / n_blocks, in) shape per adapted block of a fused layer."""
    out_features, in_features = weight_shape(module)
    n_blocks = len(target.split_into)
    if out_features % n_blocks:
        raise ValueError(
            f"{name!r} has out_features={out_features}, which does not split into {n_blocks} equal blocks "
            f"{target.split_into!r}; check FusedTarget.split_into"
        )
    block_out = out_features // n_blocks
    return [LayerShape(f"{name}[{block}]", block_out, in_features) for block in target.blocks]


def _check_adaptable(name: str, module: nn.Module, target_modules: str | Sequence[Target]) -> None:
    if not is_adaptable(module):
        raise ValueError(
            f"target_modules={target_modules!r} matches {name!r}, a {type(module).__name__}; only nn.Linear and "
            f"transformers Conv1D layers can be adapted, so narrow the targets to those layers"
        )


def _layers_matching_string(model: nn.Module, target: str) -> list[tuple[str, nn.Module, str]]:
    """The modules a string target selects: `"all-linear"`, or else a regex over full module names."""
    if target.lower() == ALL_LINEAR:
        layers = _all_linear_layers(model)
    else:
        layers = _layers_matching_regex(model, target)
    if not layers:
        raise ValueError(
            f"target_modules={target!r} matched no module of {type(model).__name__}; a string is a regex that "
            f"must match a full module name (adaptable layers: {_some_layer_names(model)})"
        )
    return [(name, module, target) for name, module in layers]


def adapted_layer_shapes(model: nn.Module, target_modules: str | Sequence[Target]) -> list[LayerShape]:
    """The (name, out_features, in_features) of every layer the targets select, in module order.

    Selection follows PEFT's `target_modules`:
      - a list (or tuple) of names selects each module whose full name equals a name or ends with
        "." + name; a `FusedTarget` in the list selects some blocks of a fused layer instead;
      - a string is a regular expression that must match a module's full name entirely;
      - `"all-linear"` selects every nn.Linear / Conv1D except the output head (`get_output_embeddings()`).

    Args:
        model: any module, typically from `build_meta_model`.
        target_modules: the targets, as above.

    Raises:
        ValueError: when nothing matches (or, for a list, when one name matches nothing), when a target
            matches a module that is neither nn.Linear nor Conv1D, or when a fused layer does not split
            into equal blocks.
    """
    if isinstance(target_modules, str):
        selected = _layers_matching_string(model, target_modules)
    else:
        selected = _layers_matching_names(model, list(target_modules))

    shapes = []
    for name, module, target in selected:
        _check_adaptable(name, module, target_modules)
        if isinstance(target, FusedTarget):
            shapes.extend(_fused_block_shapes(name, module, target))
        else:
            shapes.append(LayerShape(name, *weight_shape(module)))
    return shapes


# ---------------------------------------------------------------------------------------------------
# The counts
# ---------------------------------------------------------------------------------------------------


def _check_rank(r: int) -> None:
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"the rank r must be a positive integer, got {r!r}")


def vera_trainable_parameters(shapes: Iterable[tuple[str, int, int]], r: int) -> int:
    """Σ (r + out) over the adapted layers: λ_d (r) and λ_b (out) per layer; A and B are frozen and shared."""
    _check_rank(r)
    return sum(vera_trainable_per_layer(out_features, r) for _, out_features, _ in shapes)


def lora_trainable_parameters(shapes: Iterable[tuple[str, int, int]], r: int) -> int:
    """Σ r (in + out) over the adapted layers: A (r x in) and B (out x r) per layer."""
    _check_rank(r)
    return sum(
        lora_trainable_per_layer(in_features, out_features, r) for _, out_features, in_features in shapes
    )


# ---------------------------------------------------------------------------------------------------
# Figures as papers print them ("0.043M", "24.6K")
# ---------------------------------------------------------------------------------------------------

_SUFFIX_MULTIPLIER = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def _printed_value_and_unit(printed: str) -> tuple[Decimal, Decimal]:
    """("0.043M") -> (43000, 1000): the value and one unit of its last printed digit, both exact."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", printed.upper())
    if match is None:
        raise ValueError(
            f"cannot read the printed count {printed!r}; expected a number with an optional K, M or B suffix, "
            f"e.g. '0.043M' or '24.6K'"
        )
    number, multiplier = Decimal(match[1]), _SUFFIX_MULTIPLIER[match[2]]
    # Decimal keeps the printed digits: Decimal("0.043") has exponent -3, so its last digit is worth 1e-3.
    last_digit_unit = Decimal(1).scaleb(number.as_tuple().exponent)
    return number * multiplier, last_digit_unit * multiplier


def parse_printed_count(printed: str) -> float:
    """The number a printed figure stands for: "0.043M" -> 43000.0, "24.6K" -> 24600.0."""
    value, _ = _printed_value_and_unit(printed)
    return float(value)


def printed_resolution(printed: str) -> float:
    """One unit of the figure's last printed digit, in parameters: "0.043M" -> 1000.0, "24.6K" -> 100.0."""
    _, unit = _printed_value_and_unit(printed)
    return float(unit)


def matches_printed(count: int, printed: str) -> bool:
    """True when `count` rounds to the printed figure: within half a unit of its last printed digit."""
    value, unit = _printed_value_and_unit(printed)
    return abs(Decimal(count) - value) <= unit / 2


# ---------------------------------------------------------------------------------------------------
# The VeRA paper's tables of trainable parameters
# ---------------------------------------------------------------------------------------------------
# The configs carry the released models' hyperparameters (roberta-base/-large, gpt2-medium/-large,
# LLaMA 7B/13B, google/vit-base/-large-patch16-224); only the shapes of the adapted layers matter for
# the counts, the rest is there so each config describes the real model.


def _roberta_config(hidden_size: int, num_hidden_layers: int, num_attention_heads: int) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=50265,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=514,  # 512 positions + RoBERTa's offset of padding_idx + 1
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _gpt2_config(n_embd: int, n_layer: int, n_head: int) -> GPT2Config:
    return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head)


def _llama_config(
    hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int
) -> LlamaConfig:
    # LLaMA (1); Llama 2 of the same size has the same layer shapes, hence the same counts.
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def _vit_config(hidden_size: int, num_hidden_layers: int, num_attention_heads: int) -> ViTConfig:
    return ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        image_size=224,
        patch_size=16,
        qkv_bias=True,
    )


# The paper's query and value layers. Recent transformers (5.23 here) name ViT's q_proj / v_proj; 4.x named
# them attention.attention.query / .value, so on 4.x this row fails loudly instead of counting wrong.
VIT_QUERY_VALUE = ("q_proj", "v_proj")
LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The VeRA paper copies its GPT-2 LoRA figures from the LoRA paper (Hu et al., Table 3); they are kept as
# printed, and the arithmetic is not bent to meet them.
_GPT2_LORA_NOTE = (
    "The paper prints {printed} for LoRA r=4, the LoRA paper's figure; r*(in+out) over the q and v blocks "
    "of c_attn does not reproduce it (see lora_computed)."
)


@dataclass(frozen=True)
class PaperRow:
    """One model of the VeRA paper's trainable-parameter tables, with the figures as the paper printed them.

    Args:
        label: the model, e.g. "RoBERTa-base".
        benchmark: the task the row comes from, e.g. "GLUE".
        config: a transformers config with the real model's hyperparameters.
        target_modules: the layers the paper adapts, in `adapted_layer_shapes` form.
        vera_r: VeRA's rank (the number of rows of the shared A).
        lora_r: the rank of the LoRA baseline.
        paper_vera: VeRA's trainable parameters as printed, e.g. "0.043M".
        paper_lora: LoRA's trainable parameters as printed.
        note: where a printed figure is not reproduced by the arithmetic, why.
    """

    label: str
    benchmark: str
    config: PretrainedConfig
    target_modules: str | tuple[Target, ...]
    vera_r: int
    lora_r: int
    paper_vera: str
    paper_lora: str
    note: str = ""


PAPER_TABLE: tuple[PaperRow, ...] = (
    PaperRow(
        label="RoBERTa-base",
        benchmark="GLUE",
        config=_roberta_config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
        target_modules=("query", "value"),
        vera_r=1024,
        lora_r=8,
        paper_vera="0.043M",
        paper_lora="0.3M",
    ),
    PaperRow(
        label="RoBERTa-large",
        benchmark="GLUE",
        config=_roberta_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
        target_modules=("query", "value"),
        vera_r=256,
        lora_r=8,
        paper_vera="0.061M",
        paper_lora="0.8M",
    ),
    PaperRow(
        label="GPT-2 medium",
        benchmark="E2E",
        config=_gpt2_config(n_embd=1024, n_layer=24, n_head=16),
        target_modules=(FusedTarget("c_attn", blocks=("q", "v")),),
        vera_r=1024,
        lora_r=4,
        paper_vera="0.098M",
        paper_lora="0.35M",
        note=_GPT2_LORA_NOTE.format(printed="0.35M"),
    ),
    PaperRow(
        label="GPT-2 large",
        benchmark="E2E",
        config=_gpt2_config(n_embd=1280, n_layer=36, n_head=20),
        target_modules=(FusedTarget("c_attn", blocks=("q", "v")),),
        vera_r=1024,
        lora_r=4,
        paper_vera="0.17M",
        paper_lora="0.77M",
        note=_GPT2_LORA_NOTE.format(printed="0.77M"),
    ),
    PaperRow(
        label="LLaMA 7B",
        benchmark="instruction tuning",
        config=_llama_config(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
        ),
        target_modules=LLAMA_LINEAR_LAYERS,
        vera_r=1024,
        lora_r=64,
        paper_vera="1.6M",
        paper_lora="159.9M",
    ),
    PaperRow(
        label="LLaMA 13B",
        benchmark="instruction tuning",
        config=_llama_config(
            hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
        ),
        target_modules=LLAMA_LINEAR_LAYERS,
        vera_r=1024,
        lora_r=64,
        paper_vera="2.4M",
        paper_lora="250.3M",
    ),
    PaperRow(
        label="ViT-base",
        benchmark="image classification",
        config=_vit_config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
        target_modules=VIT_QUERY_VALUE,
        vera_r=256,
        lora_r=8,
        paper_vera="24.6K",
        paper_lora="294.9K",
    ),
    PaperRow(
        label="ViT-large",
        benchmark="image classification",
        config=_vit_config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
        target_modules=VIT_QUERY_VALUE,
        vera_r=256,
        lora_r=8,
        paper_vera="61.4K",
        paper_lora="786.4K",
    ),
)


@dataclass(frozen=True)
class PaperRowCount:
    """A paper row counted: computed values next to the printed ones (a list of these makes a DataFrame)."""

    label: str
    benchmark: str
    adapted_layers: int
    vera_r: int
    vera_computed: int
    paper_vera: str
    vera_matches: bool
    lora_r: int
    lora_computed: int
    paper_lora: str
    lora_matches: bool
    note: str


def count_paper_row(row: PaperRow) -> PaperRowCount:
    """Build the row's model on the meta device and count VeRA and LoRA for its targets."""
    shapes = adapted_layer_shapes(build_meta_model(row.config), row.target_modules)
    vera = vera_trainable_parameters(shapes, row.vera_r)
    lora = lora_trainable_parameters(shapes, row.lora_r)
    return PaperRowCount(
        label=row.label,
        benchmark=row.benchmark,
        adapted_layers=len(shapes),
        vera_r=row.vera_r,
        vera_computed=vera,
        paper_vera=row.paper_vera,
        vera_matches=matches_printed(vera, row.paper_vera),
        lora_r=row.lora_r,
        lora_computed=lora,
        paper_lora=row.paper_lora,
        lora_matches=matches_printed(lora, row.paper_lora),
        note=row.note,
    )


def paper_table_rows(rows: Iterable[PaperRow] = PAPER_TABLE) -> list[PaperRowCount]:
    """Every paper row counted, in table order (`pandas.DataFrame(paper_table_rows())` makes it a table)."""
    return [count_paper_row(row) for row in rows]
