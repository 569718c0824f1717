"""Adapter file sizes on disk: veralab next to PEFT for the same adapter, and its exact LoRA export.

One VeRA adapter (random non-zero lambdas) on a Llama with SmolLM2-135M's layer geometry is saved by veralab,
loaded into PEFT and saved again by PEFT, for save_projection True and False; the script checks that both
files hold the same tensors and prints a markdown table of the sizes. The vocabulary is shrunk because
embeddings are not part of the adapter.

    PYTHONPATH=. python benchmarks/adapter_file_sizes.py [--r 256] [--targets q_proj v_proj]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import peft
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from veralab import VeraConfig
from veralab.fast import get_model
from veralab.fast.layout import WEIGHTS_NAME

# SmolLM2-135M's layer geometry (the model `veralab finetune` adapts by default); a small vocabulary.
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=1024,
    tie_word_embeddings=True,
)


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def measure(
    base: torch.nn.Module, r: int, targets: list[str], save_projection: bool, root: Path
) -> dict[str, int]:
    config = VeraConfig(r=r, target_modules=targets, save_projection=save_projection, init_weights=False)
    model = get_model(base, config)
    model.save_pretrained(root / "veralab")
    model.save_as_lora(root / "lora")
    peft_model = peft.PeftModel.from_pretrained(model.unload(), root / "veralab")
    peft_model.save_pretrained(root / "peft")
    ours, theirs = tensors_of(root / "veralab" / WEIGHTS_NAME), tensors_of(root / "peft" / WEIGHTS_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), "files differ"
    peft_model.unload()
    return {name: (root / name / WEIGHTS_NAME).stat().st_size for name in ("veralab", "peft", "lora")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=256)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    print(f"Llama, SmolLM2-135M layers (30 x hidden 576), VeRA r={args.r} on {args.targets}\n")
    print(f"| save_projection | veralab | PEFT | veralab - PEFT | exact LoRA export (r={args.r}) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for save_projection in (True, False):
        with tempfile.TemporaryDirectory() as root:
            sizes = measure(base, args.r, args.targets, save_projection, Path(root))
        print(
            f"| {save_projection} | {sizes['veralab']:,} B | {sizes['peft']:,} B | "
            f"{sizes['veralab'] - sizes['peft']:+,} B | {sizes['lora']:,} B |"
        )


if __name__ == "__main__":
    main()
