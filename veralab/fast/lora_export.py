"""Exporting a VeRA adapter as a standard PEFT LoRA adapter that computes exactly the same function.

Per layer `lora_A = lambda_d * A_s` (r, in) and `lora_B = lambda_b * B_s` (out, r) in float32, with
`lora_alpha = r` (scaling 1), so `lora_B @ lora_A` is VeRA's delta weight: LoRA-only inference servers can
serve a VeRA adapter (at LoRA's size on disk).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from veralab.atomic import update_files
from veralab.fast.conv import VeraConv
from veralab.fast.embedding import VeraEmbedding
from veralab.fast.layer import VeraLayer
from veralab.fast.layout import CONFIG_NAME, DEFAULT_ADAPTER, PEFT_PREFIX, WEIGHTS_NAME
from veralab.fast.saving import adapter_tensors, base_model_name, check_finite, config_json
from veralab.targets import name_matches_entry, named_modules

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel

LORA_BIAS = {"none": "none", "all": "all", "vera_only": "lora_only"}
# Safetensors metadata marking a LoRA adapter as veralab's export (PEFT ignores metadata): which VeRA adapter
# it computes. `veralab export-lora` replaces an existing output only when it carries this mark.
EXPORT_KEY = "veralab_exported_from"


def save_as_lora(
    model: VeraModel,
    save_directory: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    allow_non_finite: bool = False,
) -> None:
    """Write adapter `adapter_name` as a PEFT LoRA adapter with the same outputs (see the module docstring).

    Biases and modules_to_save are carried over under the same keys.

    Args:
        model: the VeraModel.
        save_directory: the directory to write (updated atomically, like `save_pretrained`).
        adapter_name: the adapter to export.
        allow_non_finite: write tensors holding NaN/inf instead of refusing them.
    """
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    vera_keys = (".vera_lambda_b", ".vera_lambda_d", f"{PEFT_PREFIX}vera_A", f"{PEFT_PREFIX}vera_B")
    # Biases and modules_to_save carry over under the same keys; the VeRA tensors become lora_A/lora_B.
    tensors = {
        key: t for key, t in adapter_tensors(model, adapter_name).items() if not key.endswith(vera_keys)
    }
    layers = [(path, layer) for path, layer in model.vera_layers() if adapter_name in layer.r]
    for path, layer in layers:
        for key, tensor in lora_tensors(layer, adapter_name).items():
            tensors[f"{PEFT_PREFIX}model.{path}.{key}"] = tensor
    lora_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": base_model_name(model, config),
        "r": config.r,
        "lora_alpha": config.r,
        "lora_dropout": config.vera_dropout,
        "target_modules": _lora_target_modules(model, [path for path, _ in layers]),
        "bias": LORA_BIAS[config.bias],
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers),
        "modules_to_save": config.modules_to_save,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if not allow_non_finite:
        check_finite(tensors, f"the LoRA export of adapter {adapter_name!r}")
    metadata = {"format": "pt", EXPORT_KEY: json.dumps({"adapter_name": adapter_name, "peft_type": "VERA"})}
    update_files(
        save_directory,
        {
            WEIGHTS_NAME: safetensors.torch.save(tensors, metadata=metadata),
            CONFIG_NAME: config_json(lora_config),
        },
    )


def lora_tensors(layer: VeraLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT LoRA's tensors for one layer, by key suffix, in the shapes PEFT's LoRA layer of that type holds:
    `lora_A.weight` (r, in) and `lora_B.weight` (out, r) for linear layers, the same as (r, in, *k) and
    (out, r, 1, ...) kernels for convolutions, `lora_embedding_A` (r, num) and `lora_embedding_B` (dim, r)
    for embeddings."""
    lora_A, lora_B = (t.contiguous() for t in layer.lora_factors(adapter_name, torch.device("cpu")))
    if isinstance(layer, VeraEmbedding):
        return {"lora_embedding_A": lora_A, "lora_embedding_B": lora_B}
    if isinstance(layer, VeraConv):
        kernel = layer.base_layer.kernel_size
        lora_A = lora_A.view(lora_A.shape[0], layer.base_layer.in_channels, *kernel)
        lora_B = lora_B.view(*lora_B.shape, *(1,) * len(kernel))
    return {"lora_A.weight": lora_A, "lora_B.weight": lora_B}


def _lora_target_modules(model: VeraModel, adapted: list[str]) -> list[str]:
    """The adapted layers' short names when those select exactly the adapted layers, else their full names."""
    short = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    selected = [
        name for name, _ in named_modules(model.model) if any(name_matches_entry(name, s) for s in short)
    ]
    return short if sorted(selected) == sorted(adapted) else sorted(adapted)
