"""veralab.counting: target selection, the VeRA / LoRA formulas, and the VeRA paper's tables.

The formulas are proven against PEFT: on tiny real models, `get_nb_trainable_parameters()` of PEFT's VeRA
and LoRA models must equal what `veralab.counting` computes from layer shapes alone.
"""

import time

import pytest
import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from veralab.counting import (
    PAPER_TABLE,
    FusedTarget,
    LayerShape,
    adapted_layer_shapes,
    build_meta_model,
    lora_trainable_parameters,
    matches_printed,
    paper_table_rows,
    parse_printed_count,
    printed_resolution,
    vera_trainable_parameters,
)
from veralab.targets import weight_shape

# (VeRA count, LoRA count) for each paper row, worked out by hand from r + out and r * (in + out).
EXPECTED_COUNTS = {
    "RoBERTa-base": (43_008, 294_912),
    "RoBERTa-large": (61_440, 786_432),
    "GPT-2 medium": (98_304, 393_216),
    "GPT-2 large": (165_888, 737_280),
    "LLaMA 7B": (1_589_248, 159_907_840),
    "LLaMA 13B": (2_416_640, 250_347_520),
    "ViT-base": (24_576, 294_912),
    "ViT-large": (61_440, 786_432),
}
# The VeRA paper's GPT-2 LoRA figures come from the LoRA paper and are not reproduced by r * (in + out).
GPT2_ROWS = ["GPT-2 medium", "GPT-2 large"]
LORA_REPRODUCIBLE_ROWS = [label for label in EXPECTED_COUNTS if label not in GPT2_ROWS]

# Parameters of the released checkpoints' bare models (no task head), so the configs are the real ones.
RELEASED_MODEL_PARAMETERS = {
    "RoBERTa-base": 124_645_632,
    "RoBERTa-large": 355_359_744,
    "GPT-2 medium": 354_823_168,
    "GPT-2 large": 774_030_080,
    "LLaMA 7B": 6_607_343_616,  # 6,738,415,616 with the 32000 x 4096 lm_head
    "LLaMA 13B": 12_852_024_320,  # 13,015,864,320 with the 32000 x 5120 lm_head
    "ViT-base": 86_389_248,
    "ViT-large": 304_351_232,
}

PAPER_ROWS = {row.label: row for row in PAPER_TABLE}


def tiny_llama_config() -> LlamaConfig:
    # Grouped-query attention makes k_proj / v_proj narrower (8) than q_proj (16): layers of several shapes.
    return LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def tiny_gpt2_config() -> GPT2Config:
    # n_inner = 20 keeps the MLP's Conv1D layers non-square, so a transposed shape would show.
    return GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=12,
        n_layer=2,
        n_head=3,
        n_inner=20,
        bos_token_id=0,
        eos_token_id=0,
    )


def names(shapes: list[LayerShape]) -> list[str]:
    return [shape.name for shape in shapes]


@pytest.fixture(scope="module")
def paper_counts():
    return {count.label: count for count in paper_table_rows()}


@pytest.fixture(scope="module")
def meta_llama():
    return build_meta_model(tiny_llama_config(), AutoModelForCausalLM)


@pytest.fixture(scope="module")
def meta_gpt2():
    return build_meta_model(tiny_gpt2_config(), AutoModelForCausalLM)


# ---------------------------------------------------------------------------------------------------
# The VeRA paper's tables
# ---------------------------------------------------------------------------------------------------


def test_paper_table_has_every_row_of_the_paper():
    assert [row.label for row in PAPER_TABLE] == list(EXPECTED_COUNTS)


@pytest.mark.parametrize("label", list(EXPECTED_COUNTS))
def test_paper_vera_count_matches_printed_figure(paper_counts, label):
    count = paper_counts[label]
    assert count.vera_computed == EXPECTED_COUNTS[label][0]
    assert count.vera_matches
    assert matches_printed(count.vera_computed, PAPER_ROWS[label].paper_vera)


@pytest.mark.parametrize("label", LORA_REPRODUCIBLE_ROWS)
def test_paper_lora_count_matches_printed_figure(paper_counts, label):
    count = paper_counts[label]
    assert count.lora_computed == EXPECTED_COUNTS[label][1]
    assert count.lora_matches
    assert count.note == ""


@pytest.mark.parametrize("label", GPT2_ROWS)
def test_gpt2_lora_count_does_not_reproduce_printed_figure_and_says_so(paper_counts, label):
    count = paper_counts[label]
    assert count.lora_computed == EXPECTED_COUNTS[label][1]
    assert not count.lora_matches
    printed = count.paper_lora
    assert abs(count.lora_computed - parse_printed_count(printed)) > printed_resolution(printed) / 2
    assert printed in count.note and "does not reproduce" in count.note


