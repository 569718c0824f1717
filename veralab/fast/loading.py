"""Loading adapters (veralab's or PEFT's) into a model, all or nothing.

The whole directory is read and checked against the model before anything is written into it: files present,
config valid, safetensors intact, every key, shape and dtype the adapter's config implies (its
`veralab.fast.layout`), and the projections (saved ones as they are; regenerated ones against their
fingerprint, `veralab.fast.fingerprint`). Only safetensors is read, never pickle. Every problem is an
`AdapterLoadError` naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from veralab.config import VeraConfig
from veralab.fast.dtensors import copy_full_into, is_sharded
from veralab.fast.errors import AdapterLoadError
from veralab.fast.fingerprint import (
    check_regenerated,
    fingerprint_matches,
    regenerate_projections,
    same_values,
    stored_fingerprint,
)
from veralab.fast.layout import (
    CONFIG_NAME,
    DEFAULT_ADAPTER,
    PEFT_PREFIX,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    Slot,
    adapter_directory,
    adapter_layout,
    model_tensors,
)

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel


@dataclass
class AdapterFiles:
    """An adapter directory read into memory (nothing loaded into a model yet)."""

    config_path: Path
    weights_path: Path
    config: VeraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def load_adapter(
    model: VeraModel, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False
) -> None:
    """Load an adapter directory into `model`, all or nothing.

    A new `adapter_name` is added (inactive, like PEFT's `load_adapter`); an existing one has its weights
    replaced in place (so an optimizer holding them keeps working, as when a Trainer resumes). Everything is
    validated before the model is touched: on error the model is exactly as before. Into a model sharded over
    processes (FSDP2) only an existing adapter can be loaded; each process keeps its own slice of the file.

    Args:
        model: the VeraModel.
        directory: the adapter directory (holding adapter_config.json and adapter_model.safetensors).
        adapter_name: the name to load it under.
        is_trainable: False freezes the adapter and puts the model in eval mode, as PEFT does.
    """
    existing = adapter_name in model.peft_config
    if not existing and is_sharded(model):
        raise ValueError(
            f"adapter {adapter_name!r} is new, but this model is already sharded over processes (FSDP2) and "
            "its shards cannot grow: add it before sharding (model.add_adapter(name, config), then "
            "veralab.fast.fsdp.shard_model) and load its weights afterwards"
        )
    if existing and adapter_name in model.merged_adapters:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
            "loading new weights into it"
        )
    files = read_adapter_files(directory)
    files.config.inference_mode = not is_trainable
    with _naming(files.config_path):
        layout = adapter_layout(model, model.plan_adapter(adapter_name, files.config, existing=existing))
        if existing:
            current = model.plan_adapter(adapter_name, model.peft_config[adapter_name], existing=True)
            _check_same_layout(files, layout, adapter_layout(model, current))
    check_tensors(files, layout)
    check_projections(model, files, replace=False)
    if not existing:
        model.add_adapter(adapter_name, files.config)
    _copy_into(model, files, layout)
    if not is_trainable:
        model.eval()


def from_pretrained(
    model_cls: type[VeraModel],
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    is_trainable: bool = False,
) -> VeraModel:
    """Adapt `model` with the adapter saved in `directory`; on any error `model` is left as it was.

    Args:
        model_cls: VeraModel (or a subclass).
        model: the base model (a transformers model built from the same config the adapter was trained on).
        directory: the adapter directory.
        adapter_name: the name to give the adapter.
        is_trainable: False freezes the adapter and puts the model in eval mode, as PEFT does.
    """
    files = read_adapter_files(directory)
    files.config.inference_mode = not is_trainable
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    vera_model = None
    try:
        with _naming(files.config_path):
            vera_model = model_cls(model, files.config, adapter_name=adapter_name)
        _adopt_trained_projection_shapes(vera_model, files)
        layout = adapter_layout(
            vera_model, vera_model.plan_adapter(adapter_name, files.config, existing=True)
        )
        check_tensors(files, layout)
        check_projections(vera_model, files, replace=True)
    except Exception:
        if vera_model is not None:
            vera_model.unload()
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    _copy_into(vera_model, files, layout)
    if not is_trainable:
        vera_model.eval()
    return vera_model


def load_checkpoint_adapters(model: VeraModel, directory: str | os.PathLike) -> None:
    """Restore every adapter of `model` in place from a `save_pretrained` directory (trainability kept)."""
    for name, config in model.peft_config.items():
        load_adapter(model, adapter_directory(directory, name), name, is_trainable=not config.inference_mode)


# ----------------------------------------------------------------------------------------- reading files


def read_adapter_files(directory: str | os.PathLike) -> AdapterFiles:
    """Read and check an adapter directory on its own: files present, config valid, safetensors intact."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(
            f"{directory}: no such adapter directory (expected a directory holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME})"
        )
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterLoadError(
            f"{config_path}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise AdapterLoadError(
                f"{directory / PICKLE_WEIGHTS_NAME}: a pickled adapter; veralab loads safetensors only "
                "(unpickling can run arbitrary code). Re-save it with PEFT's save_pretrained(..., "
                "safe_serialization=True)."
            )
        raise AdapterLoadError(
            f"{weights_path}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    for path in (config_path, weights_path):
        if path.stat().st_size == 0:
            raise AdapterLoadError(
                f"{path}: the file is empty (0 bytes); whatever wrote it did not finish, save the adapter "
                "again"
            )
    try:
        config = VeraConfig.from_json_file(config_path)
    except ValueError as e:
        raise AdapterLoadError(str(e)) from e
    return AdapterFiles(config_path, weights_path, config, *_read_safetensors(weights_path))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise AdapterLoadError(
            f"{path}: not a readable safetensors file ({e}); it is truncated or corrupted, save the adapter "
            "again"
        ) from e
    return tensors, metadata


# ----------------------------------------------------------------------------------------- validation


def check_tensors(files: AdapterFiles, layout: dict[str, Slot]) -> None:
    """Every key the model needs is in the file, nothing else is, and shapes and dtypes fit."""
    missing = sorted(set(layout) - set(files.tensors))
    unexpected = sorted(set(files.tensors) - set(layout))
    if missing:
        raise AdapterLoadError(
            f"{files.weights_path}: missing {len(missing)} tensor(s) the adapter's config implies, e.g. "
            f"{missing[:3]}; the file does not belong to this config (or was written incompletely)"
        )
    if unexpected:
        raise AdapterLoadError(
            f"{files.weights_path}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}; they "
            "match no module this adapter's config targets in the model (was it saved from another "
            "architecture?)"
        )
    for key, slot in layout.items():
        tensor = files.tensors[key]
        if tuple(tensor.shape) != slot.shape and slot.model_key in ("vera_A", "vera_B"):
            raise AdapterLoadError(
                f"{files.weights_path}: {key} has shape {tuple(tensor.shape)} but this model's shared "
                f"projections are {slot.shape} (sized by its first adapter); load the adapter into a fresh "
                "base model with VeraModel.from_pretrained"
            )
        if tuple(tensor.shape) != slot.shape:
            raise AdapterLoadError(
                f"{files.weights_path}: {key} has shape {tuple(tensor.shape)} but the model needs "
                f"{slot.shape}; the adapter was saved from a model with other layer sizes (or another rank)"
            )
        if not tensor.dtype.is_floating_point:
            raise AdapterLoadError(
                f"{files.weights_path}: {key} has dtype {tensor.dtype}; adapter tensors are floating point"
            )


def check_projections(model: VeraModel, files: AdapterFiles, replace: bool) -> None:
    """The adapter's projections (saved, or regenerated and fingerprinted) are the ones the model will use.

    Args:
        model: the VeraModel.
        files: the adapter read from disk, already checked against the model's layout.
        replace: the model's projections were made for this adapter alone and take the saved ones.
    """
    config = files.config
    fingerprint = stored_fingerprint(files.metadata, files.weights_path)
    if config.save_projection:
        vera_A, vera_B = files.tensors[f"{PEFT_PREFIX}vera_A"], files.tensors[f"{PEFT_PREFIX}vera_B"]
        if fingerprint is not None and not fingerprint_matches(
            fingerprint, vera_A, vera_B, config.projection_prng_key
        ):
            raise AdapterLoadError(
                f"{files.weights_path}: the saved vera_A/vera_B do not match the fingerprint stored next to "
                "them; the file is corrupted, save the adapter again"
            )
        if not replace and not (same_values(vera_A, model.vera_A) and same_values(vera_B, model.vera_B)):
            raise AdapterLoadError(
                f"{files.weights_path}: the adapter's saved vera_A/vera_B differ from the projections this "
                f"model's adapters {list(model.peft_config)} share; one VeraModel holds one pair. Load it "
                "into a fresh base model with VeraModel.from_pretrained instead."
            )
        return
    regenerated = regenerate_projections(model.vera_A.shape, model.vera_B.shape, config.projection_prng_key)
    if fingerprint is None:
        warnings.warn(
            f"{files.weights_path} has no vera_A/vera_B and no veralab fingerprint (it was saved by PEFT "
            "with save_projection=False): the projections are regenerated from projection_prng_key and "
            "cannot be verified; outputs are wrong if this machine's generator differs from the one it was "
            "trained with.",
            UserWarning,
            stacklevel=4,
        )
    else:
        check_regenerated(
            fingerprint, regenerated, config.projection_prng_key, files.config_path, files.weights_path
        )
    if not (same_values(regenerated[0], model.vera_A) and same_values(regenerated[1], model.vera_B)):
        raise AdapterLoadError(
            f"{files.weights_path}: the adapter relies on the projections "
            f"projection_prng_key={config.projection_prng_key} regenerates, but this model's shared "
            "vera_A/vera_B differ from them; load it into a fresh base model with VeraModel.from_pretrained "
            "instead."
        )


def _adopt_trained_projection_shapes(model: VeraModel, files: AdapterFiles) -> None:
    """Size a freshly built model's projections like the ones the adapter was trained with.

    An adapter added second to a model shares the first one's (larger) pair; saved alone, its targets would
    size a smaller pair, and a smaller regenerated A is not a slice of the larger one (A is drawn row by row).
    The saved projections, or the fingerprint, record the trained shapes: regenerate at those. Shapes that
    cannot serve the targets are left for the checks to report.
    """
    saved = files.tensors.get(f"{PEFT_PREFIX}vera_A"), files.tensors.get(f"{PEFT_PREFIX}vera_B")
    if files.config.save_projection and saved[0] is not None and saved[1] is not None:
        shapes = tuple(saved[0].shape), tuple(saved[1].shape)
    elif (
        not files.config.save_projection
        and (fingerprint := stored_fingerprint(files.metadata, files.weights_path)) is not None
    ):
        shapes = tuple(fingerprint["vera_A_shape"]), tuple(fingerprint["vera_B_shape"])
    else:
        return
    shape_A, shape_B = shapes
    current_A, current_B = tuple(model.vera_A.shape), tuple(model.vera_B.shape)
    fits = (
        len(shape_A) == 2
        and len(shape_B) == 2
        and shape_A[0] == current_A[0] == shape_B[1]
        and shape_A[1] >= current_A[1]
        and shape_B[0] >= current_B[0]
    )
    if not fits or (shape_A, shape_B) == (current_A, current_B):
        return
    vera_A, vera_B = regenerate_projections(shape_A, shape_B, files.config.projection_prng_key)
    model.set_projections(vera_A.to(model.vera_A.device), vera_B.to(model.vera_B.device))


def _check_same_layout(files: AdapterFiles, layout: dict[str, Slot], existing: dict[str, Slot]) -> None:
    if layout != existing:
        differing = sorted(set(layout) ^ set(existing)) or sorted(
            k for k in layout if layout[k] != existing[k]
        )
        raise AdapterLoadError(
            f"{files.config_path}: this adapter's config lays out other tensors than the model's adapter of "
            f"the same name (e.g. {differing[:3]}); load it under a new adapter_name"
        )


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise the model's ValueErrors (targets, sizes, names) as load errors naming the file."""
    try:
        yield
    except AdapterLoadError:
        raise
    except ValueError as e:
        raise AdapterLoadError(f"{path}: this adapter does not fit the model: {e}") from e


@torch.no_grad()
def _copy_into(model: VeraModel, files: AdapterFiles, layout: dict[str, Slot]) -> None:
    """Write the validated tensors into the model (cast to each target's dtype and device; a sharded
    target keeps its own slice)."""
    targets = model_tensors(model)
    for key, slot in layout.items():
        copy_full_into(targets[slot.model_key], files.tensors[key])
