"""Loading adapters (veralab's or PEFT's) into a model: everything checked first, then all or nothing.

A file's contents are untrusted, sizes included. Loading goes in this order:

1. under a shared lock on the directory (`veralab.atomic.reading`: no save is half done meanwhile, and
   an interrupted one is finished or discarded first), read adapter_config.json and the safetensors
   *header*: tensor names, dtypes, shapes and metadata, no tensor data;
2. plan the adapter in the model (`veralab.fast.layout`) and compare every size the files state with the
   others and with the model's layers: the config's `r` with the lambdas' shapes, the projection shapes
   (saved, or recorded in the fingerprint) with `r` and with the largest layers the model has, every
   tensor's shape and dtype with the layout. Nothing has been allocated for the model yet: a refused load
   uses memory of the order of the header;
3. read the tensor data (at most the file's size) and verify the projections (saved ones against their
   fingerprint, regenerated ones against theirs, `veralab.fast.fingerprint`);
4. change the model, all or nothing (`veralab.fast.rollback`): any failure, KeyboardInterrupt included,
   leaves it exactly as it was.

Only safetensors is read, never pickle. Every problem with the files is an `AdapterLoadError` (a ValueError)
naming the file and what is wrong; lambdas holding NaN/inf, or so large that a layer's adapter term overflows
float32, load with a warning naming the file and layers.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from veralab.atomic import UnfinishedUpdateError, reading
from veralab.config import VeraConfig
from veralab.fast.backends import layer_geometry
from veralab.fast.errors import AdapterLoadError
from veralab.fast.fingerprint import (
    check_regenerated,
    fingerprint_matches,
    regenerate_projections,
    stored_fingerprint,
)
from veralab.fast.layout import (
    CONFIG_NAME,
    DEFAULT_ADAPTER,
    PEFT_PREFIX,
    PICKLE_WEIGHTS_NAME,
    PROJECTION_FILE_KEYS,
    WEIGHTS_NAME,
    Slot,
    adapter_directory,
    adapter_layout,
    check_adapter_name,
    model_tensors,
    planned_layout,
)
from veralab.fast.projections import find_max_dims
from veralab.fast.rollback import all_or_nothing
from veralab.targets import named_layers

# A layer's adapter term beyond this for inputs of magnitude 1 is flagged on load. Trained adapters stay
# orders of magnitude below (r=1024 over 14,336 inputs with lambdas of 100: about 1e9 at most, as the
# projections' entries are below sqrt(6 / fan_in)); past it, the inputs and the layers that follow have
# too little of float32's range (3.4e38) left to stay finite.
OVERFLOW_BOUND = 1e12

if TYPE_CHECKING:
    from veralab.fast.model import AdapterPlan, VeraModel

# Safetensors dtypes: the floating ones an adapter tensor may have, and the torch names of the others (for
# the message that refuses them).
FLOATING_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
OTHER_DTYPES = {
    "I64": "torch.int64",
    "I32": "torch.int32",
    "I16": "torch.int16",
    "I8": "torch.int8",
    "U64": "torch.uint64",
    "U32": "torch.uint32",
    "U16": "torch.uint16",
    "U8": "torch.uint8",
    "BOOL": "torch.bool",
}


@dataclass
class AdapterHeader:
    """What an adapter directory states before any tensor data is read.

    Args:
        config_path: its adapter_config.json.
        weights_path: its adapter_model.safetensors.
        config: the config read from `config_path`.
        shapes: {key: shape} of every tensor in the safetensors header.
        dtypes: {key: safetensors dtype name, e.g. "F32"}.
        metadata: the safetensors metadata.
    """

    config_path: Path
    weights_path: Path
    config: VeraConfig
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


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
    validated before the model is touched, and any failure while changing it (KeyboardInterrupt included)
    restores it exactly.

    Args:
        model: the VeraModel.
        directory: the adapter directory (holding adapter_config.json and adapter_model.safetensors).
        adapter_name: the name to load it under.
        is_trainable: False freezes the adapter and puts the model in eval mode, as PEFT does.
    """
    check_adapter_name(adapter_name)
    existing = adapter_name in model.peft_config
    if existing and adapter_name in model.merged_adapters:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
            "loading new weights into it"
        )

    def plan(header: AdapterHeader) -> tuple[dict[str, Slot], AdapterPlan]:
        header.config.inference_mode = not is_trainable
        with_projections = header.config.save_projection
        with _naming(header.config_path):
            targets = model.plan_adapter(adapter_name, header.config, existing=existing).targets
            shapes = _trained_projection_shapes(model.model, targets, header)
            if existing:
                shapes = None  # its weights are replaced; the pair it reads stays (a file with another fails)
            adapter_plan = model.plan_adapter(
                adapter_name, header.config, existing=existing, projection_shapes=shapes
            )
            layout = adapter_layout(model, adapter_plan, with_projections)
            if existing:
                current = model.plan_adapter(adapter_name, model.peft_config[adapter_name], existing=True)
                _check_same_layout(header, layout, adapter_layout(model, current, with_projections))
        check_header(header, layout)
        return layout, adapter_plan

    files, (layout, adapter_plan) = read_adapter_files(directory, plan)
    projections = verified_projections(files, *adapter_plan.projection_shapes)
    if existing and not model.projections_of(adapter_name).holds(projections):
        raise AdapterLoadError(
            f"{files.weights_path}: the adapter's vera_A/vera_B differ from the ones adapter "
            f"{adapter_name!r} reads; load it under a new adapter_name instead"
        )
    destinations = model_tensors(model)
    with all_or_nothing(model, objects=tuple(pair for pair, _ in model.projection_groups())) as snapshot:
        if existing:
            for slot in layout.values():
                snapshot.keep_values(destinations[slot.model_key])
        else:
            model.add_adapter(adapter_name, files.config, projections=projections)
        _copy_into(model, files, layout)
        if not is_trainable:
            model.eval()
    _warn_non_finite(model, files, layout)


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
    check_adapter_name(adapter_name)

    def plan(header: AdapterHeader) -> tuple[dict[str, Slot], tuple[tuple[int, ...], tuple[int, ...]]]:
        header.config.inference_mode = not is_trainable
        with _naming(header.config_path):
            targets = model_cls.plan_adapter_on(model, adapter_name, header.config).targets
            shapes = _trained_projection_shapes(model, targets, header)
            adapter_plan = model_cls.plan_adapter_on(model, adapter_name, header.config, shapes)
        layout = planned_layout(model, adapter_plan, header.config.save_projection)
        check_header(header, layout)
        return layout, adapter_plan

    files, (layout, adapter_plan) = read_adapter_files(directory, plan)
    projections = verified_projections(files, *adapter_plan.projection_shapes)
    with all_or_nothing(model):
        vera_model = model_cls(model, files.config, adapter_name=adapter_name)
        if not vera_model.projections_of(adapter_name).holds(projections):
            # Projections only the file knows, or a pair larger than the targets need (the adapter shared a
            # larger one when it was trained: a smaller regenerated A is not a slice of it).
            vera_model.set_projections(*projections, adapter_name=adapter_name)
        _copy_into(vera_model, files, layout)
        if not is_trainable:
            vera_model.eval()
    _warn_non_finite(vera_model, files, layout)
    return vera_model


