"""What each process of a fine-tune holds and spends: one process, DistributedDataParallel, FSDP2.

    python -m benchmarks.bench_scaling            # 2 processes on the CPU (gloo), the configuration below
    python -m benchmarks.bench_scaling --quick    # a smoke run on a tiny model

A Llama checkpoint (built from its config, saved as safetensors in a temporary directory) is fine-tuned with
VeRA for a few AdamW steps on a fixed global batch, three ways, each in fresh processes:

- **1 process**: `from_pretrained` + `get_model`, the whole global batch;
- **DDP x N**: the same on each of N processes under torchrun, each on 1/N of the batch's rows
  (`veralab.app.train.wrap_for_cluster`, as `veralab finetune` does);
- **FSDP2 x N**: built on the meta device, `shard_model`, `materialize` (each process reads its own shards),
  each process on 1/N of the rows (as `veralab finetune --fsdp` does).

Per process: the base bytes it keeps between steps (`veralab.fast.fsdp.resident_bytes`, its shards when
sharded), the checkpoint bytes it reads, its RSS above what it held before building the model (every import
paid): held after start-up, peak over start-up, peak over start-up and training (Linux's VmHWM, reset before
building), and the median step time. The largest process of each row is shown (the ranks differ by padding
only). Times on a shared CPU are only comparable within one run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import DTYPES, TARGETS, Setup, build_base, cpu_name, print_table

MB = 2**20
PROCESSES = 2
MODES = {"single": "1 process", "ddp": f"DDP x {PROCESSES}", "fsdp": f"FSDP2 x {PROCESSES}"}


# More layers and a smaller batch than the other benchmarks: the base, not the activations, should dominate.
FULL = Setup(
    hidden=512, intermediate=1376, layers=8, heads=8, vocab=8000, batch=4, seq=256, r=256, warmup=1, steps=5
)
QUICK = Setup(
    hidden=64, intermediate=176, layers=2, heads=4, vocab=256, batch=2, seq=32, r=32, warmup=1, steps=2
)


def describe(setup: Setup, dtype: str) -> str:
    return (
        f"Llama hidden {setup.hidden}, intermediate {setup.intermediate}, {setup.layers} layers, vocab "
        f"{setup.vocab}, {dtype}; global batch {setup.batch} x seq {setup.seq}; VeRA r={setup.r} on "
        f"{','.join(TARGETS)}; AdamW, median of {setup.steps} steps after {setup.warmup} warm-up step(s)"
    )


def save_checkpoint(setup: Setup, dtype: torch.dtype, directory: Path) -> int:
    """The benchmark's Llama, saved as safetensors; returns its tensor bytes."""
    model = build_base(setup, dtype, "cpu")
    model.save_pretrained(directory)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def memory_status() -> dict[str, int]:
    """{"VmRSS": bytes resident now, "VmHWM": peak bytes resident since the last `reset_peak()`}."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> None:
    """Start the peak RSS (VmHWM) over from the current RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def worker(mode: str, checkpoint: Path, setup: Setup, dtype: torch.dtype, out: Path) -> None:
    """One process of one row: build, train, write what it measured to out/<mode>.rank<N>.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from veralab.app.distributed import Cluster
    from veralab.app.train import wrap_for_cluster
    from veralab.config import VeraConfig
    from veralab.fast import get_model
    from veralab.fast.fsdp import resident_bytes, shard_model
    from veralab.fast.materialize import materialize

    cluster = Cluster.from_environment()
    config = VeraConfig(r=setup.r, target_modules=TARGETS, vera_dropout=0.0)
    with torch.device("meta"):  # every lazy import of building the model, paid before the baseline
        get_model(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=dtype), config
        )
    reset_peak()
    before = memory_status()["VmRSS"]
    if mode == "fsdp":
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=dtype)
        model = get_model(base, config)
        shard_model(model)
        bytes_read = materialize(model, checkpoint).bytes_read
    else:
        model = get_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype), config)
        bytes_read = None  # from_pretrained reads the whole checkpoint
    startup = memory_status()
    held = resident_bytes(model)
    trained = wrap_for_cluster(model, cluster)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(3, setup.vocab, (setup.batch, setup.seq), generator=torch.Generator().manual_seed(1))
    mine = cluster.shard(list(ids))
    local = torch.stack(mine)
    times = []
    model.train()
    for step in range(setup.warmup + setup.steps):
        start = time.perf_counter()
        trained(input_ids=local, labels=local).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cluster.barrier()
        if step >= setup.warmup:
            times.append(time.perf_counter() - start)
    result = {
        "base": held.base,
        "adapter": held.adapter,
        "projections": held.projections,
        "bytes_read": bytes_read,
        "startup_held": startup["VmRSS"] - before,
        "startup_peak": startup["VmHWM"] - before,
        "training_peak": memory_status()["VmHWM"] - before,
        "step": statistics.median(times),
    }
    (out / f"{mode}.rank{cluster.rank}.json").write_text(json.dumps(result))
    cluster.barrier()
    cluster.close()


def run_mode(mode: str, checkpoint: Path, args, out: Path) -> list[dict]:
    """Start the row's processes (torchrun for DDP and FSDP2) and read what each measured."""
    worker_args = ["-m", "benchmarks.bench_scaling", "--worker", mode, "--checkpoint", str(checkpoint)]
    worker_args += ["--out", str(out), "--dtype", args.dtype, *(["--quick"] if args.quick else [])]
    worker_args += ["--steps", str(args.setup.steps)]
    if mode == "single":
        command = [sys.executable, *worker_args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
            *worker_args,
        ]  # fmt: skip
    # Large blocks always from mmap, returned to the system when freed: without it glibc raises its mmap
    # threshold after the first large free and keeps freed tensors in its heap, so RSS would show the
    # allocator's high-water mark rather than what the process needs.
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_=str(2**20))
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{MODES[mode]} failed:\n{completed.stderr[-4000:]}")
    ranks = 1 if mode == "single" else PROCESSES
    return [json.loads((out / f"{mode}.rank{rank}.json").read_text()) for rank in range(ranks)]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and 2 steps: checks the script runs"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps after warm-up (default 5)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    if args.steps is not None:
        setup = replace(setup, steps=args.steps)
    args.setup = setup
    dtype = DTYPES[args.dtype]
    if args.worker:
        torch.set_num_threads(args.threads)
        worker(args.worker, args.checkpoint, setup, dtype, args.out)
        return

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        whole = save_checkpoint(setup, dtype, checkpoint)
        results = {mode: run_mode(mode, checkpoint, args, Path(tmp)) for mode in MODES}
    single_step = results["single"][0]["step"]
    rows = []
    for mode, ranks in results.items():
        largest = max(ranks, key=lambda rank: rank["base"])
        read = max(rank["bytes_read"] if rank["bytes_read"] is not None else whole for rank in ranks)
        rows.append(
            [
                MODES[mode],
                largest["base"] / MB,
                largest["base"] / whole,
                read / MB,
                largest["adapter"] / MB,
                largest["projections"] / MB,
                max(rank["startup_held"] for rank in ranks) / MB,
                max(rank["startup_peak"] for rank in ranks) / MB,
                max(rank["training_peak"] for rank in ranks) / MB,
                max(rank["step"] for rank in ranks) / single_step,
            ]
        )
    print(
        f"machine: {cpu_name()} ({os.cpu_count()} cores), {args.threads} torch thread(s) per process, gloo, "
        f"torch {torch.__version__}\nsetup: {describe(setup, args.dtype)}; checkpoint {whole / MB:.1f} MiB"
    )
    print_table(
        "Per process",
        [
            "",
            "base held MiB",
            "of the base",
            "read MiB",
            "lambdas MiB",
            "vera_A+B MiB",
            "held after start-up MiB",
            "start-up peak MiB",
            "training peak MiB",
            "step time vs 1 process",
        ],
        rows,
        [
            "Memory: RSS above the process's RSS before building the model (every import paid), its peak "
            "over start-up and over start-up and training (VmHWM). Each DDP and FSDP2 process trains 1/N "
            "of the global batch's rows; step time is the slowest process's.",
            "CPU processes (gloo) only: a GPU table (nccl, bf16) is not measured by this script "
            f"(torch.cuda.is_available() here: {torch.cuda.is_available()}).",
        ],
    )


if __name__ == "__main__":
    main()