@pytest.mark.parametrize("label", list(RELEASED_MODEL_PARAMETERS))
def test_paper_config_builds_the_released_model(label):
    model = build_meta_model(PAPER_ROWS[label].config)
    assert sum(parameter.numel() for parameter in model.parameters()) == RELEASED_MODEL_PARAMETERS[label]


def test_build_meta_model_allocates_no_weights_and_is_fast():
    config = PAPER_ROWS["LLaMA 13B"].config
    start = time.perf_counter()
    model = build_meta_model(config)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"building LLaMA 13B on meta took {elapsed:.2f} s"
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}


# ---------------------------------------------------------------------------------------------------
# Printed figures
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "printed, value, resolution",
    [
        ("0.043M", 43_000, 1_000),
        ("24.6K", 24_600, 100),
        ("159.9M", 159_900_000, 100_000),
        ("0.3M", 300_000, 100_000),
        ("43008", 43_008, 1),
        ("7B", 7_000_000_000, 1_000_000_000),
    ],
)
def test_parse_printed_count_reads_value_and_last_digit(printed, value, resolution):
    assert parse_printed_count(printed) == value
    assert printed_resolution(printed) == resolution


@pytest.mark.parametrize("count, matches", [(42_500, True), (42_499, False), (43_500, True), (43_501, False)])
def test_matches_printed_allows_half_a_unit_of_the_last_digit(count, matches):
    assert matches_printed(count, "0.043M") is matches


@pytest.mark.parametrize("printed", ["about 1M", "1.2.3M", "", "0.04 3M"])
def test_parse_printed_count_rejects_unreadable_figure(printed):
    with pytest.raises(ValueError, match="cannot read the printed count"):
        parse_printed_count(printed)


# ---------------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------------


def test_formulas_on_hand_written_shapes():
    shapes = [LayerShape("a", 7, 5), LayerShape("b", 3, 11)]  # (name, out, in)
    assert vera_trainable_parameters(shapes, r=2) == (2 + 7) + (2 + 3)
    assert lora_trainable_parameters(shapes, r=2) == 2 * (5 + 7) + 2 * (11 + 3)


@pytest.mark.parametrize("r", [0, -4, 2.5])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(ValueError, match="positive integer"):
        vera_trainable_parameters([LayerShape("a", 7, 5)], r)


# ---------------------------------------------------------------------------------------------------
# Target selection
# ---------------------------------------------------------------------------------------------------


def test_list_target_matches_full_name_or_dotted_suffix(meta_llama):
    both_layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert names(adapted_layer_shapes(meta_llama, ["q_proj"])) == both_layers
    assert names(adapted_layer_shapes(meta_llama, ["self_attn.q_proj"])) == both_layers
    assert names(adapted_layer_shapes(meta_llama, ["model.layers.0.self_attn.q_proj"])) == both_layers[:1]


def test_list_target_does_not_match_part_of_a_name(meta_llama):
    with pytest.raises(ValueError, match=r"\['proj'\]"):
        adapted_layer_shapes(meta_llama, ["proj"])


def test_unmatched_list_target_raises_naming_it(meta_llama):
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module of LlamaForCausalLM"):
        adapted_layer_shapes(meta_llama, ["q_proj", "qproj"])


def test_string_target_is_a_regex_over_the_full_name(meta_llama):
    shapes = adapted_layer_shapes(meta_llama, r".*\.(q|v)_proj")
    assert names(shapes) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    with pytest.raises(ValueError, match="target_modules='q_proj' matches no module"):
        adapted_layer_shapes(meta_llama, "q_proj")  # a regex must match the whole name


def test_target_matching_a_non_linear_module_raises(meta_llama):
    with pytest.raises(ValueError, match="is a LlamaAttention, which VeRA cannot adapt"):
        adapted_layer_shapes(meta_llama, r"model\.layers\.0\.self_attn")


@pytest.mark.parametrize("spelling", ["all-linear", "ALL-LINEAR"])
def test_all_linear_excludes_the_output_head_of_llama(meta_llama, spelling):
    assert isinstance(meta_llama.lm_head, nn.Linear)
    shapes = adapted_layer_shapes(meta_llama, spelling)
    assert "lm_head" not in names(shapes)
    assert len(shapes) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers


