"""Adapters on disk in PEFT's format: save, load (all or nothing), verified projections, exact LoRA export.

An adapter directory holds `adapter_config.json` (PEFT's VeraConfig fields) and
`adapter_model.safetensors` with PEFT's key names, so a veralab adapter loads with
`peft.PeftModel.from_pretrained` and a PEFT VeRA adapter loads here:

    base_model.model.<module path>.vera_lambda_b        (out,)   one pair per adapted layer
    base_model.model.<module path>.vera_lambda_d        (r,)
    base_model.model.<module path>.<key>                         modules_to_save copies (e.g. score.weight)
    base_model.model.<module path>.base_layer.bias               bias="vera_only" (bias="all": every bias)
    base_model.vera_A (r, max_in), base_model.vera_B (max_out, r)   only when save_projection=True

The adapter `default` lives in the directory itself, any other adapter in `<directory>/<name>/`, as in PEFT.

Projections not saved are regenerated from `projection_prng_key`, which PEFT warns may differ across devices
and torch versions (and then gives wrong outputs silently). veralab records a fingerprint of the projections
(sha256 over their float32 bytes, shapes, key and generator) in the safetensors metadata, checks it when
regenerating, and refuses a mismatch. Saved projections are always the ones loaded.

Files are written to a staging directory and renamed into place, so a failed save leaves the previous adapter
intact. Loading validates the whole file against the model before anything is written into it. Only
safetensors is read or written, never pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from veralab.config import VeraConfig
from veralab.fast import projections
from veralab.fast.layer import VeraLinear, is_fan_in_fan_out
from veralab.fast.modules_to_save import ModulesToSaveWrapper
from veralab.targets import name_matches_entry, resolve_target_modules

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's legacy format; refused, never unpickled
DEFAULT_ADAPTER = "default"
PEFT_PREFIX = "base_model."
FINGERPRINT_KEY = "veralab_projections"
GENERATOR = (
    "torch.Generator('cpu').manual_seed(projection_prng_key); kaiming_uniform(gain=sqrt(2)) "
    "vera_A (r, max_in) then vera_B (max_out, r); float32"
)
LORA_BIAS = {"none": "none", "all": "all", "vera_only": "lora_only"}


class AdapterLoadError(ValueError):
    """An adapter file that cannot be loaded; the message names the file and the problem."""


class ProjectionMismatchError(AdapterLoadError):
    """Regenerated projections differ from the ones the adapter was saved with."""


# ----------------------------------------------------------------------------------------- file layout


@dataclass(frozen=True)
class Slot:
    """One tensor of an adapter file: where it goes in the model and the shape it must have.

    Args:
        model_key: key in `VeraModel.state_dict()` once the adapter exists (`vera_A`, `vera_B` for the
            projections).
        shape: the shape the model needs.
    """

    model_key: str
    shape: tuple[int, ...]


def adapter_directory(root: str | os.PathLike, adapter_name: str) -> Path:
    """Where PEFT keeps an adapter: `root` for "default", `root/<name>` otherwise."""
    return Path(root) if adapter_name == DEFAULT_ADAPTER else Path(root) / adapter_name


def adapter_layout(model: VeraModel, config: VeraConfig, adapter_name: str) -> dict[str, Slot]:
    """{file key: Slot} of adapter `adapter_name` with `config`, derived from the model's modules.

    Works before the adapter exists (to validate a file before anything is written) and after (to save it).
    Raises the model's ValueError when the config's targets do not fit the model.
    """
    targets = model._find_targets(config)
    to_save = model._find_modules_to_save(model._modules_to_save_names(config))
    layout: dict[str, Slot] = {}
    for path, module in targets.items():
        out_features, _ = model._out_in(module)
        layout[f"{PEFT_PREFIX}model.{path}.vera_lambda_b"] = Slot(
            f"model.{path}.vera_lambda_b.{adapter_name}", (out_features,)
        )
        layout[f"{PEFT_PREFIX}model.{path}.vera_lambda_d"] = Slot(
            f"model.{path}.vera_lambda_d.{adapter_name}", (config.r,)
        )
    for path, module in to_save.items():
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for key, tensor in original.state_dict().items():
            layout[f"{PEFT_PREFIX}model.{path}.{key}"] = Slot(
                f"model.{path}.modules_to_save.{adapter_name}.{key}", tuple(tensor.shape)
            )
    for model_key, shape in _bias_slots(model, config, targets, to_save):
        layout[PEFT_PREFIX + model_key] = Slot(model_key, shape)
    if config.save_projection:
        layout[f"{PEFT_PREFIX}vera_A"] = Slot("vera_A", tuple(model.vera_A.shape))
        layout[f"{PEFT_PREFIX}vera_B"] = Slot("vera_B", tuple(model.vera_B.shape))
    return layout


def _bias_slots(
    model: VeraModel, config: VeraConfig, targets: dict[str, nn.Module], to_save: dict[str, nn.Module]
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(model key, shape) of the biases the bias mode trains, named as once the targets are wrapped."""
    if config.bias == "vera_only":
        for path, module in targets.items():
            bias = getattr(model._base_of(module), "bias", None)
            if bias is not None:
                yield f"model.{path}.base_layer.bias", tuple(bias.shape)
    elif config.bias == "all":
        skipped = [
            path + "." for path, m in model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)
        ]
        skipped += [path + "." for path in to_save]
        for name, param in model.model.named_parameters():
            if not (name == "bias" or name.endswith(".bias")) or any(name.startswith(s) for s in skipped):
                continue
            path = name.removesuffix(".bias")
            if path in targets and not isinstance(targets[path], VeraLinear):
                name = f"{path}.base_layer.bias"
            yield f"model.{name}", tuple(param.shape)


