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
fraction of a second), selects the layers with `veralab.targets.select_targets` (the selector `get_model`
uses, so a count is of exactly the layers an adapter would train), and reproduces the VeRA paper's tables of
trainable parameters (`PAPER_TABLE`, `paper_table_rows`):

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
import transformers
from torch import nn
from transformers import AutoModel, GPT2Config, LlamaConfig, PretrainedConfig, RobertaConfig, ViTConfig

from veralab.config import VeraConfig
from veralab.reference import lora_trainable_per_layer, vera_trainable_per_layer
from veralab.targets import name_matches_entry, select_targets

# ---------------------------------------------------------------------------------------------------
# Building a model without weights
# ---------------------------------------------------------------------------------------------------


def build_meta_model(config: PretrainedConfig, auto_class: type = AutoModel) -> nn.Module:
    """Build a transformers model from a config on the meta device: every shape, no memory.

    Args:
        config: the model's configuration, e.g. `LlamaConfig(hidden_size=4096, ...)`.
        auto_class: the class that builds it: a transformers auto class (`AutoModel` gives the bare model,
            no task head; `AutoModelForCausalLM` adds the language-model head) or a model class such as
            `architecture_class(config)`.
    """
    with torch.device("meta"):
        if hasattr(auto_class, "from_config"):
            return auto_class.from_config(config)
        return auto_class(config)


def architecture_class(config: PretrainedConfig) -> type:
    """The model class `config.architectures` names (e.g. `LlamaForCausalLM`, with its head), as
    `from_pretrained` would build it; `AutoModel` (the bare model) when the config names none transformers
    has."""
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if isinstance(model_class, type):
            return model_class
    return AutoModel


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


def _fused_block_shapes(
    name: str, out_features: int, in_features: int, target: FusedTarget
) -> list[LayerShape]:
    """One (out / n_blocks, in) shape per adapted block of a fused layer."""
    n_blocks = len(target.split_into)
    if out_features % n_blocks:
        raise ValueError(
            f"{name!r} has out_features={out_features}, which does not split into {n_blocks} equal blocks "
            f"{target.split_into!r}; check FusedTarget.split_into"
        )
    block_out = out_features // n_blocks
    return [LayerShape(f"{name}[{block}]", block_out, in_features) for block in target.blocks]


def adapted_layer_shapes(
    model: nn.Module,
    target_modules: str | Sequence[Target] | None,
    layers_to_transform: list[int] | int | None = None,
    layers_pattern: list[str] | str | None = None,
) -> list[LayerShape]:
    """The (name, out_features, in_features) of every layer the targets select, in module order.

    The layers are those `veralab.targets.select_targets` selects for a `VeraConfig` with the same
    `target_modules`, `layers_to_transform` and `layers_pattern`: the layers `get_model` adapts. In a list,
    a `FusedTarget` selects some blocks of a fused layer instead of the whole layer.

    Args:
        model: any module, typically from `build_meta_model`.
        target_modules: names, a regex, `"all-linear"`, or None for the model type's defaults.
        layers_to_transform: only the layers under these indices of the layer list.
        layers_pattern: the name of the layer list (e.g. "layers", "h").

    Raises:
        ValueError: the selector's errors (a target matching nothing, a module VeRA cannot adapt, ...), a
            module matched by both a name and a FusedTarget, or a fused layer that does not split into equal
            blocks.
    """
    plain: list[str] | str | None = target_modules
    fused: dict[str, FusedTarget] = {}
    if target_modules is not None and not isinstance(target_modules, str):
        plain = [target for target in target_modules if isinstance(target, str)]
        fused = {target.name: target for target in target_modules if isinstance(target, FusedTarget)}
    names = plain if not fused else [*plain, *fused]
    config = VeraConfig(
        target_modules=names, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern
    )
    shapes = []
    for target in select_targets(model, config):
        fused_hits = [f for name, f in fused.items() if name_matches_entry(target.name, name)]
        if not fused_hits:
            shapes.append(LayerShape(target.name, target.out_features, target.in_features))
            continue
        plain_hits = [entry for entry in plain if name_matches_entry(target.name, entry)]
        if plain_hits or len(fused_hits) > 1:
            raise ValueError(
                f"module {target.name!r} is matched by several targets {plain_hits + fused_hits!r}; keep one "
                "of them"
            )
        shapes.extend(
            _fused_block_shapes(target.name, target.out_features, target.in_features, fused_hits[0])
        )
    return shapes


# ---------------------------------------------------------------------------------------------------
# The counts
# ---------------------------------------------------------------------------------------------------


def _check_rank(r: int) -> None:
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"the rank r must be a positive integer, got {r!r}")


@dataclass(frozen=True)
class AdapterCount:
    """VeRA's and LoRA's trainable parameters on the layers an adapter's config selects.

    Args:
        layers: the adapted layers, in module order (the layers `get_model` adapts).
        r: VeRA's rank.
        lora_r: the rank of the LoRA compared with.
        vera_parameters: VeRA's trainable parameters, Σ (r + out).
        lora_parameters: LoRA's, Σ lora_r (in + out).
        max_in: columns of the shared vera_A (r x max_in).
        max_out: rows of the shared vera_B (max_out x r).
    """

    layers: list[LayerShape]
    r: int
    lora_r: int
    vera_parameters: int
    lora_parameters: int
    max_in: int
    max_out: int


def count_adapter(model: nn.Module, config: VeraConfig, lora_r: int) -> AdapterCount:
    """Count an adapter with `config` on `model` (real or meta) against a LoRA of rank `lora_r` on the same
    layers; `veralab count` prints this."""
    layers = [
        LayerShape(target.name, target.out_features, target.in_features)
        for target in select_targets(model, config)
    ]
    return AdapterCount(
        layers=layers,
        r=config.r,
        lora_r=lora_r,
        vera_parameters=vera_trainable_parameters(layers, config.r),
        lora_parameters=lora_trainable_parameters(layers, lora_r),
        max_in=max(layer.in_features for layer in layers),
        max_out=max(layer.out_features for layer in layers),
    )


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
            f"cannot read the printed count {printed!r}; expected a number with an optional K, M or B "
            "suffix, e.g. '0.043M' or '24.6K'"
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
    "The paper prints {printed} for LoRA r=4, the LoRA paper's figure; r*(in+out) over the q and v blocks of "
    "c_attn does not reproduce it (see lora_computed)."
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
