"""Which modules of a model an adapter targets: names, regexes, "all-linear", model-type defaults, layer indices.

The matching rules are PEFT's, so a `target_modules` list that works with PEFT selects the same modules
here: a name matches a module whose full name equals it or ends with "." + name; a string is a regex that
must match the full name; "all-linear" is every supported linear layer except the output head.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab.config import VeraConfig

ALL_LINEAR = "all-linear"

# PEFT's VeRA defaults (its LoRA mapping with phi on q_proj/v_proj only), plus ViT, which PEFT lacks.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],  # transformers 5 names ViT's attention like Llama's
    "rwkv": ["key", "value", "receptance", "output"],
}

# Classification heads trained in full (modules_to_save) for task_type="SEQ_CLS", as PEFT does.
SEQ_CLS_HEAD_NAMES = ("classifier", "score")


def resolve_target_modules(model: nn.Module, config: VeraConfig) -> list[str] | str:
    """The config's targets, or the defaults of the model's type when `target_modules` is None."""
    if config.target_modules is not None:
        return config.target_modules
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"VeraConfig.target_modules=None needs a transformers model to look up default targets, but "
            f"{type(model).__name__} has no config.model_type; set target_modules, e.g. ['q_proj', 'v_proj']"
        )
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"VeraConfig.target_modules=None and there are no default targets for model_type={model_type!r}; "
            f"set target_modules (a list of module names, a regex, or 'all-linear'). Known model types: "
            f"{sorted(DEFAULT_TARGET_MODULES)}"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear (or subclass) or a transformers Conv1D."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape  # Conv1D stores W transposed: (in, out)
        return out_features, in_features
    return module.out_features, module.in_features


def name_matches_entry(name: str, entry: str) -> bool:
    """PEFT's rule for one entry of a target list: the full name, or a suffix starting after a dot."""
    return name == entry or name.endswith("." + entry)


def name_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list matches when one entry does."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name_matches_entry(name, t) for t in targets)


def layer_index_allowed(name: str, config: VeraConfig) -> bool:
    """False when `layers_to_transform` is set and `name` is not in one of those layers."""
    indices = config.layers_to_transform
    if indices is None:
        return True
    indices = [indices] if isinstance(indices, int) else indices
    patterns = config.layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if patterns:
        matches = (re.match(rf".*\.{re.escape(p)}\.(\d+)\.", name) for p in patterns)
        match = next((m for m in matches if m is not None), None)
    else:
        match = re.match(r".*\.[^.]*\.(\d+)\.", name)
    return match is not None and int(match.group(1)) in indices


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules "all-linear" leaves alone: the output embedding (lm_head) and SEQ_CLS heads."""
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if (output is not None and module is output) or name.split(".")[-1] in SEQ_CLS_HEAD_NAMES:
            heads.add(name)
    return heads
