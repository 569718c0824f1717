"""Fingerprints of the shared projections: an adapter saved without them is checked when they are regenerated.

Projections not saved (`save_projection=False`) are regenerated from `projection_prng_key`, which PEFT warns
may differ across devices and torch versions (and then gives wrong outputs silently). veralab records a
fingerprint of the projections (sha256 over their float32 bytes, shapes, key and generator) in the
safetensors metadata, checks it when regenerating, and refuses a mismatch. PEFT ignores the metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from veralab.config import is_int
from veralab.fast.errors import AdapterLoadError, ProjectionMismatchError
from veralab.fast.projections import SharedProjections

FINGERPRINT_KEY = "veralab_projections"
GENERATOR = (
    "torch.Generator('cpu').manual_seed(projection_prng_key); kaiming_uniform(gain=sqrt(2)) vera_A (r, "
    "max_in) then vera_B (max_out, r); float32"
)
_FIELDS = ("sha256", "projection_prng_key", "vera_A_shape", "vera_B_shape")


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


def fingerprint_matches(
    fingerprint: dict[str, Any], vera_A: torch.Tensor, vera_B: torch.Tensor, prng_key: int
) -> bool:
    """Whether `vera_A`, `vera_B` drawn from `prng_key` are the projections `fingerprint` describes."""
    return projection_fingerprint(vera_A, vera_B, prng_key)["sha256"] == fingerprint["sha256"]


def regenerate_projections(
    shape_A: tuple[int, ...], shape_B: tuple[int, ...], prng_key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair `projection_prng_key` gives on this machine, on CPU in float32, drawn as the model draws
    it."""
    r, max_in = shape_A
    max_out, _ = shape_B
    pair = SharedProjections.create(r, max_in, max_out, prng_key)
    return pair.vera_A, pair.vera_B


def same_values(reference: torch.Tensor, used: torch.Tensor) -> bool:
    """`used` equals `reference` cast to its dtype (the model may have been cast to bf16/fp16, or moved)."""
    return reference.shape == used.shape and torch.equal(reference.to(used.dtype), used.detach().to("cpu"))


def stored_fingerprint(metadata: dict[str, str], weights_path: Path) -> dict[str, Any] | None:
    """The fingerprint in a safetensors file's metadata (None when it has none), its fields checked.

    Raises:
        AdapterLoadError: the metadata entry is not a fingerprint (wrong JSON, fields missing or of the wrong
            type, shapes that are not two positive ints).
    """
    raw = metadata.get(FINGERPRINT_KEY)
    if raw is None:
        return None
    try:
        fingerprint = json.loads(raw)
    except (ValueError, RecursionError):  # invalid JSON, nested too deeply, integers too long
        fingerprint = None
    if not _well_formed(fingerprint):
        raise AdapterLoadError(
            f"{weights_path}: the {FINGERPRINT_KEY!r} metadata is corrupted (expected a JSON object with "
            f"{sorted(_FIELDS)}: a sha256 hex string, an int key and two shapes of two positive ints, got "
            f"{raw[:80]!r}); save the adapter again"
        )
    return fingerprint


def _well_formed(fingerprint: Any) -> bool:
    if not isinstance(fingerprint, dict) or not set(_FIELDS) <= set(fingerprint):
        return False
    sha, key = fingerprint["sha256"], fingerprint["projection_prng_key"]
    shapes = fingerprint["vera_A_shape"], fingerprint["vera_B_shape"]
    return (
        isinstance(sha, str)
        and is_int(key)
        and all(
            isinstance(shape, list) and len(shape) == 2 and all(is_int(n) and n > 0 for n in shape)
            for shape in shapes
        )
    )


def check_regenerated(
    fingerprint: dict[str, Any],
    regenerated: tuple[torch.Tensor, torch.Tensor],
    prng_key: int,
    config_path: Path,
    weights_path: Path,
) -> None:
    """Refuse regenerated projections that are not the ones the adapter was trained with.

    Args:
        fingerprint: the one stored with the adapter.
        regenerated: the pair this machine draws from `prng_key` at the shapes the model needs.
        prng_key: the config's `projection_prng_key`.
        config_path: the adapter's config file (named when the key disagrees).
        weights_path: the adapter's weights file.

    Raises:
        ProjectionMismatchError: another key, other shapes, or other values than the fingerprint's.
    """
    if fingerprint["projection_prng_key"] != prng_key:
        raise ProjectionMismatchError(
            f"{config_path}: projection_prng_key={prng_key}, but the adapter was trained with projections "
            f"drawn from projection_prng_key={fingerprint['projection_prng_key']} (recorded in "
            f"{weights_path.name}); restore the config's original key"
        )
    saved_shapes = (tuple(fingerprint["vera_A_shape"]), tuple(fingerprint["vera_B_shape"]))
    shapes = (tuple(regenerated[0].shape), tuple(regenerated[1].shape))
    if saved_shapes != shapes:
        raise ProjectionMismatchError(
            f"{weights_path}: the adapter was trained with projections of shapes {saved_shapes}, but this "
            f"model needs {shapes}; it was saved from a model with other layer sizes"
        )
    if not fingerprint_matches(fingerprint, *regenerated, prng_key):
        raise ProjectionMismatchError(
            f"{weights_path}: vera_A/vera_B regenerated from projection_prng_key={prng_key} on this machine "
            f"(torch {torch.__version__}) do not match the fingerprint saved with the adapter (saved with "
            f"torch {fingerprint.get('torch_version', 'unknown')}, sha256 {fingerprint['sha256'][:16]}...). "
            "The file has no projections (save_projection=False) and this machine's generator draws "
            "different ones, so loading it would silently give wrong outputs. To recover: where the adapter "
            "was saved (same torch version and device), load it, set "
            "model.peft_config[<name>].save_projection = True and save it again; that file carries its "
            "projections and loads anywhere."
        )
