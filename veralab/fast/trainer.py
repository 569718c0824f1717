"""transformers.Trainer with VeraModel: checkpoints hold the adapter, not the base model, and resume exactly.

A plain `Trainer` special-cases PEFT's `PeftModel` only; any other model has its whole state dict written to
`model.safetensors` in every checkpoint (the frozen base model included), and resuming loads it back.
`VeraTrainerMixin` overrides the three places that touch model weights (`_save`, `_load_from_checkpoint`,
`_load_best_model`) to write and read the adapter files of `VeraModel.save_pretrained` instead. The
optimizer, scheduler and RNG states stay the Trainer's own business; the adapter weights are restored in
place, so the restored optimizer state still refers to them. Like the Trainer does for PEFT models, it reads
label names off the wrapped model's class (the class `VeraModel.forward` takes `**kwargs`).

    trainer = VeraTrainer(model=vera_model, args=TrainingArguments(...), train_dataset=...)
    trainer.train(resume_from_checkpoint=True)

`VeraTrainerMixin` also composes with other Trainer subclasses:
`class MyTrainer(VeraTrainerMixin, SFTTrainer)`.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from veralab.fast import loading
from veralab.fast.model import VeraModel


class VeraTrainerMixin:
    """Checkpoint a `VeraModel` as its adapters (PEFT's format); anything else is left to the Trainer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vera_model = self._vera_model()
        if vera_model is not None:
            base_class = type(vera_model.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base_class)
            self.can_return_loss = can_return_loss(base_class)

    def _vera_model(self, model=None) -> VeraModel | None:
        model = self.accelerator.unwrap_model(
            model if model is not None else self.model, keep_torch_compile=False
        )
        return model if isinstance(model, VeraModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        vera_model = self._vera_model()
        if vera_model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        vera_model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # The Trainer keeps its arguments next to every checkpoint (its own format, not the adapter's).
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        vera_model = self._vera_model(model)
        if vera_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        loading.load_checkpoint_adapters(vera_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        vera_model = self._vera_model()
        if vera_model is None:
            return super()._load_best_model()
        loading.load_checkpoint_adapters(vera_model, self.state.best_model_checkpoint)


class VeraTrainer(VeraTrainerMixin, Trainer):
    """`transformers.Trainer` that checkpoints a `VeraModel` as adapter files and resumes from them."""
