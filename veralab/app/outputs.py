"""Where a command writes: never into one of its inputs, never over what it did not write itself.

Each writing command (`finetune`, `merge`, `export-lora`) checks its `--output` before any work:

- it must not be, contain, or lie inside one of the command's inputs (the base model directory, the adapter
  directory, the data files), with symlinks and `..` resolved; `--overwrite` does not change this;
- if it exists it must be a directory, and be empty or hold a veralab output of the same kind, unless
  `--overwrite` is given. A veralab output is recognised by what the command writes anyway, so nothing extra
  is left in the user's directories:

  | command       | recognised by                                                                          |
  | ------------- | -------------------------------------------------------------------------------------- |
  | `finetune`    | a VeRA `adapter_config.json` next to `summary.json`                                    |
  | `export-lora` | a LoRA `adapter_config.json` whose `adapter_model.safetensors` carries the metadata     |
  |               | entry `veralab_exported_from`                                                          |
  | `merge`       | a `config.json` with a `veralab_merged_from` entry (base model and adapter merged)     |

The files a command writes replace their predecessors atomically and together (`veralab.atomic`);
other files in the directory are left alone.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import safe_open

from veralab.fast.layout import CONFIG_NAME, WEIGHTS_NAME
from veralab.fast.lora_export import EXPORT_KEY

MERGE_KEY = "veralab_merged_from"
SUMMARY_NAME = "summary.json"
TRANSFORMERS_CONFIG = "config.json"
# The weight files of a transformers model directory (single files, shards and their indices): a merge
# retires those of an earlier merge that the new one does not write, so stale shards never outlive it.
MODEL_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")

KIND_DESCRIPTIONS = {
    "finetune": f"a veralab fine-tune (a VeRA {CONFIG_NAME} next to {SUMMARY_NAME})",
    "export-lora": f"a LoRA adapter veralab exported ({WEIGHTS_NAME} marked {EXPORT_KEY!r})",
    "merge": f"a model veralab merged ({TRANSFORMERS_CONFIG} with a {MERGE_KEY!r} entry)",
}


def check_output(
    output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], kind: str, overwrite: bool
) -> Path:
    """Refuse an `--output` that would destroy an input or a directory veralab did not write.

    Args:
        output: the output directory.
        inputs: {option that named it (e.g. "--model"): path} of every input of the command (None: unused).
        kind: "finetune", "export-lora" or "merge".
        overwrite: the user passed --overwrite (write into an existing directory of another kind).

    Returns:
        The output directory.

    Raises:
        ValueError: the output is, contains or lies inside an input; or it exists and is not a directory, or
            holds something else than a veralab output of this kind and `overwrite` is False.
    """
    output = Path(output)
    for option, path in inputs.items():
        if path is not None:
            _check_apart(output, option, Path(path))
    if not os.path.lexists(output):
        return output
    if not output.is_dir():
        raise ValueError(f"--output {str(output)!r} exists and is not a directory; name a directory")
    entries = sorted(entry.name for entry in output.iterdir())
    if entries and not overwrite and not is_output_of(output, kind):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(
            f"--output {str(output)!r} already holds files ({shown}) and is not {KIND_DESCRIPTIONS[kind]}; "
            "choose another directory, or pass --overwrite to write into it anyway (the files the command "
            "writes are replaced, others are left alone)"
        )
    return output


def is_output_of(directory: Path, kind: str) -> bool:
    """Whether `directory` holds what `veralab <kind>` writes (see the module docstring)."""
    if kind == "finetune":
        return (
            _json_field(directory / CONFIG_NAME, "peft_type") == "VERA"
            and (directory / SUMMARY_NAME).is_file()
        )
    if kind == "export-lora":
        return _json_field(directory / CONFIG_NAME, "peft_type") == "LORA" and _has_metadata(
            directory / WEIGHTS_NAME, EXPORT_KEY
        )
    return _json_field(directory / TRANSFORMERS_CONFIG, MERGE_KEY) is not None


def mark_merged(config, base_model: str | os.PathLike, adapter: str | os.PathLike) -> None:
    """Record in a merged model's transformers config what was merged (saved in its config.json).

    Args:
        config: the merged model's `PretrainedConfig`.
        base_model: the base model's directory.
        adapter: the adapter's directory.
    """
    setattr(config, MERGE_KEY, {"base_model": str(base_model), "adapter": str(Path(adapter).resolve())})


def retired_by_merge(name: str) -> bool:
    """A transformers weight file a merge replaces (whether or not the new merge writes one of that name)."""
    return MODEL_WEIGHTS.fullmatch(name) is not None


def _check_apart(output: Path, option: str, path: Path) -> None:
    """Refuse `output` when it is, contains, or lies inside `path` (symlinks, `..` and mounts resolved)."""
    out, inp = output.resolve(), path.resolve()
    relation = None
    if out == inp or _same_existing(output, path):
        relation = "is"
    elif out.is_relative_to(inp) or any(_same_existing(parent, path) for parent in output.resolve().parents):
        relation = "lies inside"
    elif inp.is_relative_to(out) or any(_same_existing(parent, output) for parent in inp.parents):
        relation = "contains"
    if relation is not None:
        raise ValueError(
            f"--output {str(output)!r} {relation} the {option} {str(path)!r}: a command never writes into "
            "its own inputs; choose an output directory outside them"
        )


def _same_existing(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _json_field(path: Path, field: str):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data.get(field) if isinstance(data, dict) else None


def _has_metadata(path: Path, key: str) -> bool:
    try:
        with safe_open(path, framework="pt") as f:
            return key in (f.metadata() or {})
    except Exception:  # not a readable safetensors file: not ours
        return False
