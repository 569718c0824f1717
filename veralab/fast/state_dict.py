"""One adapter's tensors in memory, under PEFT's key names: `get_peft_model_state_dict` and
`set_peft_model_state_dict`, the drop-ins for PEFT's functions of the same names.

For code that moves adapter weights without files (custom checkpointing, FSDP, sending an adapter between
processes). The keys are those of `adapter_model.safetensors` (`veralab.fast.layout`), without the adapter's
name, so a dict taken from one adapter (of a veralab or a PEFT model) can be set into another:

    from veralab.fast import get_peft_model_state_dict, set_peft_model_state_dict

    weights = get_peft_model_state_dict(model, adapter_name="default")
    set_peft_model_state_dict(other_model, weights, adapter_name="task2")

`set_peft_model_state_dict` is all or nothing: every key, shape and dtype is checked against the adapter's
layout (and saved projections against the model's) before anything is written.
"""

from __future__ import annotations

import warnings
from collections import namedtuple
from typing import TYPE_CHECKING

import torch
from torch import nn

from veralab.fast.layout import PEFT_PREFIX, PROJECTION_FILE_KEYS, Slot, adapter_layout, model_tensors

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel

# What PEFT's (and torch's) load_state_dict returns: the keys left unloaded and the keys nothing took.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def get_peft_model_state_dict(
    model: VeraModel,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed as in PEFT's `adapter_model.safetensors` (no adapter name in them).

    The lambdas (`base_model.model.<layer>.vera_lambda_b` / `vera_lambda_d`), the modules_to_save copies
    (`base_model.model.<module>.<key>`), the biases the bias mode trains, and `base_model.vera_A` /
    `base_model.vera_B` when the adapter's config has `save_projection=True`. The tensors are the model's
    own (detached, on its device, sharing its memory, as `state_dict()` gives them): clone them to keep a
    snapshot.

    Args:
        model: the VeraModel (for torch.compile'd models see `unwrap_compiled`).
        state_dict: take the tensors from this state dict (keys of `model.state_dict()`, e.g. gathered from
            shards) instead of from the model.
        adapter_name: the adapter to take.
        unwrap_compiled: `model` is a torch.compile'd VeraModel: use the model it wraps.
        save_embedding_layers: "auto" or False: an adapter holds its own tensors only, never the base
            model's embedding weights (even where it adapts an embedding, its lambdas are the adapter), so
            True, PEFT's request to add them, is refused.

    Raises:
        KeyError: `adapter_name` is not an adapter of the model.
        ValueError: a `state_dict` that lacks some of the adapter's tensors, or `save_embedding_layers=True`.
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    plan = _plan(model, adapter_name)
    if save_embedding_layers is True:
        raise ValueError(
            "save_embedding_layers=True: a VeRA adapter holds no embedding weights (an adapted embedding "
            "trains its lambdas, which are saved either way), and veralab does not add the base model's; "
            "save resized embeddings with the base model instead, and pass 'auto' or False"
        )
    layout = adapter_layout(model, plan)
    sources = model_tensors(model) if state_dict is None else state_dict
    missing = sorted(slot.model_key for slot in layout.values() if slot.model_key not in sources)
    if missing:
        raise ValueError(
            f"the state_dict passed lacks {len(missing)} tensor(s) of adapter {adapter_name!r}, e.g. "
            f"{missing[:3]}; pass the model's full state_dict() (keys as in model.state_dict()), or none to "
            "read the model itself"
        )
    return {key: sources[slot.model_key].detach() for key, slot in layout.items()}


def set_peft_model_state_dict(
    model: VeraModel,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Write an adapter's tensors (keys as `get_peft_model_state_dict` gives them) into adapter
    `adapter_name`, all or nothing.

    Every key the adapter's layout needs must be there and nothing else, with the right shapes and floating
    dtypes (cast to each parameter's dtype on writing); saved projections must equal the pair the adapter
    reads, unless no other adapter reads that pair, which they then replace. Nothing is written unless
    everything fits. Lambdas still on the meta device (`low_cpu_mem_usage=True` at creation) are materialized
    on their layer's device.

    Args:
        model: the VeraModel.
        peft_model_state_dict: the adapter's tensors.
        adapter_name: the existing adapter to write them into.
        ignore_mismatched_sizes: leave out (with a warning) the tensors whose shape does not fit, instead of
            refusing the whole dict.
        low_cpu_mem_usage: accepted for PEFT compatibility; lambdas on the meta device are materialized
            either way.

    Returns:
        `IncompatibleKeys(missing_keys, unexpected_keys)`: the model keys left out by
        `ignore_mismatched_sizes`, and no unexpected keys (an unexpected key is refused).

    Raises:
        KeyError: `adapter_name` is not an adapter of the model.
        RuntimeError: a tensor whose shape does not fit (as `load_state_dict` raises).
        ValueError: missing or unexpected keys, a tensor that is not floating point, or projections that
            differ from the ones the model's other adapters share.
    """
    layout = adapter_layout(model, _plan(model, adapter_name))
    tensors = dict(peft_model_state_dict)
    _check_keys(model, adapter_name, tensors, layout)
    mismatched = [
        (key, tuple(tensors[key].shape), slot.shape)
        for key, slot in layout.items()
        if tuple(tensors[key].shape) != slot.shape
    ]
    if mismatched and not ignore_mismatched_sizes:
        lines = "".join(
            f"\n\tsize mismatch for {layout[key].model_key}: copying a param with shape {got} from "
            f"checkpoint, the shape in current model is {need}."
            for key, got, need in mismatched
        )
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__}:{lines}\nNothing was written: the "
            f"tensors come from an adapter of another model (other layer sizes) or another rank; pass "
            "ignore_mismatched_sizes=True to load the rest"
        )
    left_out = [key for key, _, _ in mismatched]
    if left_out:
        warnings.warn(
            f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are "
            "being ignored because you passed `ignore_mismatched_sizes=True`: "
            + ", ".join(f"{key}: found shape {got}, the model needs {need}" for key, got, need in mismatched),
            UserWarning,
            stacklevel=2,
        )
    writable = {key: slot for key, slot in layout.items() if key not in left_out}
    _check_projections(model, adapter_name, tensors, writable)
    _write(model, tensors, writable)
    return IncompatibleKeys(missing_keys=[layout[key].model_key for key in left_out], unexpected_keys=[])


def _plan(model: VeraModel, adapter_name: str):
    if adapter_name not in model.peft_config:
        # No quotes inside: str(KeyError) then reads 'name: ...', starting like PEFT's 'name'.
        raise KeyError(
            f"{adapter_name}: not an adapter of this model (it has {', '.join(model.peft_config)}); pass one "
            "of them as adapter_name"
        )
    return model.plan_adapter(adapter_name, model.peft_config[adapter_name], existing=True)


def _check_keys(
    model: VeraModel, adapter_name: str, tensors: dict[str, torch.Tensor], layout: dict[str, Slot]
) -> None:
    missing = sorted(set(layout) - set(tensors))
    unexpected = sorted(set(tensors) - set(layout))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(
                f"missing {len(missing)} key(s) adapter {adapter_name!r} needs, e.g. {missing[:3]}"
            )
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ValueError(
            f"set_peft_model_state_dict: {'; '.join(problems)}. Nothing was written: the dict must hold "
            f"exactly the adapter's tensors as get_peft_model_state_dict gives them (keys starting with "
            f"{PEFT_PREFIX!r}, no adapter name in them), from an adapter with the same config"
        )
    not_float = sorted(key for key in layout if not tensors[key].dtype.is_floating_point)
    if not_float:
        raise ValueError(
            f"set_peft_model_state_dict: {not_float[:3]} have dtype {tensors[not_float[0]].dtype}; adapter "
            "tensors are floating point. Nothing was written."
        )


def _check_projections(
    model: VeraModel, adapter_name: str, tensors: dict[str, torch.Tensor], layout: dict[str, Slot]
) -> None:
    """Saved projections must be the pair the adapter reads, unless it is the only adapter reading it."""
    if not all(key in layout for key in PROJECTION_FILE_KEYS):
        return
    pair = model.projections_of(adapter_name)
    readers = next(names for group, names in model.projection_groups() if group is pair)
    if readers == [adapter_name]:
        return  # its own pair: the dict's replaces it
    if not pair.holds(tuple(tensors[key] for key in PROJECTION_FILE_KEYS)):
        others = [name for name in readers if name != adapter_name]
        raise ValueError(
            f"set_peft_model_state_dict: the dict's vera_A/vera_B differ from the pair adapter "
            f"{adapter_name!r} shares with adapters {others}; replacing it would change them too. Nothing "
            "was written. Set the dict into an adapter of its own (add one with add_adapter, or load the "
            "files under a new adapter_name)."
        )


@torch.no_grad()
def _write(model: VeraModel, tensors: dict[str, torch.Tensor], layout: dict[str, Slot]) -> None:
    targets = model_tensors(model)
    for key, slot in layout.items():
        target = targets[slot.model_key]
        if target.is_meta:
            _materialize(model, slot.model_key, target, tensors[key])
        else:
            target.copy_(tensors[key])


def _materialize(model: VeraModel, model_key: str, meta: nn.Parameter, value: torch.Tensor) -> None:
    """Replace a parameter still on the meta device by one holding `value`, on its layer's device."""
    owner_name, _, leaf = model_key.rpartition(".")  # <layer>.vera_lambda_d, <adapter name>
    owner = model.get_submodule(owner_name)
    layer = model.get_submodule(owner_name.rpartition(".")[0])
    tensor = value.detach().to(device=layer.base_layer.weight.device, dtype=meta.dtype, copy=True)
    setattr(owner, leaf, nn.Parameter(tensor, requires_grad=meta.requires_grad))
