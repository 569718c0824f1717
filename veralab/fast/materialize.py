"""Big-model start-up: a VeRA model built on the meta device, made real process by process from a checkpoint.

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):                           # no memory: shapes only
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = get_model(base, VeraConfig(...))
    shard_model(model)                                   # veralab.fast.fsdp; leave it out for one process
    report = materialize(model, path)                    # this process's shards, read from path

No process ever holds the whole base model: `to_empty` allocates each process's own shards (uninitialised),
and each process reads from the checkpoint's safetensors files only the rows of its shards (safetensors
slices: the file is memory-mapped, the other rows are never read). What `materialize` fills:

- the base's parameters and persistent buffers: from `model.safetensors` (or the files listed in
  `model.safetensors.index.json`), cast to the model's dtypes. Every one must be there, with the model's
  shape; this is checked on the files' headers before any memory is allocated;
- copies of `modules_to_save` modules: the checkpoint's weights of the module they copy;
- the lambdas: their initial values (`init_weights=True`: lambda_d = d_initial, lambda_b = 0); load an adapter
  afterwards (`load_adapter` into the same name) to start from trained ones;
- vera_A / vera_B, every projection group's pair: to_empty leaves garbage in every buffer, saved or not, so
  each pair gets back the values it had (`get_model` draws it on the CPU from `projection_prng_key` even
  over a meta base), or is drawn again from its key when it was on the meta device too; then every pair is
  compared by fingerprint across processes, once;
- the base's other buffers (rotary frequencies, ...): the values they had when they were real (a model
  built under `accelerate.init_empty_weights()`), else computed again by transformers' own initialisation of
  the module that holds them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from veralab.fast.dtensors import is_dtensor
from veralab.fast.fingerprint import projection_fingerprint, regenerate_projections
from veralab.targets import is_adapter_layer, is_modules_to_save_wrapper

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class MaterializeReport:
    """What one process read to fill its part of the model.

    Args:
        bytes_read: bytes of tensor data this process read from the checkpoint.
        checkpoint_bytes: bytes of tensor data the model's tensors take in the checkpoint, whole.
        tensors: how many checkpoint tensors the model took values from.
    """

    bytes_read: int
    checkpoint_bytes: int
    tensors: int


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: safetensors file holding it} of a transformers checkpoint directory.

    Raises:
        ValueError: the directory has neither `model.safetensors` nor `model.safetensors.index.json`.
    """
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SAFETENSORS_WEIGHTS
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise ValueError(
        f"{directory}: no {SAFETENSORS_WEIGHTS} or {SAFETENSORS_INDEX}; the base weights are read from "
        "safetensors files only (write them with the model's save_pretrained)"
    )


def checkpoint_names(model: VeraModel) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """{id: (tensor, the names it has in the base model's checkpoint)} for every parameter and persistent
    buffer of the base model, modules_to_save copies included and lambdas left out (a tied weight has
    several names)."""
    names: dict[int, tuple[torch.Tensor, list[str]]] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if is_adapter_layer(module):  # the base layer keeps its names; lambdas are in no checkpoint
            visit(module.base_layer, prefix)
            return
        if is_modules_to_save_wrapper(module):  # the original and every copy start from the same weights
            for inner in (module.original_module, *module.modules_to_save.values()):
                visit(inner, prefix)
            return
        non_persistent = module._non_persistent_buffers_set
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if name not in non_persistent:
                names.setdefault(id(tensor), (tensor, []))[1].append(prefix + name)
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model.get_base_model(), "")
    return names


