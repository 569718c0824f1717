"""Which modules of a model an adapter targets: the one selector every part of veralab uses.

`select_targets(model, config)` returns the layers an adapter with `config` adapts, with their weight
shapes; `VeraModel` injects into them, the adapter files are laid out from them, and `veralab.counting` and
`veralab count` count them, so all of them always agree. The model may be real or built on the meta device,
and may already carry adapters (an adapted layer is reported as the layer it wraps).

The matching rules are PEFT's, so a `target_modules` that works with PEFT selects the same modules here:

- a list entry matches a module whose full name equals it or ends with "." + entry (every entry the user
  gives must match at least one module: a misspelt name is an error, not a silently smaller adapter);
- a string is a regular expression that must match a module's full name entirely (matched with a bounded
  cost: a regex whose matching takes longer than `REGEX_TIME_BUDGET` seconds over all the model's module
  names, e.g. catastrophic backtracking in a config read from an untrusted file, is an error, not a hang);
- `"all-linear"` (any case) is every linear layer except the output embedding (`lm_head`); with
  `task_type="SEQ_CLS"` the classification head (`score` / `classifier`) and its sub-layers are left out
  too, since they are trained in full (`modules_to_save`);
- `None` takes the model type's default targets (`DEFAULT_TARGET_MODULES`; some list the names of several
  sub-architectures, so at least one of them must match);
- `layers_to_transform` keeps the modules under those indices of the layer list (`layers_pattern` names it,
  e.g. "layers" or "h"; without it, the first `.<name>.<index>.` in the module name counts).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import regex
from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab.config import VeraConfig
from veralab.reference import check_embedding, conv_matrix_shape

ALL_LINEAR = "all-linear"
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

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

# Classification heads, trained in full (modules_to_save) for task_type="SEQ_CLS", as PEFT does.
SEQ_CLS_HEAD_NAMES = ("classifier", "score")

# Seconds one target_modules regex may spend matching all of a model's module names (a regular pattern needs
# microseconds per name; a catastrophically backtracking one would run for years).
REGEX_TIME_BUDGET = 1.0


class LayerGeometry(NamedTuple):
    """What the selector needs to know of an adaptable layer.

    Args:
        out_features: rows of the weight seen as a matrix (out, in).
        in_features: its columns.
        linear: whether `"all-linear"` includes the layer (nn.Linear, Conv1D and quantized linear layers).
    """

    out_features: int
    in_features: int
    linear: bool


class Target(NamedTuple):
    """One layer an adapter adapts: its name in the model, the layer, and its weight's (out, in) shape."""

    name: str
    module: nn.Module
    out_features: int
    in_features: int


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear (or subclass) or a transformers Conv1D."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape  # Conv1D stores W transposed: (in, out)
        return out_features, in_features
    return module.out_features, module.in_features


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    """The geometry of the layers VeRA adapts; None for any other module (`unadaptable_reason` says why).

    nn.Linear (and its subclasses) and transformers' Conv1D are linear; nn.Embedding is the map of one-hot
    inputs (in = num_embeddings, out = embedding_dim, `veralab.reference` §7); nn.Conv1d/2d/3d with groups=1
    have their kernel as the matrix (out_channels, in_channels · ∏k) (§8). `veralab.fast` extends this with
    the quantized layers it supports.
    """
    if isinstance(module, (nn.Linear, Conv1D)):
        return LayerGeometry(*weight_shape(module), linear=True)
    if unadaptable_reason(module) is not None:
        return None
    if isinstance(module, nn.Embedding):
        return LayerGeometry(module.embedding_dim, module.num_embeddings, linear=False)
    if isinstance(module, CONV_TYPES):
        return LayerGeometry(*conv_matrix_shape(module), linear=False)
    return None


def unadaptable_reason(module: nn.Module) -> str | None:
    """Why VeRA cannot adapt a module of an adaptable type (None when it can, or when its type is not one)."""
    try:
        if isinstance(module, nn.Embedding):
            check_embedding(module)
        elif isinstance(module, CONV_TYPES):
            conv_matrix_shape(module)
    except ValueError as e:
        return str(e)
    return None


GeometryOf = Callable[[nn.Module], LayerGeometry | None]


# ------------------------------------------------------------------------------------------ the selector


