"""Training-step time: frozen base, PEFT VeRA, veralab.fast and PEFT LoRA r=8, timed interleaved in one run.

    python -m benchmarks.bench_training            # the default configuration (a few minutes on 2 cores)
    python -m benchmarks.bench_training --quick    # a smoke run on a tiny model

Prints one table of medians and ratios, the targets, and the cost model's predicted limit for the adapter
overhead (the cost model of docs/design.md, multiply-adds of the adapted layers).
"""

from __future__ import annotations

import sys

import torch

from benchmarks.common import (
    DTYPES,
    FROZEN_BASE,
    PEFT_LORA,
    PEFT_VERA,
    VERALAB,
    Setup,
    TrainingStep,
    build_base,
    build_variant,
    configure,
    gpu_unavailable_note,
    interleaved_medians,
    machine_line,
    make_batch,
    parse_args,
    print_table,
    trainable_parameters,
    verdict,
)
from veralab.fast.diagnostics import layers_sharing_inputs
from veralab.fast.dispatch import path_costs

VARIANTS = [FROZEN_BASE, PEFT_VERA, VERALAB, PEFT_LORA]


def predicted_overhead_ratio(model, setup: Setup, dtype: torch.dtype) -> tuple[float, float, float]:
    """(veralab's, PEFT VeRA's adapter multiply-adds per step, their ratio) by the cost model.

    PEFT adds 2·N·r·(in+out) per layer (forward and backward); veralab adds the cost of the path its dispatch
    picks for a training step (`path_costs`), with h = x A_s^T counted once per group of layers sharing it.
    """
    tokens = setup.batch * setup.seq
    ours = theirs = 0
    ids = make_batch(setup, "cpu")[:1, :16]
    for group in layers_sharing_inputs(model, lambda: model(input_ids=ids)):
        for position, (_, layer) in enumerate(group):
            x = torch.empty(tokens, layer.in_features, dtype=dtype, device="meta", requires_grad=True)
            path = layer.plan(x).path
            cost = path_costs(tokens, layer.in_features, layer.out_features, setup.r, needs_grad=True)[path]
            if position > 0:
                cost -= tokens * setup.r * layer.in_features  # h is computed by the group's first layer
            ours += cost
            theirs += 2 * tokens * setup.r * (layer.in_features + layer.out_features)
    return ours, theirs, ours / theirs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    configure(args)
    note = gpu_unavailable_note(args, "bench_training")
    if args.device == "cuda" and note:
        print(note)
        return
    setup, dtype = args.setup, DTYPES[args.dtype]
    base = build_base(setup, dtype, args.device)
    ids = make_batch(setup, args.device)
    models = {name: build_variant(name, base, setup) for name in VARIANTS}
    steps = {name: TrainingStep(model, ids) for name, model in models.items()}
    medians = interleaved_medians(steps, setup.warmup, setup.steps, args.device)

    base_time = medians[FROZEN_BASE]
    peft_overhead = medians[PEFT_VERA] - base_time
    trainable = {name: sum(p.numel() for p in trainable_parameters(m)) for name, m in models.items()}
    rows = [
        [
            name,
            trainable[name],
            medians[name],
            medians[name] / base_time,
            (medians[name] - base_time) / peft_overhead if name != FROZEN_BASE else 0.0,
            medians[name] / medians[PEFT_LORA],
        ]
        for name in VARIANTS
    ]
    ours, theirs, predicted = predicted_overhead_ratio(models[VERALAB], setup, dtype)
    overhead_ratio = (medians[VERALAB] - base_time) / peft_overhead
    lora_ratio = medians[VERALAB] / medians[PEFT_LORA]
    print_table(
        f"Training step, medians of {setup.steps} interleaved steps after {setup.warmup} warm-up",
        [
            "variant",
            "trainable params",
            "step (s)",
            "/ frozen base",
            "overhead / PEFT VeRA overhead",
            "/ PEFT LoRA r=8",
        ],
        rows,
        [
            machine_line(args),
            f"adapter overhead, (veralab - base) / (PEFT VeRA - base): {overhead_ratio:.3f} (target <= 0.35: "
            f"{verdict(overhead_ratio, 0.35)}); cost-model limit {predicted:.3f} ({ours / 1e9:.1f} vs "
            f"{theirs / 1e9:.1f} GMAC of adapter work per step)",
            f"headline, veralab VeRA r={setup.r} step / PEFT LoRA r=8 step: {lora_ratio:.3f} (target < 1.0: "
            f"{verdict(lora_ratio, 1.0, strict=True)}), training "
            f"{trainable[PEFT_LORA] / trainable[VERALAB]:.1f}x fewer parameters",
        ],
    )
    if note:
        print(note)


if __name__ == "__main__":
    main(sys.argv[1:])