def materialize(
    model: VeraModel, checkpoint: str | os.PathLike, device: torch.device | str = "cpu"
) -> MaterializeReport:
    """Allocate this process's part of a model built on the meta device and fill it (module docstring).

    Args:
        model: a VeraModel whose parameters are all on the meta device, sharded (`shard_model`) or not.
        checkpoint: the base model's directory (safetensors files, as `save_pretrained` writes them).
        device: where this process's tensors go.

    Raises:
        ValueError: the model has real parameters, an adapter asks for random lambdas (init_weights=False),
            or the checkpoint lacks a tensor or has another shape for it (nothing is allocated then).
        RuntimeError: the processes drew different projections.
    """
    device = torch.device(device)
    real = [name for name, param in model.named_parameters() if param.device.type != "meta"]
    if real:
        raise ValueError(
            f"materialize fills a model built on the meta device, but {len(real)} parameter(s) already hold "
            f"values (e.g. {real[0]}); build the base under `with torch.device('meta'):`"
        )
    random_init = [name for name, config in model.peft_config.items() if not config.init_weights]
    if random_init:
        raise ValueError(
            f"adapter(s) {random_init} have init_weights=False (random lambdas), which a model built on the "
            "meta device cannot draw the same as one process; use init_weights=True and load_adapter "
            "trained weights afterwards"
        )
    files = checkpoint_files(checkpoint)
    sources = _check_checkpoint(checkpoint_names(model), files)
    kept, recomputed = _buffers_to_restore(model)
    pairs = _projection_values(model)

    with _parameters_kept_in_place():
        model.to_empty(device=device)
    with torch.no_grad():
        for module, name, value in kept:
            getattr(module, name).copy_(value)
        for module in recomputed:
            model.get_base_model()._init_weights(module)
        report = _read_shards(sources)
        _initial_lambdas(model)
        _restore_projections(model, pairs)
    _check_same_projections(model)
    return report


