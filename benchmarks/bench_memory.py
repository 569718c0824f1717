"""Memory of training: saved activations of one forward, and peak memory, each variant in its own process.

    python -m benchmarks.bench_memory            # the default configuration (benchmarks/common.py)
    python -m benchmarks.bench_memory --quick    # a smoke run on a tiny model

Saved activations: every tensor autograd saves during one training forward, seen through
`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, parameters and buffers left out (they
exist whether or not anything is saved). Peak memory: the process's peak RSS over a few training steps on the
CPU (`torch.cuda.max_memory_allocated` on a GPU). Each variant runs in a fresh process so that none inherits
another's allocations.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch

from benchmarks.common import (
    DTYPES,
    FROZEN_BASE,
    PEFT_LORA,
    PEFT_VERA,
    VERALAB,
    TrainingStep,
    build_base,
    build_variant,
    configure,
    gpu_unavailable_note,
    machine_line,
    make_batch,
    parse_args,
    print_table,
    verdict,
)
from veralab.fast.diagnostics import saved_activation_bytes

VARIANTS = [FROZEN_BASE, PEFT_VERA, VERALAB, PEFT_LORA]
RESULT_PREFIX = "RESULT "
MB = 2**20


def one_forward_saved_bytes(step: TrainingStep) -> int:
    """Bytes autograd saves in one training forward of the step's model
    (`veralab.fast.diagnostics.saved_activation_bytes`)."""
    embeds = step.embeddings(step.ids).detach().requires_grad_(True)
    return saved_activation_bytes(step.model, lambda: step.model(inputs_embeds=embeds, labels=step.ids).loss)


def measure_variant(name: str, args) -> dict[str, float]:
    """Runs in the child process: the saved bytes of one forward, then the peak memory of training steps."""
    setup, dtype = args.setup, DTYPES[args.dtype]
    model = build_variant(name, build_base(setup, dtype, args.device), setup)
    step = TrainingStep(model, make_batch(setup, args.device))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    saved = one_forward_saved_bytes(step)
    for _ in range(setup.warmup + 2):
        step()
    if args.same_process:
        return {"saved": saved}
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"saved": saved, "peak": float(peak)}


def run_in_own_process(name: str, argv: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.bench_memory", *argv, "--child", name]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"measuring {name!r} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def add_options(parser) -> None:
    parser.add_argument("--child", help="(internal) measure this one variant and print its result")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="measure every variant in this process (fast, for smoke runs): saved activations stay exact, "
        "peak memory is not reported since it would mix the variants",
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(__doc__.splitlines()[0], argv, extra=add_options)
    configure(args)
    note = gpu_unavailable_note(args, "bench_memory")
    if args.device == "cuda" and note:
        print(note)
        return
    if args.child:
        print(RESULT_PREFIX + json.dumps(measure_variant(args.child, args)))
        return

    if args.same_process:
        results = {name: {**measure_variant(name, args), "peak": float("nan")} for name in VARIANTS}
    else:
        results = {name: run_in_own_process(name, argv) for name in VARIANTS}
    base_saved = results[FROZEN_BASE]["saved"]
    peft_peak = results[PEFT_VERA]["peak"]
    peak_label = "peak GPU memory (MB)" if args.device == "cuda" else "peak RSS (MB)"
    rows = [
        [
            name,
            results[name]["saved"] / MB,
            results[name]["saved"] / base_saved,
            results[name]["peak"] / MB,
            results[name]["peak"] / peft_peak,
        ]
        for name in VARIANTS
    ]
    saved_ratio = results[VERALAB]["saved"] / base_saved
    peak_ratio = results[VERALAB]["peak"] / peft_peak
    print_table(
        "Training memory, "
        + ("all variants in this process" if args.same_process else "each variant in its own process"),
        ["variant", "saved activations (MB)", "/ frozen base", peak_label, "/ PEFT VeRA"],
        rows,
        [
            machine_line(args),
            f"saved activations of one training forward, veralab / frozen base: {saved_ratio:.3f} (target <= "
            f"1.12: {verdict(saved_ratio, 1.12)}); PEFT VeRA / frozen base: "
            f"{results[PEFT_VERA]['saved'] / base_saved:.3f}",
            f"{peak_label}, veralab / PEFT VeRA: {peak_ratio:.3f} (target <= 1.0: {verdict(peak_ratio, 1.0)})"
            if not args.same_process
            else "peak memory: not measured with --same-process (run without it: one process per variant)",
        ],
    )
    if note:
        print(note)


if __name__ == "__main__":
    main()