def select_targets(
    model: nn.Module, config: VeraConfig, geometry: GeometryOf = layer_geometry
) -> list[Target]:
    """The layers an adapter with `config` adapts in `model`, in module order (see the module docstring).

    Args:
        model: any module: a transformers model (real or on the meta device), possibly already adapted.
        config: the adapter's config (`target_modules`, `layers_to_transform`, `layers_pattern`,
            `task_type`).
        geometry: tells adaptable layers and their shapes (the default knows nn.Linear and Conv1D).

    Raises:
        ValueError: a list entry or a regex that matches nothing, a matched module VeRA cannot adapt, a
            selection that `layers_to_transform` leaves empty, or `target_modules=None` for a model type
            without defaults. The message names the problem and the fix.
    """
    targets = resolve_target_modules(model, config)
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    excluded = _all_linear_exclusions(model, config) if all_linear else ()
    matched_entries: set[str] = set()
    selected: list[Target] = []
    matcher = None if all_linear else _EntryMatcher(targets, type(model).__name__)
    for name, module in named_layers(model):
        layer = geometry(module)
        if matcher is None:
            if layer is None or not layer.linear or _is_within(name, excluded):
                continue
        else:
            entries = matcher.entries_matching(name)
            if not entries:
                continue
            matched_entries.update(entries)
        if not layer_index_allowed(name, config):
            continue
        if layer is None:
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}, which VeRA cannot adapt: "
                + (
                    unadaptable_reason(module)
                    or "VeRA adapts nn.Linear, transformers Conv1D, quantized linear layers, nn.Embedding "
                    "and nn.Conv1d/2d/3d. Remove it from target_modules (or name its sub-layers instead)."
                )
            )
        selected.append(Target(name, module, layer.out_features, layer.in_features))
    _check_no_tied_embeddings(model, selected)
    if not all_linear and config.target_modules is not None:  # defaults name several architectures' layers
        _check_every_entry_matched(model, targets, matched_entries, geometry)
    if not selected:
        raise ValueError(
            f"target_modules={targets!r} with layers_to_transform={config.layers_to_transform!r} and "
            f"layers_pattern={config.layers_pattern!r} selects no module of {type(model).__name__}; check "
            "the layer indices and the name of the layer list"
        )
    return selected


def select_modules_to_save(model: nn.Module, config: VeraConfig) -> dict[str, nn.Module]:
    """{name: module} of the modules trained in full next to the adapter (`modules_to_save`).

    For `task_type="SEQ_CLS"` the classification heads the model has are added, and head names it lacks are
    dropped, as PEFT does (PEFT's files list both "classifier" and "score"). Adapted layers are never
    selected.

    Raises:
        ValueError: an entry that matches no module.
    """
    names = modules_to_save_names(model, config)
    found = {
        name: module
        for name, module in named_modules(model)
        if not is_adapter_layer(module) and any(name_matches_entry(name, entry) for entry in names)
    }
    missing = [entry for entry in names if not any(name_matches_entry(name, entry) for name in found)]
    if missing:
        raise ValueError(
            f"modules_to_save entries {missing} match no module of {type(model).__name__}; name modules as "
            "they appear in model.named_modules()"
        )
    return found


def modules_to_save_names(model: nn.Module, config: VeraConfig) -> list[str]:
    """The config's `modules_to_save`, with the model's classification heads for `task_type="SEQ_CLS"`."""
    names = list(config.modules_to_save or [])
    if config.task_type != "SEQ_CLS":
        return names
    present = [name for name, _ in named_modules(model)]
    heads = [head for head in SEQ_CLS_HEAD_NAMES if any(name_matches_entry(name, head) for name in present)]
    return [name for name in names if name not in SEQ_CLS_HEAD_NAMES] + heads


def resolve_target_modules(model: nn.Module, config: VeraConfig) -> list[str] | str:
    """The config's targets, or the defaults of the model's type when `target_modules` is None."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(
            "VeraConfig.target_modules=None needs a transformers model to look up default targets, but "
            f"{type(model).__name__} has no config.model_type; set target_modules, e.g. ['q_proj', 'v_proj']"
        )
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"VeraConfig.target_modules=None and there are no default targets for model_type={model_type!r}; "
            "set target_modules (a list of module names, a regex, or 'all-linear'). Known model types: "
            f"{sorted(DEFAULT_TARGET_MODULES)}"
        )
    return DEFAULT_TARGET_MODULES[model_type]


# ------------------------------------------------------------------------------------------ walking a model


def is_adapter_layer(module: nn.Module) -> bool:
    """An adapter layer wrapping a frozen `base_layer` (veralab.fast's VeRA layers, as PEFT's tuner
    layers)."""
    return isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(
        module, "adapter_layer_names"
    )


def is_modules_to_save_wrapper(module: nn.Module) -> bool:
    """A wrapper holding an `original_module` and per-adapter `modules_to_save` copies."""
    return isinstance(getattr(module, "original_module", None), nn.Module) and hasattr(
        module, "modules_to_save"
    )


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's named modules (the root left out), not descending into adapter layers or modules-to-save
    wrappers: what the user's model has, whatever adapters it carries."""
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skipped):
            continue
        if is_adapter_layer(module) or is_modules_to_save_wrapper(module):
            skipped.append(name + ".")
        yield name, module


