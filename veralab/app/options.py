"""The options of a fine-tune, as plain dataclasses: what the command line fills and `finetune` reads.

They import nothing heavy, so the command line builds its parser (and shows `--help`) without loading torch
or transformers; every option's default lives here once and the command line reads it from the field.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from veralab.config import VeraConfig, is_int, is_real, require

QUANTIZATIONS = ("4bit", "8bit")
# A bound on optimizer steps: the schedule of batches is built up front, so an absurd count would exhaust
# memory before the first step rather than fail.
MAX_STEPS = 10**9


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

    def check(self) -> None:
        """Raise ValueError for an option that can never train (no data needed), saying what is allowed.

        Every number is checked before anything is loaded: `nan`, `inf` and out-of-range values are refused
        here rather than found out after the model loaded, or after training produced a broken adapter.
        """
        if self.epochs is None:
            require(
                is_int(self.steps) and self.steps >= 1,
                "steps",
                self.steps,
                "a positive number of optimizer steps",
            )
            require(self.steps <= MAX_STEPS, "steps", self.steps, f"at most {MAX_STEPS:,} optimizer steps")
        else:
            require(
                is_real(self.epochs) and 0 < self.epochs < math.inf,
                "epochs",
                self.epochs,
                "a positive, finite number of passes",
            )
        require(
            is_int(self.batch_size) and self.batch_size >= 1,
            "batch_size",
            self.batch_size,
            "a positive number of examples per step",
        )
        require(
            is_int(self.max_length) and self.max_length >= 1,
            "max_length",
            self.max_length,
            "a positive number of tokens",
        )
        require(
            is_real(self.learning_rate) and 0 < self.learning_rate < math.inf,
            "learning_rate",
            self.learning_rate,
            "a positive, finite number, e.g. 2e-2",
        )
        require(
            is_real(self.weight_decay) and 0 <= self.weight_decay < math.inf,
            "weight_decay",
            self.weight_decay,
            "a finite number >= 0",
        )
        require(is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed, "an int in [0, 2**63)")

    def validate(self, num_examples: int, world_size: int = 1) -> None:
        """`check`, then what depends on the data and the processes; raises ValueError saying what to use."""
        self.check()
        if self.total_steps(num_examples) > MAX_STEPS:
            raise ValueError(
                f"epochs={self.epochs} over {num_examples} examples is {self.total_steps(num_examples):,} "
                f"steps, more than {MAX_STEPS:,}; ask for fewer epochs"
            )
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
        output: the output directory (created). It must lie outside every input, and when it exists hold
            an earlier fine-tune's output (or nothing) unless `overwrite` (see `veralab.app.outputs`).
        quantization: None, "4bit" or "8bit": load the base model through bitsandbytes.
        vera: the adapter's configuration.
        training: steps, batch, learning rate, ...
        lora_r: the rank of the LoRA the summary compares with.
        progress: show progress bars and messages (rank 0 only).
        overwrite: write into an existing `output` that holds something other than a fine-tune's output.
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
    overwrite: bool = False

    def check(self) -> None:
        """Raise ValueError for an option that can never work (before any file is read or model loaded)."""
        require(
            is_real(self.held_out_fraction) and 0.0 < self.held_out_fraction < 1.0,
            "held_out_fraction",
            self.held_out_fraction,
            "a number in (0, 1), e.g. 0.1",
        )
        require(
            is_int(self.max_eval_examples) and self.max_eval_examples >= 1,
            "max_eval_examples",
            self.max_eval_examples,
            "a positive number",
        )
        require(is_int(self.lora_r) and self.lora_r >= 1, "lora_r", self.lora_r, "a positive LoRA rank")
        require(
            self.quantization in (None, *QUANTIZATIONS),
            "quantization",
            self.quantization,
            f"one of {list(QUANTIZATIONS)} or None",
        )
        self.vera.validate()
        self.training.check()
