"""The model card `save_pretrained` writes beside the adapter files: `README.md`, as PEFT writes one.

Hubs and tools recognise an adapter directory by the card's front matter: `library_name: peft`, `base_model`
(when the base model's name is known), tags. veralab's card adds a short text: what the adapter is, its
adapters and targets, and how to load it with veralab and with PEFT.

veralab's card starts with a marker comment (`MARKER`) and is rewritten on every save. A README.md without
the marker is the user's: its text is never changed, only the front-matter keys it lacks (`library_name`,
`base_model`, `tags`) are added, inside its front matter or, when it has none, in a new one at the top.
(PEFT replaces a README's `tags` and `base_model` and appends to its text.)
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

import veralab
from veralab.atomic import update_files
from veralab.fast.layer import VeraLinear
from veralab.fast.layout import PEFT_PREFIX, adapter_directory
from veralab.fast.saving import CONFIG_NAME, base_model_name, config_for_file
from veralab.fast.state_dict import get_peft_model_state_dict

if TYPE_CHECKING:
    from veralab.fast.model import VeraModel

CARD_NAME = "README.md"
MARKER = (
    "<!-- veralab model card: save_pretrained rewrites this file on every save; delete this line to keep "
    "your edits -->"
)
_PLAIN_SCALAR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
# A key at column 0 of a block mapping: plain, or quoted.
_TOP_LEVEL_KEY = re.compile(r"""(?:"([^"]*)"|'([^']*)'|([^\s#:'"?\-][^:]*?))\s*:(?:\s|$)""")


def write_model_card(model: VeraModel, save_directory: str | os.PathLike) -> None:
    """Write veralab's card into `save_directory`, or give the user's README.md the keys it lacks.

    Args:
        model: the VeraModel whose adapters were just saved into `save_directory`.
        save_directory: the directory `save_pretrained` wrote.
    """
    path = Path(save_directory) / CARD_NAME
    front_matter = card_front_matter(model)
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            warnings.warn(
                f"{path} exists but could not be read as UTF-8 text ({e}); it is left as it is",
                UserWarning,
                stacklevel=3,
            )
            return
        if MARKER not in text:
            completed = add_missing_front_matter(text, front_matter)
            if completed is not None and completed != text:
                update_files(save_directory, {CARD_NAME: completed.encode("utf-8")})
            return
    card = render_front_matter(front_matter, "\n") + MARKER + "\n\n" + card_body(model, save_directory)
    update_files(save_directory, {CARD_NAME: card.encode("utf-8")})


def card_front_matter(model: VeraModel) -> dict[str, str | list[str]]:
    """The card's front-matter keys: library_name, base_model (when known), pipeline_tag, tags."""
    name = _base_model_name(model)
    base = model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or []) | {"vera", "veralab"}
    if isinstance(base, transformers.PreTrainedModel):
        tags.add("transformers")
    if name:
        tags.add(f"base_model:adapter:{name}")
    front_matter: dict[str, str | list[str]] = {"library_name": "peft"}
    if name:
        front_matter["base_model"] = name
    if model.peft_config[model.active_adapters[0]].task_type == "CAUSAL_LM":
        front_matter["pipeline_tag"] = "text-generation"
    front_matter["tags"] = sorted(tags)
    return front_matter


def render_front_matter(front_matter: dict[str, str | list[str]], newline: str) -> str:
    """`---` ... `---` YAML front matter (block style), ending with a newline."""
    return "---" + newline + "".join(_yaml_lines(front_matter, newline)) + "---" + newline


def add_missing_front_matter(text: str, front_matter: dict[str, str | list[str]]) -> str | None:
    """`text` with the keys of `front_matter` it lacks added; nothing it holds is changed or removed.

    Keys go at the end of its front matter, or into a new front matter at the top when it has none. Returns
    None when its front matter is not a plain block mapping this can extend safely (it is then left alone).

    Args:
        text: the README's text.
        front_matter: the keys and values to add where missing.
    """
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n") != "---":
        return render_front_matter(front_matter, newline) + text
    closing = next((i for i in range(1, len(lines)) if lines[i].rstrip("\r\n") in ("---", "...")), None)
    if closing is None:
        return None
    body = [line.rstrip("\r\n") for line in lines[1:closing]]
    content = [line for line in body if line.strip() and not line.lstrip().startswith("#")]
    if content and content[0].lstrip().startswith(("{", "[")):
        return None  # flow style: not extended line by line
    present = {
        next(g for g in m.groups() if g is not None) for line in body if (m := _TOP_LEVEL_KEY.match(line))
    }
    missing = {key: value for key, value in front_matter.items() if key not in present}
    if not missing:
        return text
    added = "".join(_yaml_lines(missing, newline))
    return "".join(lines[:closing]) + added + "".join(lines[closing:])