# ----------------------------------------------------------------------------------------- fingerprints


def projection_fingerprint(vera_A: torch.Tensor, vera_B: torch.Tensor, prng_key: int) -> dict[str, Any]:
    """sha256 over the float32 bytes of the projections, their shapes, the key and the generator.

    Args:
        vera_A: the (r, max_in) projection.
        vera_B: the (max_out, r) projection.
        prng_key: the `projection_prng_key` they come from.
    """
    description = {
        "generator": GENERATOR,
        "projection_prng_key": prng_key,
        "vera_A_shape": list(vera_A.shape),
        "vera_B_shape": list(vera_B.shape),
    }
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for tensor in (vera_A, vera_B):
        # Explicit little-endian float32, so the bytes do not depend on the machine.
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return {**description, "sha256": digest.hexdigest(), "torch_version": torch.__version__}


def regenerate_projections(shape_A: tuple[int, ...], shape_B: tuple[int, ...], prng_key: int):
    """The pair `projection_prng_key` gives on this machine, on CPU in float32, as the model draws it."""
    r, max_in = shape_A
    max_out, _ = shape_B
    return projections.init_projections(r, max_in, max_out, prng_key)


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


# ----------------------------------------------------------------------------------------- saving


def save_pretrained(
    model: VeraModel, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None
) -> None:
    """Save adapters in PEFT's layout (see the module docstring), each adapter's files replaced atomically.

    Args:
        model: the VeraModel.
        save_directory: the directory; adapter "default" goes into it, others into `save_directory/<name>`.
        selected_adapters: adapters to save (default: all of them).
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(
            f"selected_adapters has unknown adapter(s) {unknown}; this model has {list(model.peft_config)}"
        )
    for name in names:
        metadata = {"format": "pt", FINGERPRINT_KEY: json.dumps(_fingerprint_for_file(model, name))}
        directory = adapter_directory(save_directory, name)
        files = {
            WEIGHTS_NAME: safetensors.torch.save(adapter_tensors(model, name), metadata=metadata),
            # Replaced last: the config says which weights it goes with.
            CONFIG_NAME: _config_json(_config_for_file(model, model.peft_config[name])),
        }
        try:
            write_files_atomically(directory, files)
        except OSError as e:
            raise OSError(
                e.errno,
                f"could not save adapter {name!r} to {directory}: {e.strerror or e}; any adapter already there "
                "is unchanged (check the directory is writable and the disk has space)",
            ) from e


def adapter_tensors(model: VeraModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """{file key: CPU tensor} of one adapter, PEFT's keys (see the module docstring)."""
    sources = _model_tensors(model)
    layout = adapter_layout(model, model.peft_config[adapter_name], adapter_name)
    return {
        key: sources[slot.model_key].detach().to("cpu").contiguous().clone() for key, slot in layout.items()
    }