def load_checkpoint_adapters(model: VeraModel, directory: str | os.PathLike) -> None:
    """Restore every adapter of `model` in place from a `save_pretrained` directory (trainability kept)."""
    for name, config in model.peft_config.items():
        load_adapter(model, adapter_directory(directory, name), name, is_trainable=not config.inference_mode)


# ----------------------------------------------------------------------------------------- reading files


def read_adapter_files(
    directory: str | os.PathLike, check: Callable[[AdapterHeader], Any] | None = None
) -> tuple[AdapterFiles, Any]:
    """Read an adapter directory: files present, config valid, safetensors intact; `check` before the data.

    Args:
        directory: the adapter directory.
        check: called with the header (config, tensor shapes and dtypes, metadata) before any tensor data is
            read; it raises to refuse the files, and its result is returned with them.

    Returns:
        The files read, and what `check` returned (None without one).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(
            f"{directory}: no such adapter directory (expected a directory holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME})"
        )
    try:
        with reading(directory), contextlib.ExitStack() as stack:
            config_path, weights_path = _present_files(directory)
            config = _read_config(config_path)
            with _reading_safetensors(weights_path):
                f = stack.enter_context(safe_open(weights_path, framework="pt"))
                header = _read_header(f, config_path, weights_path, config)
            checked = check(header) if check is not None else None
            with _reading_safetensors(weights_path):
                tensors = {key: f.get_tensor(key) for key in header.shapes}
    except UnfinishedUpdateError as e:
        raise AdapterLoadError(str(e)) from e
    files = AdapterFiles(config_path, weights_path, config, tensors, header.metadata)
    return files, checked


def _present_files(directory: Path) -> tuple[Path, Path]:
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
    return config_path, weights_path


def _read_config(path: Path) -> VeraConfig:
    try:
        return VeraConfig.from_json_file(path)
    except OSError as e:
        raise AdapterLoadError(f"{path}: cannot be read ({e.strerror or e})") from e
    except ValueError as e:
        raise AdapterLoadError(str(e)) from e
    except (TypeError, OverflowError, RecursionError) as e:  # JSON of the right syntax, absurd structure
        raise AdapterLoadError(
            f"{path}: not a VeRA adapter config ({type(e).__name__}: {e}); the file is corrupted"
        ) from e


@contextlib.contextmanager
def _reading_safetensors(path: Path) -> Iterator[None]:
    """Any failure of the safetensors reader on this file is the file's problem: an AdapterLoadError."""
    try:
        yield
    except AdapterLoadError:
        raise
    except SafetensorError as e:
        raise AdapterLoadError(
            f"{path}: not a readable safetensors file ({e}); it is truncated or corrupted, save the adapter "
            "again"
        ) from e
    except (OSError, ValueError, TypeError, RuntimeError, OverflowError, RecursionError) as e:
        raise AdapterLoadError(
            f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); it is corrupted, save the "
            "adapter again"
        ) from e