def test_all_linear_excludes_the_output_head_of_gpt2(meta_gpt2):
    assert isinstance(meta_gpt2.lm_head, nn.Linear)
    shapes = adapted_layer_shapes(meta_gpt2, "all-linear")
    assert "lm_head" not in names(shapes)
    assert len(shapes) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 layers


def test_conv1d_shapes_are_out_by_in(meta_gpt2):
    shapes = adapted_layer_shapes(
        meta_gpt2, ["transformer.h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc"]
    )
    shapes += adapted_layer_shapes(meta_gpt2, ["h.0.mlp.c_proj"])
    assert [(out_features, in_features) for _, out_features, in_features in shapes] == [
        (36, 12),  # c_attn: q, k, v of width 12 each
        (12, 12),
        (20, 12),  # c_fc: n_embd -> n_inner
        (12, 20),  # mlp.c_proj: n_inner -> n_embd
    ]


def test_weight_shape_reads_linear_and_conv1d_the_same_way():
    assert weight_shape(nn.Linear(in_features=3, out_features=5)) == (5, 3)
    assert weight_shape(Conv1D(nf=5, nx=3)) == (5, 3)  # its weight is stored (in, out) = (3, 5)


# ---------------------------------------------------------------------------------------------------
# Fused projections
# ---------------------------------------------------------------------------------------------------


def test_fused_target_counts_each_adapted_block_as_a_layer(meta_gpt2):
    shapes = adapted_layer_shapes(meta_gpt2, [FusedTarget("c_attn", blocks=("q", "v")), "c_fc"])
    assert shapes[:3] == [
        LayerShape("transformer.h.0.attn.c_attn[q]", 12, 12),  # out = 36 / 3
        LayerShape("transformer.h.0.attn.c_attn[v]", 12, 12),
        LayerShape("transformer.h.0.mlp.c_fc", 20, 12),
    ]
    assert len(shapes) == 3 * 2
    qv_only = adapted_layer_shapes(meta_gpt2, [FusedTarget("c_attn", blocks=("q", "v"))])
    assert vera_trainable_parameters(qv_only, r=4) == 2 * 2 * (4 + 12)
    assert lora_trainable_parameters(qv_only, r=3) == 2 * 2 * 3 * (12 + 12)


@pytest.mark.parametrize("blocks", [(), ("q", "x"), ("q", "q")])
def test_fused_target_needs_distinct_known_blocks(blocks):
    with pytest.raises(ValueError, match="distinct blocks"):
        FusedTarget("c_attn", blocks=blocks)


def test_fused_target_on_a_layer_that_does_not_split_equally_raises(meta_llama):
    with pytest.raises(ValueError, match="out_features=16, which does not split into 3 equal blocks"):
        adapted_layer_shapes(meta_llama, [FusedTarget("q_proj", blocks=("q",))])


def test_module_matched_by_plain_and_fused_target_raises(meta_gpt2):
    with pytest.raises(ValueError, match="matched by several targets"):
        adapted_layer_shapes(meta_gpt2, ["c_attn", FusedTarget("c_attn", blocks=("q", "v"))])


# ---------------------------------------------------------------------------------------------------
# The formulas against PEFT's real adapted models
# ---------------------------------------------------------------------------------------------------


def tiny_llama() -> nn.Module:
    return LlamaForCausalLM(tiny_llama_config())


def tiny_gpt2() -> nn.Module:
    return GPT2LMHeadModel(tiny_gpt2_config())


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "make_model, target_modules",
    [
        (tiny_llama, ["q_proj", "v_proj"]),
        (tiny_llama, ["k_proj", "o_proj", "down_proj"]),
        (tiny_llama, r".*\.mlp\.(gate|up)_proj"),
        (tiny_llama, "all-linear"),
        (tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"]),
        (tiny_gpt2, "all-linear"),
    ],
)
def test_counts_equal_peft_trainable_parameters(make_model, target_modules):
    torch.manual_seed(0)
    model = make_model()
    shapes = adapted_layer_shapes(model, target_modules)
    fan_in_fan_out = make_model is tiny_gpt2  # GPT-2's Conv1D stores its weight (in, out)

    vera = get_peft_model(
        make_model(), VeraConfig(r=4, target_modules=target_modules, fan_in_fan_out=fan_in_fan_out)
    )
    assert set(vera.targeted_module_names) == set(names(shapes))
    assert vera.get_nb_trainable_parameters()[0] == vera_trainable_parameters(shapes, r=4)

    lora = get_peft_model(
        make_model(), LoraConfig(r=3, target_modules=target_modules, fan_in_fan_out=fan_in_fan_out)
    )
    assert lora.get_nb_trainable_parameters()[0] == lora_trainable_parameters(shapes, r=3)
