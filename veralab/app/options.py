"""The options of a fine-tune, as plain dataclasses: what the command line fills and `finetune` reads.

They import nothing heavy, so the command line builds its parser (and shows `--help`) without loading torch
or transformers; every option's default lives here once and the command line reads it from the field.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from veralab.config import VeraConfig


@dataclass
class TrainingOptions:
    """How to train.

    Args:
        steps: optimizer steps; ignored when `epochs` is set.
        epochs: passes over the training examples (may be fractional); overrides `steps`.
        batch_size: examples per optimizer step, over all processes together.
        max_length: tokens per example at most (the prompt is cut from the left to fit).
        learning_rate: AdamW's learning rate; VeRA wants about ten times LoRA's (1e-2 to 2e-2).
        weight_decay: AdamW's weight decay on the lambdas.
        seed: the shuffle of the examples and dropout.
    """

    steps: int = 30
    epochs: float | None = None
    batch_size: int = 8
    max_length: int = 128
    learning_rate: float = 2e-2
    weight_decay: float = 0.0
    seed: int = 0

    def total_steps(self, num_examples: int) -> int:
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))

    def validate(self, num_examples: int, world_size: int = 1) -> None:
        """Raise ValueError for options that cannot train, saying what to use instead."""
        if self.epochs is None and self.steps < 1:
            raise ValueError(f"steps={self.steps} is invalid: expected a positive number of optimizer steps")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs={self.epochs} is invalid: expected a positive number of passes")
        if self.batch_size < world_size:
            raise ValueError(
                f"batch_size={self.batch_size} is smaller than the {world_size} training processes; the "
                f"batch is split between them, so use a batch of at least {world_size}"
            )
        if self.batch_size > num_examples:
            raise ValueError(
                f"batch_size={self.batch_size} exceeds the {num_examples} training examples; use a smaller "
                "batch"
            )
        if self.learning_rate <= 0:
            raise ValueError(
                f"learning_rate={self.learning_rate} is invalid: expected a positive number, e.g. 2e-2"
            )


def default_vera_config() -> VeraConfig:
    """The main job's VeRA settings: PEFT's, except that the projections are regenerated, not saved.

    With `save_projection=False` the adapter file holds only the lambdas, which is VeRA's point: the pair
    is drawn again from `projection_prng_key` on load (and checked against a stored fingerprint).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the save_projection=False notice: a deliberate choice
        return VeraConfig(save_projection=False)


@dataclass
class FinetuneOptions:
    """Everything the main job needs; the defaults are the embedded demo.

    Args:
        model: a local transformers model directory; None for the embedded SmolLM2-135M-Instruct.
        data: a JSON-lines file of {"prompt", "completion"} examples; None for the embedded alarm task.
        eval_data: held-out examples (JSON lines); None to hold out `held_out_fraction` of `data`.
        held_out_fraction: share of `data`'s prompts held out when `eval_data` is not given.
        max_eval_examples: evaluate on at most this many held-out examples.
        output: the output directory (created; files veralab writes there are replaced).
        quantization: None, "4bit" or "8bit": load the base model through bitsandbytes.
        vera: the adapter's configuration.
        training: steps, batch, learning rate, ...
        lora_r: the rank of the LoRA the summary compares with.
        progress: show progress bars and messages (rank 0 only).
        fsdp: shard the base model over the processes with FSDP2 (`veralab.fast.fsdp`) instead of keeping a
            whole copy on each; `accelerate launch` with an FSDP config turns it on as well.
    """

    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    held_out_fraction: float = 0.1
    max_eval_examples: int = 64
    output: str = "veralab-output"
    quantization: str | None = None
    vera: VeraConfig = field(default_factory=default_vera_config)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    lora_r: int = 8
    progress: bool = True
    fsdp: bool = False