def _read_header(f, config_path: Path, weights_path: Path, config: VeraConfig) -> AdapterHeader:
    metadata = f.metadata() or {}
    shapes, dtypes = {}, {}
    for key in f.keys():
        tensor_slice = f.get_slice(key)
        shapes[key] = tuple(tensor_slice.get_shape())
        dtypes[key] = tensor_slice.get_dtype()
    return AdapterHeader(config_path, weights_path, config, shapes, dtypes, metadata)


# ----------------------------------------------------------------------------------------- validation


def check_header(header: AdapterHeader, layout: dict[str, Slot]) -> None:
    """Every key the model needs is in the file, nothing else is, shapes and dtypes fit (no data read)."""
    missing = sorted(set(layout) - set(header.shapes))
    unexpected = sorted(set(header.shapes) - set(layout))
    if missing:
        raise AdapterLoadError(
            f"{header.weights_path}: missing {len(missing)} tensor(s) the adapter's config implies, e.g. "
            f"{missing[:3]}; the file does not belong to this config (or was written incompletely)"
        )
    if unexpected:
        raise AdapterLoadError(
            f"{header.weights_path}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}; they "
            "match no module this adapter's config targets in the model (was it saved from another "
            "architecture?)"
        )
    for key, slot in layout.items():
        shape = header.shapes[key]
        if shape != slot.shape and slot.model_key in ("vera_A", "vera_B"):
            raise AdapterLoadError(
                f"{header.weights_path}: {key} has shape {shape} but this model's shared projections are "
                f"{slot.shape} (sized by its first adapter, or the file's rank differs from the config's "
                f"r={header.config.r}); load the adapter into a fresh base model with "
                "VeraModel.from_pretrained"
            )
        if shape != slot.shape:
            raise AdapterLoadError(
                f"{header.weights_path}: {key} has shape {shape} but the model needs {slot.shape} (with the "
                f"config's r={header.config.r}); the adapter was saved from a model with other layer sizes "
                "(or another rank)"
            )
        dtype = header.dtypes[key]
        if dtype not in FLOATING_DTYPES:
            raise AdapterLoadError(
                f"{header.weights_path}: {key} has dtype {OTHER_DTYPES.get(dtype, dtype)}; adapter tensors "
                f"are floating point ({', '.join(FLOATING_DTYPES)})"
            )
    stored_fingerprint(header.metadata, header.weights_path)  # a corrupted fingerprint is refused here


