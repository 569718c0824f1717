"""One selector: `veralab count` (veralab.counting) and `get_model` adapt exactly the same layers.

Every model type with default targets that transformers knows is built on the meta device (two layers deep,
so the check stays fast), counted, and adapted; then "all-linear" on causal-LM and sequence-classification
models, and `layers_to_transform`, where the two used to disagree.
"""

import json
import re
import warnings

import pytest
from helpers import no_hang, tiny_llama
from transformers import (
    AutoConfig,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from veralab import VeraConfig
from veralab.app.cli import main
from veralab.counting import build_meta_model, count_adapter
from veralab.fast import get_model
from veralab.targets import DEFAULT_TARGET_MODULES, REGEX_TIME_BUDGET, select_targets

KNOWN_MODEL_TYPES = [model_type for model_type in DEFAULT_TARGET_MODULES if model_type in CONFIG_MAPPING]
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers")


def two_layers_deep(config):
    """The config with every layer count it has (its sub-models' too) set to 2."""
    for field in LAYER_COUNT_FIELDS:
        if isinstance(getattr(config, field, None), int):
            setattr(config, field, 2)
    for sub_config in ("text_config", "vision_config", "qformer_config"):
        if hasattr(getattr(config, sub_config, None), "to_dict"):
            two_layers_deep(getattr(config, sub_config))
    return config


def counted_names(model, config: VeraConfig) -> list[str]:
    return [layer.name for layer in count_adapter(model, config, lora_r=8).layers]


def adapted_names(model, config: VeraConfig) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # GPT-2's Conv1D layout notice
        return [name for name, _ in get_model(model, config).vera_layers()]


def test_most_default_model_types_are_checked():
    # Those transformers does not ship (chatglm, falcon's old names, btlm) are remote-code models.
    assert len(KNOWN_MODEL_TYPES) >= 30, KNOWN_MODEL_TYPES


@pytest.mark.parametrize("model_type", KNOWN_MODEL_TYPES)
def test_count_and_get_model_select_the_same_default_targets(model_type):
    config = two_layers_deep(AutoConfig.for_model(model_type))
    counted = counted_names(build_meta_model(config), VeraConfig(r=8))
    assert counted  # the defaults select something in every model type they are listed for
    assert adapted_names(build_meta_model(config), VeraConfig(r=8)) == counted


def tiny_llama_config(**kwargs) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, **kwargs,
    )  # fmt: skip


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32,
    )  # fmt: skip


ALL_LINEAR_CASES = {
    "causal LM, lm_head left out": (lambda: LlamaForCausalLM(tiny_llama_config()), None),
    "causal LM with tied embeddings": (
        lambda: LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)),
        None,
    ),
    "Llama classifier, SEQ_CLS: score left out": (
        lambda: LlamaForSequenceClassification(tiny_llama_config(num_labels=3)),
        "SEQ_CLS",
    ),
    "Llama classifier without task_type: score adapted": (
        lambda: LlamaForSequenceClassification(tiny_llama_config(num_labels=3)),
        None,
    ),
    "BERT classifier, SEQ_CLS: classifier left out": (
        lambda: BertForSequenceClassification(tiny_bert_config()),
        "SEQ_CLS",
    ),
}


@pytest.mark.parametrize("case", ALL_LINEAR_CASES)
def test_count_and_get_model_agree_on_all_linear(case):
    build, task_type = ALL_LINEAR_CASES[case]
    config = VeraConfig(r=4, target_modules="all-linear", task_type=task_type)
    counted = counted_names(build(), config)
    assert counted == adapted_names(build(), config)
    heads = {"lm_head", "score", "classifier"} & {name.split(".")[0] for name in counted}
    # The output embedding never; a classification head only when it is not trained in full (SEQ_CLS).
    assert heads == ({"score"} if case.endswith("score adapted") else set())


@pytest.mark.parametrize(
    "layers_to_transform, layers_pattern", [([1], "layers"), (0, None), ([0, 2], ["layers"]), ([2], "layers")]
)
@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], "all-linear", r".*\.mlp\..*_proj"])
def test_count_and_get_model_agree_with_layers_to_transform(
    target_modules, layers_to_transform, layers_pattern
):
    config = VeraConfig(
        r=4,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    counted = counted_names(LlamaForCausalLM(tiny_llama_config()), config)
    assert counted == adapted_names(LlamaForCausalLM(tiny_llama_config()), config)
    indices = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
    assert {int(re.search(r"\.layers\.(\d+)\.", name)[1]) for name in counted} == indices


def test_selection_of_an_adapted_model_reports_the_base_layers():
    model = get_model(LlamaForCausalLM(tiny_llama_config()), VeraConfig(r=4, target_modules=["q_proj"]))
    selected = select_targets(model.model, VeraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    assert [t.module for t in selected if t.name.endswith("q_proj")] == [
        layer.base_layer for _, layer in model.vera_layers()
    ]


def test_veralab_count_prints_the_trainable_parameters_get_model_trains(tmp_path, capsys):
    config = tiny_llama_config(architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(["count", "--model", str(tmp_path), "--rank", "16", "--targets", "all-linear"]) == 0
    printed = capsys.readouterr().out
    trainable, _ = get_model(
        LlamaForCausalLM(config), VeraConfig(r=16, target_modules="all-linear")
    ).get_nb_trainable_parameters()
    assert f"{trainable:,} trainable" in printed


# Backtracks exponentially on any name without three equal characters in a row (every module name here).
CATASTROPHIC_REGEX = r"(.*?)*(.)\2\2"


@pytest.mark.fault(
    "config",
    "a `target_modules` regex that backtracks catastrophically (it would run for years)",
    f"ValueError after a {REGEX_TIME_BUDGET:g} s matching budget, naming the regex and the fix",
)
def test_a_catastrophically_backtracking_target_regex_fails_within_its_budget():
    config = VeraConfig(r=4, target_modules=CATASTROPHIC_REGEX)
    with no_hang(60 * REGEX_TIME_BUDGET), pytest.raises(ValueError, match="took more than") as error:
        select_targets(tiny_llama(), config)
    assert repr(CATASTROPHIC_REGEX) in str(error.value) and "list of module names" in str(error.value)


def test_regex_targets_still_match_as_re_does():
    model = tiny_llama()
    pattern = r".*layers\.[01]\.self_attn\.(q|v)_proj"
    expected = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    assert len(expected) == 4
    assert [t.name for t in select_targets(model, VeraConfig(r=4, target_modules=pattern))] == expected
