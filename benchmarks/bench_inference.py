"""Inference: merged and unmerged eval forward, and a batch whose rows use different adapters.

    python -m benchmarks.bench_inference            # the default configuration (benchmarks/common.py)
    python -m benchmarks.bench_inference --quick    # a smoke run on a tiny model

Two tables of medians (variants timed interleaved, no grad): the eval forward of the 8 x 512 batch (base
model,
veralab merged and unmerged, PEFT VeRA unmerged), and a mixed batch of 32 rows x 128 tokens using 32 different
adapters through `adapter_names` against the same batch with one adapter, with 32 separate forward passes and
PEFT for context (PEFT 0.21 accepts `adapter_names` for VeRA; the table says whether its rows are right).
--quick uses 4 rows.
"""

from __future__ import annotations

import sys
import warnings

import peft
import torch

from benchmarks.common import (
    DTYPES,
    FROZEN_BASE,
    PEFT_VERA,
    TARGETS,
    VERALAB,
    Setup,
    build_base,
    build_variant,
    configure,
    gpu_unavailable_note,
    interleaved_medians,
    machine_line,
    make_batch,
    parse_args,
    print_table,
    verdict,
)
from veralab import VeraConfig

# The mixed batch: rows (one adapter each) and tokens per row, for the full run and the quick one.
MIXED = {False: (32, 128), True: (4, 16)}
# The eval table times EVAL_REPEATS x --steps runs per variant: a merged model runs exactly the base model's
# matmuls, so the 3% target sits inside the spread of 5 runs on a shared machine, and these runs are short.
EVAL_REPEATS = 3


def with_random_lambdas(model, seed: int) -> None:
    """Non-zero lambdas (as after training) in every VeRA layer of a veralab or PEFT model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def eval_forward(model, ids: torch.Tensor, **kwargs):
    def run():
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits

    return run


def eval_table(args, setup: Setup, base) -> None:
    ids = make_batch(setup, args.device)
    unmerged = build_variant(VERALAB, base, setup)
    with_random_lambdas(unmerged, seed=0)
    merged = build_variant(VERALAB, base, setup)
    merged.load_state_dict(unmerged.state_dict())
    merged.merge_adapter()
    peft_vera = build_variant(PEFT_VERA, base, setup)
    with_random_lambdas(peft_vera, seed=0)
    models = {
        FROZEN_BASE: base,
        "veralab merged": merged,
        "veralab unmerged": unmerged,
        "PEFT VeRA unmerged": peft_vera,
    }
    for model in models.values():
        model.eval()
    runs = EVAL_REPEATS * setup.steps
    medians = interleaved_medians(
        {name: eval_forward(model, ids) for name, model in models.items()}, setup.warmup, runs, args.device
    )
    merged_ratio = medians["veralab merged"] / medians[FROZEN_BASE]
    unmerged_ratio = medians["veralab unmerged"] / medians["PEFT VeRA unmerged"]
    print_table(
        f"Eval forward (no grad), batch {setup.batch} x {setup.seq}, medians of {runs} interleaved runs",
        ["variant", "forward (s)", "/ base model", "/ PEFT VeRA unmerged"],
        [
            [name, seconds, seconds / medians[FROZEN_BASE], seconds / medians["PEFT VeRA unmerged"]]
            for name, seconds in medians.items()
        ],
        [
            f"merged veralab / base model: {merged_ratio:.3f} (target <= 1.03: "
            f"{verdict(merged_ratio, 1.03)})",
            f"unmerged veralab / unmerged PEFT VeRA: {unmerged_ratio:.3f} (target <= 0.80: "
            f"{verdict(unmerged_ratio, 0.80)})",
        ],
    )


def add_adapters(model, count: int, make_config, seed: int) -> list[str]:
    """Adapters a0 (the model's first, renamed view "default") ... a{count-1}, each with its own lambdas."""
    names = ["default"] + [f"a{i}" for i in range(1, count)]
    for name in names[1:]:
        model.add_adapter(name, make_config())
    for index, name in enumerate(names):
        model.set_adapter(name)
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "vera_lambda_" in param_name and param_name.endswith(f".{name}"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.set_adapter("default")
    return names


def separate_passes(model, ids: torch.Tensor, names: list[str]):
    """The batch as one forward pass per row, each with its row's adapter active."""

    def run():
        with torch.no_grad():
            outputs = []
            for row, name in enumerate(names):
                model.set_adapter(name)
                outputs.append(model(input_ids=ids[row : row + 1]).logits)
            model.set_adapter(names[0])
            return torch.cat(outputs)

    return run


def peft_mixed_batch(model, ids: torch.Tensor, names: list[str]):
    """PEFT's forward with adapter_names, as a user would call it."""

    def run():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(input_ids=ids, adapter_names=names).logits

    return run


def rows_right(run, expected: torch.Tensor | None) -> str:
    """Whether `run` gives the `expected` rows ("fails: ..." when it raises; "(reference)" for no
    expectation)."""
    try:
        output = run()
    except Exception as error:  # PEFT may refuse or crash: the table says so instead of a number
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:60]}"
    if expected is None:
        return "(reference)"
    tolerance = 100 * torch.finfo(output.dtype).eps * expected.abs().max().item()
    return "yes" if (output - expected).abs().max().item() <= tolerance else "NO: rows get another adapter"


