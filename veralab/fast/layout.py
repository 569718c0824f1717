"""An adapter's tensors in PEFT's file layout, and where each one lives in the model.

An adapter directory holds `adapter_config.json` (PEFT's VeraConfig fields) and `adapter_model.safetensors`
with PEFT's key names, so a veralab adapter loads with `peft.PeftModel.from_pretrained` and a PEFT VeRA
adapter loads here:

    base_model.model.<module path>.vera_lambda_b        (out,)   one pair per adapted layer
    base_model.model.<module path>.vera_lambda_d        (r,)
    base_model.model.<module path>.<key>                         modules_to_save copies (e.g. score.weight)
    base_model.model.<module path>.base_layer.bias               bias="vera_only" (bias="all": every bias)
    base_model.vera_A (r, max_in), base_model.vera_B (max_out, r)   the adapter's pair, when
                                                                     `projections_in_file`

The adapter `default` lives in the directory itself, any other adapter in `<directory>/<name>/`, as in PEFT,
so an adapter's name must be a name (`check_adapter_name`). `adapter_layout` derives the layout from an
`AdapterPlan` (what the adapter's config selects in the model), so it serves before the adapter exists (to
check a file before anything is written into the model) and after (to save it); `planned_layout` does the
same for a base model not adapted yet, at given projection shapes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from veralab.fast.rows import BASE_ROW
from veralab.targets import is_adapter_layer, is_modules_to_save_wrapper, named_layers, named_modules

if TYPE_CHECKING:
    from veralab.fast.model import AdapterPlan, VeraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's legacy format; refused, never unpickled
DEFAULT_ADAPTER = "default"
PEFT_PREFIX = "base_model."
PROJECTION_KEYS = ("vera_A", "vera_B")
PROJECTION_FILE_KEYS = tuple(PEFT_PREFIX + key for key in PROJECTION_KEYS)


@dataclass(frozen=True)
class Slot:
    """One tensor of an adapter file: where it goes in the model and the shape it must have.

    Args:
        model_key: key in `VeraModel.state_dict()` once the adapter exists (its pair's buffer names for the
            projections).
        shape: the shape the model needs.
    """

    model_key: str
    shape: tuple[int, ...]


ADAPTER_NAME_RULE = (
    "a non-empty string of printable characters without '.', '/' or '\\' (it becomes a directory name "
    f"and part of state-dict keys), other than {BASE_ROW!r} (reserved for base rows of mixed batches)"
)


def check_adapter_name(adapter_name: object) -> None:
    """Raise ValueError unless `adapter_name` can name an adapter: one path component, one state-dict key
    part.

    Args:
        adapter_name: the proposed name.
    """
    if adapter_name == BASE_ROW:
        raise ValueError(
            f"adapter_name={BASE_ROW!r} is reserved: it marks mixed-batch rows that use no adapter"
        )
    if (
        not isinstance(adapter_name, str)
        or not adapter_name
        or not adapter_name.isprintable()
        or any(c in adapter_name for c in "./\\")
    ):
        raise ValueError(f"adapter_name={adapter_name!r} is invalid: use {ADAPTER_NAME_RULE}")


def adapter_directory(root: str | os.PathLike, adapter_name: str) -> Path:
    """Where PEFT keeps an adapter: `root` for "default", `root/<name>` otherwise (never outside `root`)."""
    if adapter_name == DEFAULT_ADAPTER:
        return Path(root)
    check_adapter_name(adapter_name)
    return Path(root) / adapter_name


def adapter_layout(
    model: VeraModel, plan: AdapterPlan, with_projections: bool | None = None
) -> dict[str, Slot]:
    """{file key: Slot} of the adapter `plan` describes (see the module docstring).

    Args:
        model: the VeraModel the adapter is (or would be) part of.
        plan: `model.plan_adapter(...)` of the adapter.
        with_projections: whether the file holds vera_A / vera_B (default: `projections_in_file`, what a
            save writes; a file being loaded says it with its config's save_projection).
    """
    if with_projections is None:
        with_projections = projections_in_file(model, plan)
    keys = model.projection_buffer_names(plan.name) if plan.name in model.peft_config else PROJECTION_KEYS
    return planned_layout(model.model, plan, with_projections, keys)


def projections_in_file(model: VeraModel, plan: AdapterPlan) -> bool:
    """Whether a save writes the adapter's vera_A / vera_B (and save_projection=true in its config).

    When its config asks for them; and whenever a file without them would load with another pair in PEFT:
    PEFT draws the pair of a model's first adapter over that adapter's targets (as veralab does) and gives
    every later adapter that same pair. So an adapter of a group other than the model's first, or one
    loaded with a pair larger than its targets need, carries its pair: PEFT then loads it alone exactly,
    and refuses it beside another adapter with a clear error (mixed save_projection, or a size mismatch)
    instead of running it with the wrong pair.
    """
    if plan.config.save_projection or plan.projection_shapes != plan.own_projection_shapes:
        return True
    return plan.name in model.peft_config and model.projections_of(plan.name) is not model.projections


def planned_layout(
    base: nn.Module,
    plan: AdapterPlan,
    with_projections: bool,
    projection_keys: tuple[str, str] = PROJECTION_KEYS,
) -> dict[str, Slot]:
    """{file key: Slot} of the adapter `plan` describes, in `base`.

    Args:
        base: the model the adapter is (or would be) part of, adapted or not (`VeraModel.model`).
        plan: the adapter's plan (its projection shapes included).
        with_projections: the file holds the adapter's vera_A / vera_B.
        projection_keys: the model's buffer names of its pair (`VeraModel.projection_buffer_names`).
    """
    name, config = plan.name, plan.config
    layout: dict[str, Slot] = {}
    for target in plan.targets:
        path = target.name
        layout[f"{PEFT_PREFIX}model.{path}.vera_lambda_b"] = Slot(
            f"model.{path}.vera_lambda_b.{name}", (target.out_features,)
        )
        layout[f"{PEFT_PREFIX}model.{path}.vera_lambda_d"] = Slot(
            f"model.{path}.vera_lambda_d.{name}", (config.r,)
        )
    for path, module in plan.modules_to_save.items():
        original = module.original_module if is_modules_to_save_wrapper(module) else module
        for key, tensor in original.state_dict().items():
            layout[f"{PEFT_PREFIX}model.{path}.{key}"] = Slot(
                f"model.{path}.modules_to_save.{name}.{key}", tuple(tensor.shape)
            )
    for model_key, shape in _bias_slots(base, plan):
        layout[PEFT_PREFIX + model_key] = Slot(model_key, shape)
    if with_projections:
        for file_key, model_key, shape in zip(
            PROJECTION_FILE_KEYS, projection_keys, plan.projection_shapes, strict=True
        ):
            layout[file_key] = Slot(model_key, tuple(shape))
    return layout


def _bias_slots(base: nn.Module, plan: AdapterPlan) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(model key, shape) of the biases the bias mode trains, named as once the targets are wrapped."""
    bias_mode = plan.config.bias
    if bias_mode == "vera_only":
        for target in plan.targets:
            bias = getattr(target.module, "bias", None)
            if bias is not None:
                yield f"model.{target.name}.base_layer.bias", tuple(bias.shape)
    elif bias_mode == "all":
        wrapped = {target.name for target in plan.targets}
        wrapped |= {name for name, module in named_modules(base) if is_adapter_layer(module)}
        trained_in_full = tuple(path + "." for path in plan.modules_to_save)
        for path, module in [("", base), *named_layers(base)]:
            bias = dict(module.named_parameters(recurse=False)).get("bias")
            if bias is None or (path + ".").startswith(trained_in_full):
                continue
            key = f"{path}.base_layer.bias" if path in wrapped else (f"{path}.bias" if path else "bias")
            yield f"model.{key}", tuple(bias.shape)


def model_tensors(model: VeraModel) -> dict[str, torch.Tensor]:
    """The model's state-dict entries by key, with every pair of projections even when not persistent."""
    projections = dict(model.named_buffers(recurse=False))
    return {**model.state_dict(keep_vars=True), **projections}
