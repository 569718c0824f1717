"""Saving adapters in PEFT's format (`veralab.fast.layout`), each adapter's files replaced atomically.

An adapter's two files are staged, committed and moved into place together (`veralab.atomic`), so a
failed or killed save leaves the previous adapter intact, or the new one complete. Only safetensors is
written, never pickle. Projections left out of the file (`save_projection=False`) are fingerprinted in its
metadata (`veralab.fast.fingerprint`). Tensors holding NaN/inf are refused unless explicitly allowed.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from veralab.atomic import update_files
from veralab.config import VeraConfig
from veralab.fast.fingerprint import (
    FINGERPRINT_KEY,
    projection_fingerprint,
    regenerate_projections,
    same_values,
)
from veralab.fast.layout import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_directory,
    adapter_layout,
    model_tensors,
    projections_in_file,
)
from veralab.targets import resolve_target_modules

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel


def save_pretrained(
    model: VeraModel,
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None = None,
    allow_non_finite: bool = False,
) -> None:
    """Save adapters in PEFT's layout, each adapter's directory updated atomically.

    Every adapter's files are built and checked before anything is written.

    Args:
        model: the VeraModel.
        save_directory: the directory; adapter "default" goes into it, others into `save_directory/<name>`.
        selected_adapters: adapters to save (default: all of them).
        allow_non_finite: save tensors holding NaN/inf instead of refusing them.
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(
            f"selected_adapters has unknown adapter(s) {unknown}; this model has {list(model.peft_config)}"
        )
    prepared = {
        adapter_directory(save_directory, name): adapter_files(model, name, allow_non_finite)
        for name in names
    }
    for (directory, files), name in zip(prepared.items(), names, strict=True):
        try:
            update_files(directory, files)
        except OSError as e:
            raise OSError(
                e.errno,
                f"could not save adapter {name!r} to {directory}: {e.strerror or e}; any adapter already "
                "there is unchanged (check the directory is writable and the disk has space)",
            ) from e


def adapter_files(model: VeraModel, adapter_name: str, allow_non_finite: bool = False) -> dict[str, bytes]:
    """{file name: bytes} of one adapter's directory: its weights (with the fingerprint) and its config.

    Args:
        model: the VeraModel.
        adapter_name: the adapter.
        allow_non_finite: accept tensors holding NaN/inf.

    Raises:
        ValueError: a tensor holds NaN/inf and `allow_non_finite` is False.
    """
    plan = model.plan_adapter(adapter_name, model.peft_config[adapter_name], existing=True)
    tensors = adapter_tensors(model, adapter_name)
    if not allow_non_finite:
        check_finite(tensors, f"adapter {adapter_name!r}")
    metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(_fingerprint_for_file(model, adapter_name))}
    return {
        WEIGHTS_NAME: safetensors.torch.save(tensors, metadata=metadata),
        CONFIG_NAME: config_json(config_for_file(model, plan.config, projections_in_file(model, plan))),
    }


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse tensors holding NaN/inf, naming them and the opt-in.

    Args:
        tensors: {file key: tensor} about to be written.
        what: what is being saved, for the message (e.g. "adapter 'default'").
    """
    broken = sorted(key for key, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if broken:
        raise ValueError(
            f"{what} has NaN/inf values in {len(broken)} tensor(s), e.g. {broken[:3]}; it would only produce "
            "NaN/inf outputs (did training diverge?), so it is not saved. Pass allow_non_finite=True to save "
            "it anyway, e.g. to inspect it."
        )


def adapter_tensors(model: VeraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """{file key: CPU tensor} of one adapter, PEFT's keys (see `veralab.fast.layout`)."""
    sources = model_tensors(model)
    plan = model.plan_adapter(adapter_name, model.peft_config[adapter_name], existing=True)
    return {
        key: sources[slot.model_key].detach().to("cpu").contiguous().clone()
        for key, slot in adapter_layout(model, plan).items()
    }


def config_for_file(model: VeraModel, config: VeraConfig, projections_in_file: bool = False) -> dict:
    """The config as PEFT writes it: inference_mode true, the base model's name, explicit default targets.

    Args:
        model: the VeraModel.
        config: the adapter's config.
        projections_in_file: the file carries vera_A / vera_B (`veralab.fast.layout.projections_in_file`);
            the config then says save_projection=true, so PEFT loads them (and refuses a pair it cannot
            hold) instead of drawing another.
    """
    data = config.to_dict()
    data["inference_mode"] = True
    data["save_projection"] = config.save_projection or projections_in_file
    if data["target_modules"] is None:
        data["target_modules"] = resolve_target_modules(model.model, config)
    data["base_model_name_or_path"] = base_model_name(model, config)
    return data


def base_model_name(model: VeraModel, config: VeraConfig) -> str | None:
    """The config's base model name, else the wrapped model's `name_or_path` (what PEFT records)."""
    if config.base_model_name_or_path is not None:
        return config.base_model_name_or_path
    return getattr(getattr(model.model, "config", None), "name_or_path", None) or None


def config_json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _fingerprint_for_file(model: VeraModel, adapter_name: str) -> dict[str, Any]:
    """The fingerprint of the projections the adapter works with: the model's, which a file without them
    must be able to regenerate."""
    config = model.peft_config[adapter_name]
    pair = model.projections_of(adapter_name)
    vera_A, vera_B = pair.vera_A, pair.vera_B
    if not config.save_projection:
        vera_A, vera_B = regenerate_projections(vera_A.shape, vera_B.shape, config.projection_prng_key)
        if not same_values(vera_A, pair.vera_A) or not same_values(vera_B, pair.vera_B):
            raise ValueError(
                f"adapter {adapter_name!r} has save_projection=False, but the vera_A/vera_B it reads are not "
                f"what projection_prng_key={config.projection_prng_key} regenerates, so a file without them "
                f"would load with other projections. Set model.peft_config[{adapter_name!r}].save_projection "
                "= True to save them."
            )
    return projection_fingerprint(vera_A, vera_B, config.projection_prng_key)