def _yaml_lines(front_matter: dict[str, str | list[str]], newline: str) -> list[str]:
    lines = []
    for key, value in front_matter.items():
        if isinstance(value, list):
            lines.append(f"{key}:{newline}")
            lines.extend(f"- {_yaml_scalar(item)}{newline}" for item in value)
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}{newline}")
    return lines


def _yaml_scalar(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar; plain names stay unquoted.
    return value if _PLAIN_SCALAR.fullmatch(value) else json.dumps(value)


def _base_model_name(model: VeraModel) -> str | None:
    for config in model.peft_config.values():
        name = base_model_name(model, config)
        if name:
            return str(name)
    return None


def card_body(model: VeraModel, save_directory: str | os.PathLike) -> str:
    """The card's Markdown text after the front matter."""
    name = _base_model_name(model)
    on_disk = [n for n in model.peft_config if (adapter_directory(save_directory, n) / CONFIG_NAME).is_file()]
    rows = []
    for adapter in on_disk:
        config = config_for_file(model, model.peft_config[adapter])
        targets = config["target_modules"]
        targets = ", ".join(targets) if isinstance(targets, list) else f"`{targets}`"
        trained = sum(
            tensor.numel()
            for key, tensor in get_peft_model_state_dict(model, adapter_name=adapter).items()
            if key not in (f"{PEFT_PREFIX}vera_A", f"{PEFT_PREFIX}vera_B")
        )
        where = "`./`" if adapter == "default" else f"`{adapter}/`"
        rows.append(f"| {adapter} | {where} | {targets} | {config['r']} | {trained:,d} |")
    base_text = f" for `{name}`" if name else ""
    others = [n for n in on_disk if n != "default"]
    load_others = "".join(
        f'model.load_adapter("path/to/this/directory/{n}", adapter_name="{n}")\n' for n in others
    )
    return f"""# VeRA adapter{base_text}

A [VeRA](https://arxiv.org/abs/2310.11454) (Vector-based Random Matrix Adaptation) adapter{base_text},
trained with veralab and saved in PEFT's format: each adapter is an `adapter_config.json` and an
`adapter_model.safetensors`, and every layer it adapts trains only two small vectors over a pair of frozen
random projections shared by all layers.

| adapter | files | target modules | r | trained parameters |
| --- | --- | --- | ---: | ---: |
{chr(10).join(rows)}

## Loading

Load the base model{f" (`{name}`)" if name else ""} first, then the adapter, with veralab:

```python
from veralab.fast import VeraModel

model = VeraModel.from_pretrained(base_model, "path/to/this/directory")
{load_others}```

{_peft_loading(model, on_disk)}
### Framework versions

- veralab {veralab.__version__}
- transformers {transformers.__version__}
- torch {torch.__version__}
"""


def _peft_loading(model: VeraModel, adapters: list[str]) -> str:
    """How to load the adapters with PEFT, or why PEFT cannot: its VeRA adapts linear layers only."""
    beyond = sorted(
        {
            path
            for path, layer in model.vera_layers()
            if not isinstance(layer, VeraLinear) and any(adapter in layer.r for adapter in adapters)
        }
    )
    if beyond:
        shown = ", ".join(f"`{path}`" for path in beyond[:3]) + (", ..." if len(beyond) > 3 else "")
        return f"""PEFT's VeRA adapts linear layers only and cannot load this adapter: it adapts embeddings or
convolutions ({shown}). `model.save_as_lora(path)` exports it as a standard LoRA adapter with the same
outputs, which PEFT loads.
"""
    return """or with PEFT:

```python
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/directory")
```
"""
