"""The model card `save_pretrained` writes beside the adapter files: `README.md`, as PEFT writes one.

Hubs and tools recognise an adapter directory by the card's front matter: `library_name: peft`, `base_model`
(when the base model's name is known), tags. veralab's card adds a short text: what the adapter is, its
adapters and targets, and how to load it with veralab and with PEFT.

veralab's card holds a marker comment (`MARKER`) and is rewritten on every save. A README.md without the
marker is the user's and is never changed, not even its front matter (PEFT replaces a README's `tags` and
`base_model` and appends its text to it): add `library_name: peft` to its front matter for hubs to recognise
the directory.
"""

from __future__ import annotations

import json
import os
import re
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


def write_model_card(model: VeraModel, save_directory: str | os.PathLike) -> None:
    """Write veralab's card for the adapters saved in `save_directory`, unless it holds the user's README.md.

    Args:
        model: the VeraModel whose adapters were just saved into `save_directory`.
        save_directory: the directory `save_pretrained` wrote.
    """
    on_disk = [n for n in model.peft_config if (adapter_directory(save_directory, n) / CONFIG_NAME).is_file()]
    files = card_files(model, save_directory, on_disk)
    if files:
        update_files(save_directory, files)


def card_files(model: VeraModel, directory: str | os.PathLike, adapters: list[str]) -> dict[str, bytes]:
    """{`README.md`: veralab's card describing `adapters`}, or {} when `directory` holds a README.md the
    user wrote (one without `MARKER`, whatever its contents).

    Args:
        model: the VeraModel.
        directory: the directory the card goes into (adapter "default" in it, others in subdirectories).
        adapters: the adapters saved there.
    """
    path = Path(directory) / CARD_NAME
    if os.path.lexists(path) and not (path.is_file() and MARKER.encode() in path.read_bytes()):
        return {}
    card = render_front_matter(card_front_matter(model), "\n") + MARKER + "\n\n" + card_body(model, adapters)
    return {CARD_NAME: card.encode("utf-8")}


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


def card_body(model: VeraModel, on_disk: list[str]) -> str:
    """The card's Markdown text after the front matter, describing the adapters `on_disk`."""
    name = _base_model_name(model)
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
