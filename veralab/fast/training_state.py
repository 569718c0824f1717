"""Resuming training: the adapters and the optimizer's state, saved together and loaded back in place.

    save_training_state(model, optimizer, "checkpoint", is_main_process=rank == 0)
    ...                           # later, in a fresh process (the same model and optimizer built again)
    load_training_state(model, optimizer, "checkpoint")
    ...                           # the next steps give what they would have without stopping

The adapters go through `save_pretrained` (PEFT's format, one directory per adapter). The optimizer's state
goes to `optimizer.safetensors` in the same directory, whole: one tensor per parameter and state entry, named
`<parameter name>/<entry>` (e.g. `...q_proj.vera_lambda_b.default/exp_avg`), and the parameter groups
(hyperparameters and parameter names) as JSON in the file's metadata. Whole tensors make the checkpoint
independent of the number of processes: on a sharded model (FSDP2) every process takes part in gathering,
the main one writes, and on loading each process keeps its own slices. safetensors only, never pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from safetensors import safe_open

from veralab.atomic import update_files
from veralab.fast import loading
from veralab.fast.dtensors import copy_full_into, full_tensor, is_dtensor

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel

OPTIMIZER_NAME = "optimizer.safetensors"
GROUPS_KEY = "param_groups"


def save_training_state(
    model: VeraModel,
    optimizer: torch.optim.Optimizer,
    directory: str | os.PathLike,
    is_main_process: bool = True,
) -> None:
    """Save every adapter of `model` and `optimizer`'s state into `directory` (every process calls this on a
    sharded model; only `is_main_process` writes).

    Args:
        model: the VeraModel being trained.
        optimizer: its optimizer, over parameters of `model`.
        directory: the checkpoint directory (created; files written there are replaced atomically).
        is_main_process: whether this process writes.
    """
    model.save_pretrained(directory, is_main_process=is_main_process)
    tensors, groups = optimizer_state_tensors(model, optimizer)
    if is_main_process:
        data = safetensors.torch.save(tensors, metadata={GROUPS_KEY: json.dumps(groups)})
        update_files(directory, {OPTIMIZER_NAME: data})


def load_training_state(
    model: VeraModel, optimizer: torch.optim.Optimizer, directory: str | os.PathLike
) -> None:
    """Restore the adapters of `model` in place and `optimizer`'s state from a `save_training_state`
    directory.

    Args:
        model: the VeraModel, with the same adapters as when it was saved (sharded or not, on any number of
            processes).
        optimizer: an optimizer built as the saved one was, over the same parameters.

    Raises:
        ValueError: the optimizer's parameter groups are not the saved ones.
        AdapterLoadError: an adapter's files do not fit the model.
    """
    path = Path(directory) / OPTIMIZER_NAME
    if not path.is_file():
        raise ValueError(f"{path}: missing; a training checkpoint holds the adapters and {OPTIMIZER_NAME}")
    with safe_open(path, framework="pt", device="cpu") as f:
        groups = json.loads((f.metadata() or {})[GROUPS_KEY])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    state_dict = _optimizer_state_dict(model, optimizer, groups, tensors, path)
    loading.load_checkpoint_adapters(model, directory)
    optimizer.load_state_dict(state_dict)


def optimizer_state_tensors(
    model: VeraModel, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """({"<parameter name>/<entry>": whole CPU tensor}, [param group: hyperparameters and parameter names]).

    On a sharded model this gathers (every process must call it, in the same order).
    """
    names = {id(param): name for name, param in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        unknown = [param for param in group["params"] if id(param) not in names]
        if unknown:
            raise ValueError(
                f"the optimizer holds {len(unknown)} parameter(s) that are not the model's; build it over "
                "the model's parameters after shard_model"
            )
        hyperparameters = {key: _plain(value) for key, value in group.items() if key != "params"}
        groups.append({**hyperparameters, "params": [names[id(param)] for param in group["params"]]})
        for param in group["params"]:
            for entry, value in sorted(optimizer.state.get(param, {}).items()):
                if not isinstance(value, torch.Tensor):
                    raise ValueError(
                        f"optimizer state {entry!r} of {names[id(param)]} is a {type(value).__name__}, not a "
                        "tensor; only tensor state can be saved"
                    )
                whole = full_tensor(value.detach()).to("cpu").contiguous().clone()
                tensors[f"{names[id(param)]}/{entry}"] = whole
    return tensors, groups


def _plain(value):
    """A hyperparameter as JSON can hold it (a tensor learning rate becomes its number)."""
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _optimizer_state_dict(
    model: VeraModel,
    optimizer: torch.optim.Optimizer,
    groups: list[dict],
    tensors: dict[str, torch.Tensor],
    path: Path,
) -> dict:
    """The `optimizer.load_state_dict` input for the saved state, each tensor cut to this process's slice."""
    params = dict(model.named_parameters())
    names = {id(param): name for name, param in params.items()}
    current = [[names.get(id(param)) for param in group["params"]] for group in optimizer.param_groups]
    saved = [group["params"] for group in groups]
    if current != saved:
        raise ValueError(
            f"{path}: the optimizer's parameter groups differ from the saved ones ({sum(map(len, current))} "
            f"parameter(s) now, {sum(map(len, saved))} saved); build the optimizer over the same trainable "
            "parameters, in the same order, as the run that saved it"
        )
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, entry = key.rpartition("/")
        entries.setdefault(name, {})[entry] = tensor
    state, param_groups, index = {}, [], 0
    for group, live in zip(groups, optimizer.param_groups, strict=True):
        indices = []
        for name in group["params"]:
            if name in entries:
                state[index] = {entry: _like_param(t, params[name]) for entry, t in entries[name].items()}
            indices.append(index)
            index += 1
        hyperparameters = {
            key: tuple(value) if isinstance(live.get(key), tuple) else value
            for key, value in group.items()
            if key != "params"
        }
        param_groups.append({**hyperparameters, "params": indices})
    return {"state": state, "param_groups": param_groups}


def _like_param(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole state tensor as the parameter holds it: this process's slice of a sharded parameter's shape."""
    if not is_dtensor(param) or tuple(tensor.shape) != tuple(param.shape):
        return tensor  # scalars such as Adam's step
    local = torch.empty_like(param, dtype=tensor.dtype)
    copy_full_into(local, tensor)
    return local