def verified_projections(
    files: AdapterFiles, shape_A: tuple[int, ...], shape_B: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections the adapter was trained with, verified: the saved ones (against their fingerprint), or
    the ones its key regenerates at the given shapes (against the fingerprint, or with a warning without one).

    Args:
        files: the adapter, already checked against its layout (so the shapes are the model's).
        shape_A: vera_A's shape in the model.
        shape_B: vera_B's shape in the model.
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
        return vera_A, vera_B
    regenerated = regenerate_projections(shape_A, shape_B, config.projection_prng_key)
    if fingerprint is None:
        warnings.warn(
            f"{files.weights_path} has no vera_A/vera_B and no veralab fingerprint (it was saved by PEFT "
            "with save_projection=False): the projections are regenerated from projection_prng_key over the "
            "adapter's own targets and cannot be verified. Outputs are wrong if this machine's generator "
            "differs from the one it was trained with, or if it was trained as a later adapter of a PEFT "
            "model (PEFT gives later adapters the first one's pair); re-saving it from PEFT with "
            "save_projection=True removes the doubt.",
            UserWarning,
            stacklevel=4,
        )
    else:
        check_regenerated(
            fingerprint, regenerated, config.projection_prng_key, files.config_path, files.weights_path
        )
    return regenerated


def _trained_projection_shapes(
    base: nn.Module, targets: list, header: AdapterHeader
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The projection shapes a fresh model takes for this adapter: the ones it was trained with when the file
    records them (saved tensors, or the fingerprint) and they can serve the targets, else the targets' own.

    Recorded shapes are untrusted: they must agree with the config's r, cover the targets, and stay within
    the largest layers the model has (an adapter added second to a model was trained with the pair the
    first one sized, which never exceeds them). Shapes that do not qualify are left for the header check or
    the fingerprint check to refuse, at the targets' own (model-bounded) size.
    """
    r = header.config.r
    max_in, max_out = find_max_dims([(t.out_features, t.in_features) for t in targets])
    own = (r, max_in), (max_out, r)
    if header.config.save_projection:
        recorded = header.shapes.get(f"{PEFT_PREFIX}vera_A"), header.shapes.get(f"{PEFT_PREFIX}vera_B")
        if recorded[0] is None or recorded[1] is None:
            return own
    else:
        fingerprint = stored_fingerprint(header.metadata, header.weights_path)
        if fingerprint is None:
            return own
        recorded = tuple(fingerprint["vera_A_shape"]), tuple(fingerprint["vera_B_shape"])
    shape_A, shape_B = recorded
    largest_in, largest_out = _largest_layer(base)
    fits = (
        len(shape_A) == 2
        and len(shape_B) == 2
        and shape_A[0] == shape_B[1] == r
        and max_in <= shape_A[1] <= largest_in
        and max_out <= shape_B[0] <= largest_out
    )
    return (shape_A, shape_B) if fits else own


def _largest_layer(base: nn.Module) -> tuple[int, int]:
    """(largest in_features, largest out_features) over every layer of `base` VeRA could adapt."""
    geometries = [g for _, module in named_layers(base) if (g := layer_geometry(module)) is not None]
    return max(g.in_features for g in geometries), max(g.out_features for g in geometries)


def _check_same_layout(header: AdapterHeader, layout: dict[str, Slot], existing: dict[str, Slot]) -> None:
    if layout != existing:
        differing = sorted(set(layout) ^ set(existing)) or sorted(
            k for k in layout if layout[k] != existing[k]
        )
        raise AdapterLoadError(
            f"{header.config_path}: this adapter's config lays out other tensors than the model's adapter of "
            f"the same name (e.g. {differing[:3]}); load it under a new adapter_name"
        )


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Re-raise the model's errors about the adapter's config (targets, sizes) as load errors naming the
    file."""
    try:
        yield
    except AdapterLoadError:
        raise
    except ValueError as e:
        raise AdapterLoadError(f"{path}: this adapter does not fit the model: {e}") from e
    except (TypeError, OverflowError, RecursionError) as e:
        raise AdapterLoadError(
            f"{path}: this adapter's config cannot be applied to the model ({type(e).__name__}: {e})"
        ) from e


# ----------------------------------------------------------------------------------------- writing


@torch.no_grad()
def _copy_into(model: VeraModel, files: AdapterFiles, layout: dict[str, Slot]) -> None:
    """Write the validated tensors into the model (cast to each target's dtype and device)."""
    targets = model_tensors(model)
    for key, slot in layout.items():
        if key not in PROJECTION_FILE_KEYS:  # the adapter reads them already (`verified_projections`)
            targets[slot.model_key].copy_(files.tensors[key])


def _warn_non_finite(model: VeraModel, files: AdapterFiles, layout: dict[str, Slot]) -> None:
    """Warn, naming the file and the layers, when loaded tensors hold NaN/inf (or overflowed their dtype), or
    when finite lambdas are so large that a layer's adapter term overflows float32 (`_overflowing`)."""
    targets = model_tensors(model)
    broken = [key for key, slot in layout.items() if not torch.isfinite(targets[slot.model_key]).all()]
    if broken:
        layers = sorted({key.removeprefix(PEFT_PREFIX + "model.").rpartition(".")[0] for key in broken})
        warnings.warn(
            f"{files.weights_path}: {len(broken)} tensor(s) hold NaN/inf values (after the cast to the "
            f"model's dtype), in {layers[:8]}{' ...' if len(layers) > 8 else ''}; outputs through them are "
            "NaN/inf. The adapter was probably saved from a training that diverged.",
            UserWarning,
            stacklevel=4,
        )
    overflowing = _overflowing(model, targets, layout)
    if overflowing:
        warnings.warn(
            f"{files.weights_path}: the lambdas of {overflowing[:8]}{' ...' if len(overflowing) > 8 else ''} "
            f"are so large that their adapter term exceeds {OVERFLOW_BOUND:.0e} for inputs of magnitude 1; "
            "outputs through them may be NaN/inf. The adapter was probably saved from a training that "
            "diverged.",
            UserWarning,
            stacklevel=4,
        )


def _overflowing(model: VeraModel, targets: dict[str, torch.Tensor], layout: dict[str, Slot]) -> list[str]:
    """The layers whose finite lambdas bound |ΔW x| (inputs of magnitude <= 1) beyond `OVERFLOW_BOUND`.

    The bound, in float64: r * max_in * max|λ_d| * max|λ_b| * max|vera_A| * max|vera_B|.
    """
    lambdas: dict[str, dict[str, torch.Tensor]] = {}
    for slot in layout.values():
        layer, _, rest = slot.model_key.rpartition(".vera_lambda_")
        if layer:
            lambdas.setdefault(layer, {})[rest.partition(".")[0]] = targets[slot.model_key].detach()
    scale = (
        model.vera_A.shape[1]
        * model.vera_A.detach().abs().max().double()
        * model.vera_B.detach().abs().max().double()
    )
    limit = OVERFLOW_BOUND
    found = []
    for layer, pair in sorted(lambdas.items()):
        d, b = pair.get("d"), pair.get("b")
        if d is None or b is None or d.numel() == 0 or b.numel() == 0:
            continue
        if not (torch.isfinite(d).all() and torch.isfinite(b).all()):
            continue  # reported as NaN/inf already
        bound = d.numel() * d.abs().max().double() * b.abs().max().double() * scale
        if bound > limit:
            found.append(layer.removeprefix("model."))
    return found