def _model_tensors(model: VeraModel) -> dict[str, torch.Tensor]:
    """The model's state-dict entries by key, with the projections even when they are not persistent."""
    return {**model.state_dict(keep_vars=True), "vera_A": model.vera_A, "vera_B": model.vera_B}


def _fingerprint_for_file(model: VeraModel, adapter_name: str) -> dict[str, Any]:
    """The fingerprint of the projections the adapter works with: the model's, which a file without them
    must be able to regenerate."""
    config = model.peft_config[adapter_name]
    vera_A, vera_B = model.vera_A, model.vera_B
    if not config.save_projection:
        vera_A, vera_B = _regeneration_of_model_projections(model, adapter_name)
    return projection_fingerprint(vera_A, vera_B, config.projection_prng_key)


def _regeneration_of_model_projections(
    model: VeraModel, adapter_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The regenerated pair, checked to be the pair the model uses (else the file would be wrong)."""
    config = model.peft_config[adapter_name]
    vera_A, vera_B = regenerate_projections(
        model.vera_A.shape, model.vera_B.shape, config.projection_prng_key
    )
    if not _same_values(vera_A, model.vera_A) or not _same_values(vera_B, model.vera_B):
        raise ValueError(
            f"adapter {adapter_name!r} has save_projection=False, but the model's vera_A/vera_B are not what "
            f"projection_prng_key={config.projection_prng_key} regenerates, so a file without them would "
            f"load with other projections. Set model.peft_config[{adapter_name!r}].save_projection = True to "
            "save them."
        )
    return vera_A, vera_B


def _same_values(reference: torch.Tensor, used: torch.Tensor) -> bool:
    """`used` equals `reference` cast to its dtype (the model may have been cast to bf16/fp16, or moved)."""
    return reference.shape == used.shape and torch.equal(reference.to(used.dtype), used.detach().to("cpu"))


def _config_for_file(model: VeraModel, config: VeraConfig) -> dict:
    """The config as PEFT writes it: inference_mode true, the base model's name, explicit default targets."""
    data = config.to_dict()
    data["inference_mode"] = True
    if data["target_modules"] is None:
        data["target_modules"] = resolve_target_modules(model.model, config)
    data["base_model_name_or_path"] = _base_model_name(model, config)
    return data


def _base_model_name(model: VeraModel, config: VeraConfig) -> str | None:
    """The config's base model name, else the wrapped model's `name_or_path` (what PEFT records)."""
    if config.base_model_name_or_path is not None:
        return config.base_model_name_or_path
    return getattr(getattr(model.model, "config", None), "name_or_path", None) or None


def _config_json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_as_lora(
    model: VeraModel, save_directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Write adapter `adapter_name` as a standard PEFT LoRA adapter that computes exactly the same function.

    Per layer `lora_A = lambda_d * A_s` (r, in) and `lora_B = lambda_b * B_s` (out, r) in float32, with
    `lora_alpha = r` (scaling 1), so `lora_B @ lora_A` is VeRA's delta weight: LoRA-only servers can serve it.
    Biases and modules_to_save are carried over under the same keys.

    Args:
        model: the VeraModel.
        save_directory: the directory to write (replaced atomically, like `save_pretrained`).
        adapter_name: the adapter to export.
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
        lambda_d = layer.vera_lambda_d[adapter_name].detach().to("cpu", torch.float32)
        lambda_b = layer.vera_lambda_b[adapter_name].detach().to("cpu", torch.float32)
        A_s, B_s = model._projections.sliced(
            layer.in_features, layer.out_features, torch.float32, torch.device("cpu")
        )
        lora_A = lambda_d[:, None] * A_s  # (r, in)
        lora_B = lambda_b[:, None] * B_s  # (out, r)
        tensors[f"{PEFT_PREFIX}model.{path}.lora_A.weight"] = lora_A.contiguous()
        tensors[f"{PEFT_PREFIX}model.{path}.lora_B.weight"] = lora_B.contiguous()
    lora_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": _base_model_name(model, config),
        "r": config.r,
        "lora_alpha": config.r,
        "lora_dropout": config.vera_dropout,
        "target_modules": _lora_target_modules(model, [path for path, _ in layers]),
        "bias": LORA_BIAS[config.bias],
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "modules_to_save": config.modules_to_save,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    write_files_atomically(
        save_directory,
        {
            WEIGHTS_NAME: safetensors.torch.save(tensors, metadata={"format": "pt"}),
            CONFIG_NAME: _config_json(lora_config),
        },
    )


def _lora_target_modules(model: VeraModel, adapted: list[str]) -> list[str]:
    """The adapted layers' short names when those select exactly the adapted layers, else their full names."""
    short = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    selected = [
        name
        for name, module in model.model.named_modules()
        if isinstance(module, (nn.Linear, VeraLinear)) or is_fan_in_fan_out(module)
        if any(name_matches_entry(name, s) for s in short)
    ]
    return short if sorted(selected) == sorted(adapted) else sorted(adapted)


# ----------------------------------------------------------------------------------------- reading files


@dataclass
class AdapterFiles:
    """An adapter directory read into memory (nothing loaded into a model yet)."""

    config_path: Path
    weights_path: Path
    config: VeraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


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
                f"{path}: the file is empty (0 bytes); whatever wrote it did not finish, save the adapter again"
            )
    return AdapterFiles(
        config_path, weights_path, _read_config(config_path), *_read_safetensors(weights_path)
    )


def _read_config(path: Path) -> VeraConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(
            f"{path}: not valid JSON ({e}); the file is truncated or corrupted, save the adapter again"
        ) from e
    if not isinstance(data, dict):
        raise AdapterLoadError(
            f"{path}: expected a JSON object of VeraConfig fields, got {type(data).__name__}"
        )
    peft_type = data.get("peft_type")
    if peft_type != "VERA":
        raise AdapterLoadError(
            f"{path}: peft_type={peft_type!r}, but veralab loads VeRA adapters (peft_type 'VERA'); load this "
            "adapter with the library that matches its peft_type"
        )
    try:
        return VeraConfig.from_dict(data)
    except ValueError as e:
        raise AdapterLoadError(f"{path}: {e}") from e


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
    fingerprint = _stored_fingerprint(files)
    if config.save_projection:
        vera_A, vera_B = files.tensors[f"{PEFT_PREFIX}vera_A"], files.tensors[f"{PEFT_PREFIX}vera_B"]
        if fingerprint is not None and not _fingerprint_matches(fingerprint, vera_A, vera_B, config):
            raise AdapterLoadError(
                f"{files.weights_path}: the saved vera_A/vera_B do not match the fingerprint stored next to "
                "them; the file is corrupted, save the adapter again"
            )
        if not replace and not (_same_values(vera_A, model.vera_A) and _same_values(vera_B, model.vera_B)):
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
        _check_fingerprint(files, fingerprint, regenerated)
    if not (_same_values(regenerated[0], model.vera_A) and _same_values(regenerated[1], model.vera_B)):
        raise AdapterLoadError(
            f"{files.weights_path}: the adapter relies on the projections "
            f"projection_prng_key={config.projection_prng_key} regenerates, but this model's shared "
            "vera_A/vera_B differ from them; load it into a fresh base model with VeraModel.from_pretrained "
            "instead."
        )


def _stored_fingerprint(files: AdapterFiles) -> dict[str, Any] | None:
    raw = files.metadata.get(FINGERPRINT_KEY)
    if raw is None:
        return None
    try:
        fingerprint = json.loads(raw)
    except json.JSONDecodeError:
        fingerprint = None
    needed = {"sha256", "projection_prng_key", "vera_A_shape", "vera_B_shape"}
    if not isinstance(fingerprint, dict) or not needed <= set(fingerprint):
        raise AdapterLoadError(
            f"{files.weights_path}: the {FINGERPRINT_KEY!r} metadata is corrupted (expected a JSON object "
            f"with {sorted(needed)}, got {raw[:80]!r}); save the adapter again"
        )
    return fingerprint


def _fingerprint_matches(
    fingerprint: dict[str, Any], vera_A: torch.Tensor, vera_B: torch.Tensor, config: VeraConfig
) -> bool:
    return (
        projection_fingerprint(vera_A, vera_B, config.projection_prng_key)["sha256"] == fingerprint["sha256"]
    )


def _check_fingerprint(
    files: AdapterFiles, fingerprint: dict[str, Any], regenerated: tuple[torch.Tensor, torch.Tensor]
) -> None:
    key = files.config.projection_prng_key
    if fingerprint["projection_prng_key"] != key:
        raise ProjectionMismatchError(
            f"{files.config_path}: projection_prng_key={key}, but the adapter was trained with projections "
            f"drawn from projection_prng_key={fingerprint['projection_prng_key']} (recorded in "
            f"{files.weights_path.name}); restore the config's original key"
        )
    saved_shapes = (tuple(fingerprint["vera_A_shape"]), tuple(fingerprint["vera_B_shape"]))
    shapes = (tuple(regenerated[0].shape), tuple(regenerated[1].shape))
    if saved_shapes != shapes:
        raise ProjectionMismatchError(
            f"{files.weights_path}: the adapter was trained with projections of shapes {saved_shapes}, but "
            f"this model needs {shapes}; it was saved from a model with other layer sizes"
        )
    if not _fingerprint_matches(fingerprint, *regenerated, files.config):
        raise ProjectionMismatchError(
            f"{files.weights_path}: vera_A/vera_B regenerated from projection_prng_key={key} on this machine "
            f"(torch {torch.__version__}) do not match the fingerprint saved with the adapter (saved with "
            f"torch {fingerprint.get('torch_version', 'unknown')}, sha256 {fingerprint['sha256'][:16]}...). "
            "The file has no projections (save_projection=False) and this machine's generator draws "
            "different ones, so loading it would silently give wrong outputs. To recover: where the adapter "
            "was saved (same torch version and device), load it, set "
            "model.peft_config[<name>].save_projection = True and save it again; that file carries its "
            "projections and loads anywhere."
        )


# ----------------------------------------------------------------------------------------- loading


def load_adapter(
    model: VeraModel, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False
) -> None:
    """Load an adapter directory into `model`, all or nothing.

    A new `adapter_name` is added (inactive, like PEFT's `load_adapter`); an existing one has its weights
    replaced in place (so an optimizer holding them keeps working, as when a Trainer resumes). Everything is
    validated before the model is touched: on error the model is exactly as before.

    Args:
        model: the VeraModel.
        directory: the adapter directory (holding adapter_config.json and adapter_model.safetensors).
        adapter_name: the name to load it under.
        is_trainable: False freezes the adapter and puts the model in eval mode, as PEFT does.
    """
    existing = adapter_name in model.peft_config
    if existing and adapter_name in model._merged_adapters():
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
            "loading new weights into it"
        )
    files = read_adapter_files(directory)
    files.config.inference_mode = not is_trainable
    with _naming(files.config_path):
        if existing:
            layout = adapter_layout(model, files.config, adapter_name)
            _check_same_layout(
                files, layout, adapter_layout(model, model.peft_config[adapter_name], adapter_name)
            )
        else:
            model._check_new_adapter_name(adapter_name)
            model._check_against_projections(files.config, model._find_targets(files.config))
            layout = adapter_layout(model, files.config, adapter_name)
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
        layout = adapter_layout(vera_model, files.config, adapter_name)
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
    elif not files.config.save_projection and (fingerprint := _stored_fingerprint(files)) is not None:
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
    model.vera_A, model.vera_B = vera_A.to(model.vera_A.device), vera_B.to(model.vera_B.device)
    model._projections.replace(model.vera_A, model.vera_B)


def load_checkpoint_adapters(model: VeraModel, directory: str | os.PathLike) -> None:
    """Restore every adapter of `model` in place from a `save_pretrained` directory (trainability kept)."""
    for name, config in model.peft_config.items():
        load_adapter(model, adapter_directory(directory, name), name, is_trainable=not config.inference_mode)


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
    """Write the validated tensors into the model (cast to each target's dtype and device)."""
    targets = _model_tensors(model)
    for key, slot in layout.items():
        targets[slot.model_key].copy_(files.tensors[key])