def mixed_table(args, setup: Setup, base) -> None:
    adapters, seq = MIXED[args.quick]
    mixed_setup = Setup(**{**setup.__dict__, "batch": adapters, "seq": seq})
    ids = make_batch(mixed_setup, args.device, seed=3)
    ours = build_variant(VERALAB, base, setup).eval()
    names = add_adapters(ours, adapters, lambda: VeraConfig(r=setup.r, target_modules=TARGETS), seed=10)
    theirs = build_variant(PEFT_VERA, base, setup).eval()
    add_adapters(theirs, adapters, lambda: peft.VeraConfig(r=setup.r, target_modules=TARGETS), seed=10)

    ours_separately, ours_plain = separate_passes(ours, ids, names), eval_forward(ours, ids)
    expected_rows, expected_one = ours_separately(), ours_plain()
    # name -> (the run, the output it must give; None for a reference itself)
    runs = {
        f"veralab, {adapters} adapters (adapter_names)": (
            eval_forward(ours, ids, adapter_names=names),
            expected_rows,
        ),
        "veralab, 1 adapter (adapter_names)": (
            eval_forward(ours, ids, adapter_names=[names[0]] * adapters),
            expected_one,
        ),
        "veralab, 1 adapter (plain forward)": (ours_plain, None),
        f"veralab, {adapters} separate forward passes": (ours_separately, None),
        f"PEFT VeRA, {adapters} adapters (adapter_names)": (
            peft_mixed_batch(theirs, ids, names),
            separate_passes(theirs, ids, names)(),
        ),
    }
    correct = {name: rows_right(run, expected) for name, (run, expected) in runs.items()}
    timed = {name: run for name, (run, _) in runs.items() if not correct[name].startswith("fails")}
    medians = interleaved_medians(timed, setup.warmup, setup.steps, args.device)
    one = medians["veralab, 1 adapter (adapter_names)"]
    mixed = medians[f"veralab, {adapters} adapters (adapter_names)"]
    print_table(
        f"Mixed batch, {adapters} rows x {mixed_setup.seq} tokens (no grad), medians of {setup.steps} "
        "interleaved runs",
        ["variant", "forward (s)", "/ veralab 1 adapter (adapter_names)", "rows right"],
        [
            [name, medians.get(name, float("nan")), medians.get(name, float("nan")) / one, correct[name]]
            for name in correct
        ],
        [
            f"{adapters} different adapters / one adapter, same batch through adapter_names: "
            f"{mixed / one:.3f} (target <= 1.1: {verdict(mixed / one, 1.1)})",
        ],
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    configure(args)
    note = gpu_unavailable_note(args, "bench_inference")
    if args.device == "cuda" and note:
        print(note)
        return
    setup = args.setup
    base = build_base(setup, DTYPES[args.dtype], args.device).eval()
    print(machine_line(args))
    eval_table(args, setup, base)
    mixed_table(args, setup, base)
    if note:
        print(note)


if __name__ == "__main__":
    main(sys.argv[1:])
