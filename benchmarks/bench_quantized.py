"""Training over quantized bases: step time and peak memory of veralab.fast and PEFT VeRA over every
quantization backend installed here, against the float32 base, in one run (each row in its own process).

    python -m benchmarks.bench_quantized            # the benchmark Llama, batch 4 x 128 (~6 min on 2 cores)
    python -m benchmarks.bench_quantized --quick    # a smoke run on a tiny model

The base is the benchmark Llama (benchmarks/common.py), saved once and loaded by each process as
`veralab finetune --quantize` loads it (`veralab.app.base_model.load_model`). Columns: the bytes the base's
weights take (quantized codes and their scales), the median training step (forward, backward to the input
embeddings, AdamW), its ratio to veralab over the float32 base and to PEFT VeRA over the same base, and the
process's peak RSS. PEFT rows say "n/a" where PEFT refuses the base or fails on it (the note says why).
Timings come from separate processes, run one after another: ratios within 10% are noise on a busy machine.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from benchmarks.common import (
    FULL,
    PEFT_VERA,
    QUICK,
    TARGETS,
    VERALAB,
    TrainingStep,
    build_base,
    configure,
    machine_line,
    make_batch,
    parse_args,
    print_table,
)
from veralab.app.options import QUANTIZATIONS
from veralab.fast.backends import unavailable_reason
from veralab.fast.diagnostics import weight_bytes

FLOAT = "float32"
RESULT_PREFIX = "RESULT "
MB = 2**20
# Shorter sequences than the other benchmarks: quantized CPU kernels dequantize on every call. Ten timed steps
# after two untimed ones: a step takes ~0.5 s, and the median of three is at the mercy of one slow step.
SETUP = replace(FULL, batch=4, seq=128, warmup=2, steps=10)


def adapt(model: torch.nn.Module, implementation: str, r: int) -> torch.nn.Module:
    if implementation == VERALAB:
        from veralab import VeraConfig
        from veralab.fast import get_model

        return get_model(model, VeraConfig(r=r, target_modules=TARGETS, vera_dropout=0.0))
    import peft

    return peft.get_peft_model(model, peft.VeraConfig(r=r, target_modules=TARGETS, vera_dropout=0.0))


def measure(path: str, quantization: str, implementation: str, setup) -> dict[str, float]:
    """Load, adapt, time training steps, read the peak RSS (in the child process, or this one)."""
    import warnings

    from veralab.app.base_model import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(path, None if quantization == FLOAT else quantization)
        weights = weight_bytes(model)
        step = TrainingStep(adapt(model, implementation, setup.r), make_batch(setup, "cpu"))
        times = []
        for index in range(setup.warmup + setup.steps):
            start = time.perf_counter()
            step()
            if index >= setup.warmup:
                times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"weights": weights, "step": statistics.median(times), "peak": float(peak)}


def run_child(argv: list[str], path: str, quantization: str, implementation: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_quantized", *argv, "--child", path, quantization]
    command.append(implementation)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        last = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        return {"error": last[-1][:160] if last else f"exit {completed.returncode}"}
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def add_options(parser) -> None:
    parser.add_argument("--child", nargs=3, help="(internal) PATH QUANTIZATION IMPLEMENTATION: measure one")
    parser.add_argument(
        "--only", help="comma-separated bases to measure (default: float32 and every backend installed)"
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="measure every row in this process (fast, for smoke runs): no peak memory",
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(__doc__.splitlines()[0], argv, extra=add_options)
    configure(args)
    setup = QUICK if args.quick else SETUP
    if args.steps is not None:
        setup = replace(setup, steps=args.steps)
    args.setup = setup
    if args.child:
        path, quantization, implementation = args.child
        print(RESULT_PREFIX + json.dumps(measure(path, quantization, implementation, setup)))
        return
    bases = [FLOAT, *QUANTIZATIONS] if args.only is None else args.only.split(",")
    notes = []
    available = []
    for name in bases:
        reason = None if name == FLOAT else unavailable_reason(QUANTIZATIONS[name][0])
        if name == "torchao-int4":
            notes.append("torchao-int4 on a CPU: IntxWeightOnlyConfig, int4 in groups of 32")
        if reason is None:
            available.append(name)
        else:
            notes.append(f"{name}: not measured, {reason}")
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        build_base(setup, torch.float32, "cpu").save_pretrained(directory)
        for name in available:
            for implementation in (VERALAB, PEFT_VERA):
                if args.same_process:
                    try:
                        result = measure(directory, name, implementation, setup)
                    except Exception as error:  # PEFT refusing a base, say
                        result = {"error": f"{type(error).__name__}: {str(error)[:140]}"}
                    results[name, implementation] = {**result, "peak": None}
                else:
                    results[name, implementation] = run_child(argv, directory, name, implementation)
    reference = results[FLOAT, VERALAB]["step"] if "step" in results.get((FLOAT, VERALAB), {}) else None
    rows = []
    for (name, implementation), result in results.items():
        if "error" in result:
            notes.append(f"{implementation} over {name}: n/a, {result['error']}")
            rows.append([name, implementation, "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        peft = results.get((name, PEFT_VERA), {})
        rows.append(
            [
                name,
                implementation,
                result["weights"] / MB,
                result["step"] * 1000,
                result["step"] / reference if reference else "n/a",
                result["step"] / peft["step"] if "step" in peft else "n/a",
                result["peak"] / MB if result["peak"] is not None else "n/a",
            ]
        )
    print_table(
        "Training step over quantized bases, "
        + ("all rows in this process" if args.same_process else "each row in its own process"),
        [
            "base",
            "implementation",
            "base weights (MB)",
            "step (ms)",
            "/ veralab float32",
            "/ PEFT same base",
            "peak RSS (MB)",
        ],
        rows,
        [machine_line(args), *notes],
    )


if __name__ == "__main__":
    main()
