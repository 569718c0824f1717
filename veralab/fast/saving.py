"""Saving adapters in PEFT's format (`veralab.fast.layout`), each adapter's files replaced atomically.

Files are written to a staging directory and renamed into place, so a failed save leaves the previous adapter
intact. Only safetensors is written, never pickle. Projections left out of the file (`save_projection=False`)
are fingerprinted in its metadata (`veralab.fast.fingerprint`). A model sharded over processes (FSDP2) has
its adapter gathered first (`veralab.fast.dtensors.full_tensor`): every process takes part, one writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from veralab.config import VeraConfig
from veralab.fast.dtensors import full_tensor
from veralab.fast.fingerprint import (
    FINGERPRINT_KEY,
    projection_fingerprint,
    regenerate_projections,
    same_values,
)
from veralab.fast.layout import CONFIG_NAME, WEIGHTS_NAME, adapter_directory, adapter_layout, model_tensors
from veralab.targets import resolve_target_modules

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel


def save_pretrained(
    model: VeraModel,
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None = None,
    write: bool = True,
) -> None:
    """Save adapters in PEFT's layout, each adapter's files replaced atomically.

    Args:
        model: the VeraModel.
        save_directory: the directory; adapter "default" goes into it, others into `save_directory/<name>`.
        selected_adapters: adapters to save (default: all of them).
        write: write the files. On a sharded model every process calls this (gathering the adapter is a
            collective) and only the main one writes.
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(
            f"selected_adapters has unknown adapter(s) {unknown}; this model has {list(model.peft_config)}"
        )
    for name in names:
        tensors = adapter_tensors(model, name)
        if not write:
            continue
        metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(_fingerprint_for_file(model, name))}
        directory = adapter_directory(save_directory, name)
        files = {
            WEIGHTS_NAME: sorted_metadata(safetensors.torch.save(tensors, metadata=metadata)),
            # Replaced last: the config says which weights it goes with.
            CONFIG_NAME: config_json(config_for_file(model, model.peft_config[name])),
        }
        try:
            write_files_atomically(directory, files)
        except OSError as e:
            raise OSError(
                e.errno,
                f"could not save adapter {name!r} to {directory}: {e.strerror or e}; any adapter already "
                "there is unchanged (check the directory is writable and the disk has space)",
            ) from e


def adapter_tensors(model: VeraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """{file key: CPU tensor} of one adapter, PEFT's keys (see `veralab.fast.layout`); whole tensors, gathered
    from every process when the model is sharded (then every process must call this)."""
    sources = model_tensors(model)
    plan = model.plan_adapter(adapter_name, model.peft_config[adapter_name], existing=True)
    return {
        key: full_tensor(sources[slot.model_key].detach()).to("cpu").contiguous().clone()
        for key, slot in adapter_layout(model, plan).items()
    }


def sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the header's metadata keys in sorted order.

    safetensors writes its metadata in hash order, which differs from process to process, so the same
    tensors and metadata saved twice could differ in bytes. Sorted, a file depends on its contents alone: a
    sharded model's save is byte for byte the single-process one.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensor data stays 8-byte aligned, as safetensors keeps it
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def config_for_file(model: VeraModel, config: VeraConfig) -> dict:
    """The config as PEFT writes it: inference_mode true, the base model's name, explicit default targets."""
    data = config.to_dict()
    data["inference_mode"] = True
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
    vera_A, vera_B = model.vera_A, model.vera_B
    if not config.save_projection:
        vera_A, vera_B = regenerate_projections(vera_A.shape, vera_B.shape, config.projection_prng_key)
        if not same_values(vera_A, model.vera_A) or not same_values(vera_B, model.vera_B):
            raise ValueError(
                f"adapter {adapter_name!r} has save_projection=False, but the model's vera_A/vera_B are not "
                f"what projection_prng_key={config.projection_prng_key} regenerates, so a file without them "
                f"would load with other projections. Set model.peft_config[{adapter_name!r}].save_projection "
                "= True to save them."
            )
    return projection_fingerprint(vera_A, vera_B, config.projection_prng_key)


# ----------------------------------------------------------------------------------------- safe writes


def write_files_atomically(directory: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Write `files` ({name: bytes}) into `directory` so that a failure leaves its previous files intact.

    Everything is written and fsynced in a staging directory next to `directory` first. A new directory is
    then renamed into place in one step; in an existing one (which may hold other files, e.g. a Trainer
    checkpoint) each file replaces its predecessor atomically, in the order given.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Staged on the same filesystem, so the renames below are atomic.
    staging_parent = directory if directory.is_dir() else directory.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=staging_parent))
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if not directory.exists():
            with contextlib.suppress(OSError):  # created meanwhile: fall through to per-file replacement
                staging.rename(directory)
                return
        for name in files:
            os.replace(staging / name, directory / name)
        _fsync_directory(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
