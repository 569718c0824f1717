"""Loading a base model for the main job: a local transformers directory, optionally quantized by
bitsandbytes.

No model hub is involved: a model is a directory holding `config.json`, the weights and the tokenizer
files, as written by `save_pretrained`. For sharded training (`--fsdp`) the model is only built, on the meta
device (`build_on_meta`): each process reads its own shards of the weights later
(`veralab.fast.materialize`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

QUANTIZATIONS = ("4bit", "8bit")


def check_model_dir(path: str | Path) -> Path:
    """Raise a clear error unless `path` is a local transformers model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {str(path)!r} is not a transformers model directory (no config.json in it); pass a "
            "directory written by save_pretrained, or leave --model out for the embedded default"
        )
    return path


def quantization_config(quantization: str | None):
    """The BitsAndBytesConfig for "4bit" / "8bit" (None for full precision), after checking the set-up."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization={quantization!r} is invalid: expected one of {list(QUANTIZATIONS)} or None"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--load-in-{quantization} needs bitsandbytes: pip install 'veralab[bnb]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4"
    )


def load_base_model(
    path: str | Path, quantization: str | None = None, device: torch.device | None = None
) -> tuple[nn.Module, object]:
    """Load a causal language model and its tokenizer from a local directory, in float32.

    Args:
        path: the model directory.
        quantization: None, "4bit" or "8bit" (bitsandbytes; the weights are quantized as they load).
        device: where to put the model (default: the CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    device = device or torch.device("cpu")
    quantization_settings = quantization_config(quantization)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        quantization_config=quantization_settings,
        device_map={"": device} if quantization_settings is not None else None,
    )
    if quantization_settings is None:
        model.to(device)
    return model, tokenizer


def build_on_meta(path: str | Path) -> tuple[nn.Module, object]:
    """A causal language model from a local directory's config, on the meta device (shapes only, no memory),
    in float32, and its tokenizer. The weights are read later, shard by shard (`veralab.fast.materialize`).

    Args:
        path: the model directory; its weights must be safetensors files.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if (path / "generation_config.json").is_file():  # what from_pretrained would read next to the weights
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, tokenizer