@contextlib.contextmanager
def _parameters_kept_in_place() -> Iterator[None]:
    """`to_empty` swaps new memory into each parameter object instead of replacing it (as it already does for
    FSDP's DTensors), so tied weights stay tied and the tensors collected before it are the ones to fill."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def _check_checkpoint(
    names: dict[int, tuple[torch.Tensor, list[str]]], files: dict[str, Path]
) -> list[tuple[torch.Tensor, str, Path]]:
    """(model tensor, checkpoint name, file) for every tensor, after checking names and shapes."""
    missing, sources = [], []
    for tensor, aliases in names.values():
        name = next((alias for alias in aliases if alias in files), None)
        if name is None:
            missing.append(aliases[0])
        else:
            sources.append((tensor, name, files[name]))
    if missing:
        raise ValueError(
            f"the checkpoint has no tensor for {len(missing)} of the model's weights (e.g. {missing[:3]}); "
            "it belongs to another model, or the model was built from another config"
        )
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="pt")) for path in set(files.values())}
        for tensor, name, path in sources:
            shape = tuple(handles[path].get_slice(name).get_shape())
            if shape != tuple(tensor.shape):
                raise ValueError(
                    f"{path}: {name} has shape {shape} but the model needs {tuple(tensor.shape)}; the model "
                    "was built from another config than the checkpoint's"
                )
    return sources


def _buffers_to_restore(
    model: VeraModel,
) -> tuple[list[tuple[nn.Module, str, torch.Tensor]], list[nn.Module]]:
    """([(module, name, value)] of the real non-persistent buffers, [modules holding meta non-persistent
    ones]). vera_A / vera_B are drawn again instead, persistent buffers read from the checkpoint."""
    kept, recomputed, stuck = [], [], []
    can_recompute = hasattr(model.get_base_model(), "_init_weights")
    for module_name, module in model.named_modules():
        non_persistent = module._non_persistent_buffers_set
        for name, buffer in module.named_buffers(recurse=False):
            if module is model or name not in non_persistent:
                continue
            if buffer.device.type != "meta":
                kept.append((module, name, buffer))
            elif not can_recompute:
                stuck.append(f"{module_name}.{name}")
            elif module not in recomputed:
                recomputed.append(module)
    if stuck:
        raise ValueError(
            f"buffers {stuck[:3]} are on the meta device and nothing can compute them again; build the base "
            "model under accelerate.init_empty_weights(), which keeps buffers real"
        )
    return kept, recomputed


def _read_shards(sources: list[tuple[torch.Tensor, str, Path]]) -> MaterializeReport:
    """Copy each tensor's rows (this process's shard, or all of it) from the checkpoint into the model."""
    bytes_read = checkpoint_bytes = 0
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}
        for tensor, name, path in sources:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            piece = handles[path].get_slice(name)
            local, rows = _local_rows(tensor)
            data = piece[rows] if rows is not None else handles[path].get_tensor(name)
            local.copy_(data.to(local.dtype).reshape(local.shape))
            bytes_read += data.numel() * data.element_size()
            checkpoint_bytes += math.prod(piece.get_shape()) * data.element_size()
    return MaterializeReport(bytes_read, checkpoint_bytes, len(sources))


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """(the tensor this process holds, the rows of the whole tensor it holds, or None for all of them).

    FSDP2 shards dimension 0 as torch.chunk does: ceil(rows / processes) rows each, the last ones fewer.
    """
    if not is_dtensor(tensor):
        return tensor, None
    (placement,) = tensor.placements
    local = tensor.to_local()
    if placement.is_replicate():
        return local, None
    if not placement.is_shard(0):
        raise ValueError(f"a tensor sharded as {placement} cannot be read by rows; shard_model shards dim 0")
    rows = tensor.shape[0]
    chunk = math.ceil(rows / tensor.device_mesh.size())
    start = min(tensor.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if (stop - start, *tensor.shape[1:]) != tuple(local.shape):
        raise RuntimeError(
            f"this process holds a shard of shape {tuple(local.shape)}, not rows {start}:{stop} of "
            f"{tuple(tensor.shape)}: FSDP's sharding is not torch.chunk's"
        )
    return local, slice(start, stop)


def _initial_lambdas(model: VeraModel) -> None:
    """lambda_d = d_initial, lambda_b = 0 for every adapter of every layer (each process its own slices)."""
    for _, layer in model.vera_layers():
        for name in layer.r:
            layer.vera_lambda_d[name].fill_(model.peft_config[name].d_initial)
            layer.vera_lambda_b[name].zero_()


def _projection_values(model: VeraModel) -> list[tuple[str, tuple[torch.Tensor, torch.Tensor] | None]]:
    """[(an adapter of the group, a copy of its pair, or None when the pair is on the meta device)] per
    projection group, taken before `to_empty` overwrites the buffers."""
    values = []
    for pair, names in model.projection_groups():
        real = pair.vera_A.device.type != "meta" and pair.vera_B.device.type != "meta"
        values.append((names[0], (pair.vera_A.clone(), pair.vera_B.clone()) if real else None))
    return values


def _restore_projections(
    model: VeraModel, pairs: list[tuple[str, tuple[torch.Tensor, torch.Tensor] | None]]
) -> None:
    """Every group's pair back in place (on the model's device, in its dtype), drawn again from its key where
    no values were kept."""
    for adapter_name, values in pairs:
        pair = model.projections_of(adapter_name)
        if values is None:
            values = regenerate_projections(tuple(pair.vera_A.shape), tuple(pair.vera_B.shape), pair.prng_key)
        model.set_projections(*values, adapter_name=adapter_name)


def _check_same_projections(model: VeraModel) -> None:
    """Every process holds bit-identical pairs (one fingerprint exchange; the pairs themselves are not
    sent)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    fingerprints = [
        projection_fingerprint(pair.vera_A, pair.vera_B, pair.prng_key)["sha256"]
        for pair, _ in model.projection_groups()
    ]
    everyone: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, fingerprints)
    differing = [rank for rank, other in enumerate(everyone) if other != everyone[0]]
    if differing:
        keys = [pair.prng_key for pair, _ in model.projection_groups()]
        raise RuntimeError(
            f"processes {differing} hold other vera_A/vera_B than process 0 (projection_prng_key {keys}); "
            "every process must run the same torch version on the same kind of machine"
        )
