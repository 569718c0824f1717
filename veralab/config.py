"""VeraConfig: every field, default and rule of PEFT's VeraConfig, as a plain dataclass.

`to_dict()` writes, and `from_dict()` reads, the same JSON PEFT keeps in `adapter_config.json`, so a
config moves between veralab and PEFT unchanged. Invalid values raise `ValueError` naming the field,
the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

BIAS_MODES = ("none", "all", "vera_only")
# The largest finite float32: lambdas are float32, so d_initial must fit in one.
FLOAT32_MAX = 3.4028234663852886e38
# PEFT's bookkeeping fields and the JSON types they hold (None for "not set").
BOOKKEEPING_TYPES = {
    "task_type": str,
    "base_model_name_or_path": str,
    "revision": str,
    "peft_version": str,
    "auto_mapping": dict,
}


@dataclass
class VeraConfig:
    """Configuration of a VeRA adapter (field names, defaults and JSON form of PEFT's `VeraConfig`).

    Args:
        r: rank of the shared random projections. VeRA trains only `r + out` numbers per layer, so
            ranks far above LoRA's (256 and more) are normal.
        target_modules: names of the modules to adapt: a list of name suffixes, a regex matched against
            the full module name, or `"all-linear"`. `None` picks the default targets of the model type.
        projection_prng_key: seed of the CPU generator that draws `vera_A` then `vera_B`.
        save_projection: write `vera_A`/`vera_B` into the adapter file. Without them the file is tiny,
            but the projections must be regenerated on load (veralab verifies them by fingerprint).
        vera_dropout: dropout probability on the adapter's input, in [0, 1).
        d_initial: initial value of every `vera_lambda_d` entry.
        fan_in_fan_out: the target stores its weight as (in, out), like GPT-2's `Conv1D`.
        bias: which biases train: "none", "all", or "vera_only" (biases of adapted layers only).
        modules_to_save: modules besides the VeRA layers that are trained and saved (e.g. a classifier).
        init_weights: `True` starts with `lambda_b = 0` (the adapted model equals the base model);
            `False` draws random non-zero lambdas, for tests.
        layers_to_transform: layer indices to adapt (with `layers_pattern` naming the layer list).
        layers_pattern: name of the `nn.ModuleList` holding the layers (e.g. "layers", "h").

    The remaining fields, `peft_type`, `task_type`, `inference_mode`, `base_model_name_or_path`, `revision`,
    `auto_mapping` and `peft_version`, are the bookkeeping fields of PEFT's adapter_config.json.
    """

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    # PEFT's adapter_config.json bookkeeping.
    peft_type: str = "VERA"
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None

    def __post_init__(self) -> None:
        self.validate()
        if isinstance(self.target_modules, (list, tuple, set)):
            # PEFT turns the list into a set; a sorted list keeps JSON output stable.
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if not self.save_projection:
            warnings.warn(
                "save_projection=False: vera_A/vera_B are not saved with the adapter and will be regenerated "
                "from projection_prng_key on load. veralab stores a fingerprint and refuses a regeneration "
                "that does not match; set save_projection=True for a file that loads everywhere.",
                UserWarning,
                stacklevel=3,
            )

    def validate(self) -> None:
        """Raise ValueError for the first invalid field, naming it, the value and what is allowed."""
        _check(
            is_int(self.r) and self.r > 0,
            "r",
            self.r,
            "a positive int (VeRA ranks of 256 or more are usual)",
        )
        _check(
            is_int(self.projection_prng_key) and 0 <= self.projection_prng_key < 2**64,
            "projection_prng_key",
            self.projection_prng_key,
            "an int in [0, 2**64)",
        )
        _check(
            is_real(self.vera_dropout) and 0.0 <= self.vera_dropout < 1.0,
            "vera_dropout",
            self.vera_dropout,
            "a float in [0, 1)",
        )
        _check(
            is_real(self.d_initial) and abs(self.d_initial) <= FLOAT32_MAX,  # NaN fails the comparison
            "d_initial",
            self.d_initial,
            f"a finite float that fits in float32 (|d_initial| <= {FLOAT32_MAX:.4g}); values <= 0.1 are "
            "recommended",
        )
        _check(self.bias in BIAS_MODES, "bias", self.bias, f"one of {list(BIAS_MODES)}")
        for name in ("save_projection", "fan_in_fan_out", "init_weights", "inference_mode"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        _check(self.peft_type == "VERA", "peft_type", self.peft_type, '"VERA" (this is a VeRA config)')
        for name, kind in BOOKKEEPING_TYPES.items():
            value = getattr(self, name)
            _check(value is None or isinstance(value, kind), name, value, f"a {kind.__name__} or None")
        self._validate_target_modules()
        self._validate_layers()
        if self.modules_to_save is not None:
            _check(
                isinstance(self.modules_to_save, (list, tuple))
                and all(isinstance(m, str) for m in self.modules_to_save),
                "modules_to_save",
                self.modules_to_save,
                "a list of module names or None",
            )

    def _validate_target_modules(self) -> None:
        targets = self.target_modules
        if targets is None or isinstance(targets, str):
            _check(
                targets != "",
                "target_modules",
                targets,
                "a non-empty regex, a list of names, 'all-linear' or None",
            )
            if targets is not None:
                problem = _regex_problem(targets)
                _check(problem is None, "target_modules", targets, f"a valid regular expression ({problem})")
            return
        _check(
            isinstance(targets, (list, tuple, set)) and all(isinstance(t, str) and t for t in targets),
            "target_modules",
            targets,
            "a list of non-empty module names, a regex string, 'all-linear' or None",
        )
        _check(
            len(targets) > 0,
            "target_modules",
            targets,
            "at least one module name (or None for the model's defaults)",
        )

    def _validate_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if is_int(layers) else layers
            _check(
                isinstance(indices, (list, tuple))
                and len(indices) > 0
                and all(is_int(i) and i >= 0 for i in indices),
                "layers_to_transform",
                layers,
                "a non-negative int or a non-empty list of non-negative ints",
            )
        pattern = self.layers_pattern
        if pattern is not None:
            _check(
                layers is not None,
                "layers_pattern",
                pattern,
                "set only together with layers_to_transform (give the layer indices too)",
            )
            names = [pattern] if isinstance(pattern, str) else pattern
            _check(
                isinstance(names, (list, tuple))
                and len(names) > 0
                and all(isinstance(p, str) and p for p in names),
                "layers_pattern",
                pattern,
                "a non-empty string or list of strings such as 'layers' or 'h'",
            )

    # ------------------------------------------------------------------ JSON round trip with PEFT

    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes to adapter_config.json (sets become sorted lists)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return json.loads(json.dumps(out))  # deep copy, JSON types only

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VeraConfig:
        """Build a config from PEFT's adapter_config.json dict; an unknown key is an error, never ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object of VeraConfig fields, got {type(data).__name__}")
        _check_peft_type(data.get("peft_type", "VERA"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown VeraConfig field(s) {unknown}; allowed fields are {sorted(known)} (check the "
                "spelling, or the file is not a VeRA adapter_config.json)"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the save_projection warning is for new configs
            return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> VeraConfig:
        """Read an adapter_config.json; every problem with its content is a ValueError naming the file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except RecursionError as e:
            raise ValueError(f"{path}: not a config: its JSON is nested too deeply to read") from e
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers too long to convert
            raise ValueError(f"{path}: not valid JSON ({e}); the file is truncated or corrupted") from e
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _regex_problem(pattern: str) -> str | None:
    """Why `pattern` is no regular expression Python's `re` accepts (None when it is one)."""
    try:
        re.compile(pattern)
    except re.error as e:
        return f"re.error: {e}"
    except (RecursionError, OverflowError, MemoryError) as e:  # absurdly nested or long patterns
        return f"{type(e).__name__}: the pattern is too large or nested too deeply"
    return None


def is_real(value: Any) -> bool:
    """An int or a float, not a bool (NaN and infinities included: compare to refuse them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `ValueError("<name>=<value> is invalid: expected <allowed>")` unless `ok`.

    Args:
        ok: whether the value is valid.
        name: the setting's name as the user knows it, e.g. "VeraConfig.r" or "learning_rate".
        value: the value received.
        allowed: what is allowed instead.
    """
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


def _check_peft_type(peft_type: Any) -> None:
    """A file of another PEFT method is refused before its fields are read (they would all be unknown)."""
    if peft_type != "VERA":
        raise ValueError(
            f"peft_type={peft_type!r}: this is not a VeRA adapter config; veralab loads peft_type 'VERA' "
            "only (load other adapters with the library that matches their peft_type)"
        )


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    require(ok, f"VeraConfig.{name}", value, allowed)
