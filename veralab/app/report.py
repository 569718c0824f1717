"""What a fine-tune shows at the end: a summary table, a loss-curve PNG and `summary.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunSummary:
    """The numbers of one fine-tune (every field lands in summary.json).

    Args:
        model: the base model's directory.
        data: where the examples came from.
        train_examples, held_out_examples: sizes of the two splits.
        processes: training processes (torchrun's world size).
        adapted_layers: layers VeRA adapted.
        r: VeRA's rank.
        trainable_parameters, total_parameters: the adapted model's counts.
        adapter_bytes: size of the saved adapter weights file.
        projections_saved: whether vera_A / vera_B are in that file (else they are regenerated on load).
        lora_r: rank of the LoRA compared against, on the same layers.
        lora_parameters: that LoRA's trainable parameters.
        steps, batch_size: optimizer steps and global batch.
        train_seconds: wall time of the training loop.
        tokens_per_second: training throughput over all processes.
        total_seconds: wall time of the whole job.
        accuracy_before, accuracy_after: held-out exact match before and after training.
        correct_before, correct_after: the counts behind them.
        losses: the loss of every step.
    """

    model: str
    data: str
    train_examples: int
    held_out_examples: int
    processes: int
    adapted_layers: int
    r: int
    trainable_parameters: int
    total_parameters: int
    adapter_bytes: int
    projections_saved: bool
    lora_r: int
    lora_parameters: int
    steps: int
    batch_size: int
    train_seconds: float
    tokens_per_second: float
    total_seconds: float
    accuracy_before: float
    accuracy_after: float
    correct_before: int
    correct_after: int
    losses: list[float]

    @property
    def lora_bytes(self) -> int:
        """That LoRA's weights in float32 (4 bytes a parameter; the file header is left out)."""
        return 4 * self.lora_parameters

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"lora_bytes": self.lora_bytes}, indent=2) + "\n"


def summary_table(summary: RunSummary) -> str:
    """The end-of-run table, one fact a row."""
    s = summary
    stored = (
        "with vera_A/vera_B" if s.projections_saved else "lambdas only, vera_A/vera_B are regenerated on load"
    )
    rows = [
        ("model", s.model),
        ("data", f"{s.data}: {s.train_examples} train / {s.held_out_examples} held-out examples"),
        ("adapted layers", f"{s.adapted_layers} (VeRA r={s.r})"),
        (
            "trainable parameters",
            f"{s.trainable_parameters:,} of {s.total_parameters:,} "
            f"({100 * s.trainable_parameters / s.total_parameters:.4f}%)",
        ),
        ("adapter on disk", f"{s.adapter_bytes:,} bytes ({stored})"),
        (
            f"LoRA r={s.lora_r}, same layers",
            f"{s.lora_parameters:,} parameters = {s.lora_bytes:,} bytes in float32, "
            f"{s.lora_bytes / max(s.adapter_bytes, 1):.1f}x the VeRA adapter file",
        ),
        (
            "training",
            f"{s.steps} steps x batch {s.batch_size} on {s.processes} process(es): {s.train_seconds:.1f} s, "
            f"{s.tokens_per_second:,.0f} tokens/s",
        ),
        ("loss", f"{s.losses[0]:.4f} (first step) -> {s.losses[-1]:.4f} (last step)"),
        (
            "held-out exact match",
            f"{100 * s.accuracy_before:.1f}% ({s.correct_before}/{s.held_out_examples}) before -> "
            f"{100 * s.accuracy_after:.1f}% ({s.correct_after}/{s.held_out_examples}) after",
        ),
        ("total time", f"{s.total_seconds:.1f} s"),
    ]
    return format_rows("VeRA fine-tune summary", rows)


def format_rows(title: str, rows: list[tuple[str, str]]) -> str:
    """A plain-text table: a title, a rule, one `name  value` line per row (names aligned), a rule."""
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 2 + max(len(value) for _, value in rows))
    return "\n".join([title, rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule])


def plot_loss_curve(losses: list[float], path: Path, title: str) -> None:
    """Save the training loss per step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed (or wanted) on a training machine
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=120)
    axes.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (answer tokens)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
