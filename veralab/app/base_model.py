"""Loading a base model for the main job: a local transformers directory, optionally quantized by
bitsandbytes, torchao, optimum-quanto or HQQ (`QUANTIZATIONS`, the `--quantize` choices).

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

from veralab.app.options import QUANTIZATION_ALIASES as ALIASES
from veralab.app.options import QUANTIZATIONS

# Inputs per group of the grouped 4-bit schemes (halved until it divides every linear layer's input size).
GROUP_SIZES = {"torchao-int4": 32}


def check_model_dir(path: str | Path) -> Path:
    """Raise a clear error unless `path` is a local transformers model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--model {str(path)!r} is not a transformers model directory (no config.json in it); pass a "
            "directory written by save_pretrained, or leave --model out for the embedded default"
        )
    return path


def check_quantization(quantization: str | None) -> str | None:
    """The canonical `--quantize` name of `quantization` (aliases resolved), after checking that it is known
    and that its library is installed."""
    if quantization is None:
        return None
    name = ALIASES.get(quantization, quantization)
    if name not in QUANTIZATIONS:
        raise ValueError(
            f"quantization={quantization!r} is invalid: expected one of {list(QUANTIZATIONS)} or None"
        )
    library, extra = QUANTIZATIONS[name]
    if importlib.util.find_spec(library.partition(".")[0]) is None or (
        "." in library and importlib.util.find_spec(library) is None
    ):
        flag = f"--load-in-{quantization}" if quantization in ALIASES else f"--quantize {name}"
        raise ValueError(f"{flag} needs {library}: pip install 'veralab[{extra}]'")
    return name


def group_size(config, preferred: int) -> int:
    """The largest power of two up to `preferred` dividing the input size of every linear layer of the model
    `config` describes (read from the model built on the meta device: no weights are made)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    group = preferred
    while group > 1 and any(size % group for size in sizes):
        group //= 2
    return group


def quantization_config(quantization: str | None, model_config=None, device: torch.device | None = None):
    """The transformers quantization config `from_pretrained` takes for `quantization` (None for full
    precision and for HQQ, which quantizes after loading), after checking the set-up.

    Args:
        quantization: a `QUANTIZATIONS` name or an alias, or None.
        model_config: the model's transformers config (needed for the grouped schemes' group size).
        device: where the model goes (torchao-int4 picks its CUDA layout on a GPU).
    """
    name = check_quantization(quantization)
    if name is None or name == "hqq-4bit":
        return None
    if name.startswith("bnb"):
        from transformers import BitsAndBytesConfig

        if name == "bnb-8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4"
        )
    if name.startswith("quanto"):
        from transformers import QuantoConfig

        return QuantoConfig(weights=name.rpartition("-")[2])
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    if name == "torchao-int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    group = group_size(model_config, GROUP_SIZES[name])
    if device is not None and device.type == "cuda":
        return TorchAoConfig(Int4WeightOnlyConfig(group_size=group))
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)))


def load_model(path: str | Path, quantization: str | None = None, device: torch.device | None = None):
    """Load a causal language model from a local directory, in float32, quantized as `quantization` says.

    Args:
        path: the model directory.
        quantization: None or a `QUANTIZATIONS` name (aliases "4bit" / "8bit" accepted).
        device: where to put the model (default: the CPU; HQQ runs on the CPU).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_model_dir(path)
    device = device or torch.device("cpu")
    name = check_quantization(quantization)
    settings = quantization_config(name, AutoConfig.from_pretrained(path), device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        quantization_config=settings,
        device_map={"": device} if settings is not None else None,
    )
    if name == "hqq-4bit":
        from veralab.fast.backends.hqq import quantize_model

        quantize_model(model, nbits=4, group_size=64)
    if settings is None:
        model.to(device)
    return model


def load_base_model(
    path: str | Path, quantization: str | None = None, device: torch.device | None = None
) -> tuple[nn.Module, object]:
    """Load a causal language model (`load_model`) and its tokenizer from a local directory.

    Args:
        path: the model directory.
        quantization: None or a `QUANTIZATIONS` name (aliases "4bit" / "8bit" accepted).
        device: where to put the model (default: the CPU).
    """
    from transformers import AutoTokenizer

    model = load_model(path, quantization, device)
    return model, AutoTokenizer.from_pretrained(check_model_dir(path))


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