def named_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules`, with every adapter layer replaced by the frozen layer it wraps."""
    for name, module in named_modules(model):
        yield name, module.base_layer if is_adapter_layer(module) else module


def name_matches_entry(name: str, entry: str) -> bool:
    """PEFT's rule for one entry of a target list: the full name, or a suffix starting after a dot."""
    return name == entry or name.endswith("." + entry)


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


class _EntryMatcher:
    """The entries of `targets` that select a module name (a regex is one entry), at a bounded cost.

    A regex is matched by the `regex` engine (Python's `re` semantics) with a timeout: all the names of one
    selection share `REGEX_TIME_BUDGET` seconds.

    Args:
        targets: the resolved target_modules (a list of names or a regex).
        model_name: the model's class name, for the error message.
    """

    def __init__(self, targets: list[str] | str, model_name: str) -> None:
        self.targets = targets
        self.model_name = model_name
        self.pattern = None
        if isinstance(targets, str):
            try:
                self.pattern = regex.compile(targets)
            except (regex.error, RecursionError, OverflowError) as e:
                raise ValueError(
                    f"target_modules={targets!r} is not a regular expression veralab can match ({e}); use a "
                    "list of module names"
                ) from e
        self.deadline: float | None = None

    def entries_matching(self, name: str) -> list[str]:
        if self.pattern is None:
            return [entry for entry in self.targets if name_matches_entry(name, entry)]
        if self.deadline is None:
            self.deadline = time.monotonic() + REGEX_TIME_BUDGET
        try:
            match = self.pattern.fullmatch(name, timeout=max(self.deadline - time.monotonic(), 1e-3))
        except TimeoutError as e:
            raise ValueError(
                f"target_modules={self.targets!r}: matching this regex against the module names of "
                f"{self.model_name} took more than {REGEX_TIME_BUDGET:g} s (it backtracks catastrophically, "
                "e.g. nested repetition like (a*)*); use a simpler regex or a list of module names"
            ) from e
        return [self.targets] if match is not None else []


def _check_every_entry_matched(
    model: nn.Module, targets: list[str] | str, matched: set[str], geometry: GeometryOf
) -> None:
    entries = [targets] if isinstance(targets, str) else list(targets)
    missing = [entry for entry in entries if entry not in matched]
    if not missing:
        return
    examples = [name for name, module in named_layers(model) if geometry(module) is not None][:6]
    if isinstance(targets, str):
        raise ValueError(
            f"target_modules={targets!r} matches no module of {type(model).__name__}: a string is a regex "
            f"that must match a whole module name; module names look like {examples}"
        )
    raise ValueError(
        f"target_modules entr{'y' if len(missing) == 1 else 'ies'} {missing} match no module of "
        f"{type(model).__name__}; module names look like {examples}. Fix the names (a list entry must equal "
        "a module's name or its last dotted parts; a string is a full-name regex)."
    )


def _check_no_tied_embeddings(model: nn.Module, selected: list[Target]) -> None:
    """Refuse an embedding whose table another module shares (tied input and output embeddings): the adapter
    term changes the lookup only, while merging would change the other module too."""
    for target in (t for t in selected if isinstance(t.module, nn.Embedding)):
        table = target.module.weight
        sharing = [
            name
            for name, module in named_layers(model)
            if module is not target.module and any(p is table for p in module.parameters(recurse=False))
        ]
        if sharing:
            raise ValueError(
                f"target {target.name!r} is an nn.Embedding whose table is also the weight of {sharing} "
                "(tied input and output embeddings): its VeRA term would change the lookups only, while "
                "merging would change both. Untie them first (e.g. tie_word_embeddings=False in the model's "
                "config, then give the output layer its own copy of the weight), or target other layers."
            )


def _all_linear_exclusions(model: nn.Module, config: VeraConfig) -> tuple[str, ...]:
    """What "all-linear" leaves out: the output embedding, and for SEQ_CLS the classification head."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    excluded = [name for name, module in named_modules(model) if output is not None and module is output]
    if config.task_type == "SEQ_CLS":
        excluded += [name for name, _ in named_modules(model) if name in SEQ_CLS_HEAD_NAMES]
    return tuple(excluded)


def _is_within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)
