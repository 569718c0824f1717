"""What the benchmarks share: the model, the variants, the batch, interleaved timing and the table printer.

The default configuration: a Llama built from its config (hidden 512, intermediate 1376, 4 layers, 8 heads,
vocab 8000), a batch of 8 x 512 tokens in float32 on 2 threads, VeRA r=256 (dropout 0) on every
linear layer of the blocks, AdamW on the trained parameters. `--quick` shrinks everything to a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FROZEN_BASE, PEFT_VERA, VERALAB, PEFT_LORA = "frozen base", "PEFT VeRA", "veralab.fast", "PEFT LoRA r=8"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration (the default full one, or the quick smoke one)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    r: int
    warmup: int
    steps: int


FULL = Setup(
    hidden=512, intermediate=1376, layers=4, heads=8, vocab=8000, batch=8, seq=512, r=256, warmup=1, steps=5
)
QUICK = Setup(
    hidden=64, intermediate=176, layers=1, heads=4, vocab=256, batch=2, seq=32, r=32, warmup=1, steps=2
)


def parse_args(
    description: str, argv: list[str] | None = None, extra: Callable | None = None
) -> argparse.Namespace:
    """The options every benchmark takes: --quick, --steps, --device, --dtype, --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and 2 steps: checks the script runs"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant after warm-up (default 5)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    setup = QUICK if args.quick else FULL
    if args.steps is not None:
        setup = Setup(**{**setup.__dict__, "steps": args.steps})
    args.setup = setup
    return args


def gpu_unavailable_note(args: argparse.Namespace, script: str) -> str | None:
    """None when the run can go ahead; else why the GPU rows are not measured (they are never faked)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return (
            "GPU rows: need a CUDA GPU, and torch.cuda.is_available() is False on this machine; "
            "nothing measured."
        )
    if args.device == "cpu":
        return (
            "GPU rows (bf16, peak memory from torch.cuda.max_memory_allocated) need a CUDA GPU: on one, run "
            f"`python -m benchmarks.{script} --device cuda`"
            + (" (a GPU is available here)." if torch.cuda.is_available() else " (none on this machine).")
        )
    return None


def machine_line(args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    return (
        f"machine: {device} ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, {args.dtype}; setup: {describe(args.setup)}"
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(setup: Setup) -> str:
    return (
        f"Llama hidden {setup.hidden}, intermediate {setup.intermediate}, {setup.layers} layers, "
        f"{setup.heads} heads, vocab {setup.vocab}; batch {setup.batch} x seq {setup.seq}; VeRA r={setup.r} "
        f"on {','.join(TARGETS)}"
    )


def build_base(setup: Setup, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    """The frozen Llama of the benchmark, built from its config (no download), in eval-free train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.heads,
        vocab_size=setup.vocab,
        max_position_embeddings=max(setup.seq, 128),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def build_variant(name: str, base: nn.Module, setup: Setup) -> nn.Module:
    """A fresh copy of `base` adapted as `name` (one of FROZEN_BASE, PEFT_VERA, VERALAB, PEFT_LORA)."""
    model = copy.deepcopy(base)
    if name == FROZEN_BASE:
        return model
    if name == VERALAB:
        from veralab import VeraConfig
        from veralab.fast import get_model

        return get_model(model, VeraConfig(r=setup.r, target_modules=TARGETS, vera_dropout=0.0))
    import peft

    if name == PEFT_VERA:
        config = peft.VeraConfig(r=setup.r, target_modules=TARGETS, vera_dropout=0.0)
    elif name == PEFT_LORA:
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    else:
        raise ValueError(
            f"unknown variant {name!r}; use one of {[FROZEN_BASE, PEFT_VERA, VERALAB, PEFT_LORA]}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(setup: Setup, device: str, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, setup.vocab, (setup.batch, setup.seq), generator=generator).to(device)


class TrainingStep:
    """One training step: forward with the loss, backward all the way to the input embeddings, AdamW.

    Every variant back-propagates to the input embeddings (they require grad), so the frozen base does the
    same backward as the adapted models and the difference between two variants is the adapter alone.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.model = model
        self.ids = ids
        self.parameters = trainable_parameters(model)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-3) if self.parameters else None
        self.embeddings = model.get_input_embeddings()

    def __call__(self) -> None:
        embeds = self.embeddings(self.ids).detach().requires_grad_(True)
        loss = self.model(inputs_embeds=embeds, labels=self.ids).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def interleaved_medians(
    runs: dict[str, Callable[[], object]], warmup: int, steps: int, device: str
) -> dict[str, float]:
    """Median seconds per call of each run, timed interleaved (A B C A B C ...) so drift hits all alike.

    Args:
        runs: name -> a callable doing one step.
        warmup: untimed rounds first.
        steps: timed rounds; the median over them is returned.
        device: "cuda" synchronizes around each timed call.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + steps):
        for name, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, header: list[str], rows: list[list[object]], notes: list[str]) -> None:
    """A GitHub-markdown table under a title line, then one note per line."""
    cells = [[format_cell(c) for c in row] for row in rows]
    widths = [max(len(header[i]), *(len(row[i]) for row in cells)) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print()
    for note in notes:
        print(note)


def format_cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,d}"
    return str(value)


def verdict(value: float, limit: float, strict: bool = False) -> str:
    """'meets' or 'misses' a `<= limit` (or `< limit` when strict) target."""
    ok = value < limit if strict else value <= limit
    return "meets" if ok else "MISSES"


def configure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
