"""The main job: fine-tune a causal language model with VeRA, evaluate it before and after, save the adapter.

    report = finetune(FinetuneOptions())          # the embedded default: SmolLM2-135M on the alarm task
    report = finetune(FinetuneOptions(model="path/to/model", data="train.jsonl", output="run1"))

The same function runs under `torchrun` (or `accelerate launch`): every process trains its share of each
global batch and only rank 0 writes the output directory. Each process holds the whole base model
(DistributedDataParallel), or with `fsdp=True` (`--fsdp`, or an accelerate FSDP config) a slice of it: the
model is built on the meta device, sharded, and each process reads only its own shards of the weights
(`veralab.fast.fsdp`, `veralab.fast.materialize`). The outputs are the same either way:

    <output>/adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's format
    <output>/README.md                                        its model card (a README.md you wrote is kept)
    <output>/loss_curve.png                                   the training loss per step
    <output>/summary.json                                     every number of the summary table

Every option is checked, and the output directory too (`veralab.app.outputs`: never inside an input, never
over files another program wrote unless `overwrite`), before any data or model is read. The four files
replace an earlier run's together (`veralab.atomic`), and only after training succeeded: a run that
fails or diverges (`NonFiniteLossError`) writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from veralab.app.base_model import build_on_meta, load_base_model
from veralab.app.data import TaskData, alarm_task, read_jsonl, split_held_out
from veralab.app.default_model import MODEL_NAME, default_model_dir, default_model_path
from veralab.app.distributed import Cluster, ShardingRequest, sharding_request
from veralab.app.evaluate import ExactMatch, exact_match
from veralab.app.options import FinetuneOptions
from veralab.app.outputs import SUMMARY_NAME, check_output
from veralab.app.report import RunSummary, plot_loss_curve, summary_table
from veralab.app.train import train
from veralab.atomic import staged_update
from veralab.config import VeraConfig
from veralab.counting import lora_trainable_parameters
from veralab.fast import VeraModel, get_model
from veralab.fast.dtensors import is_sharded
from veralab.fast.fsdp import check_torch_for_fsdp2
from veralab.fast.layout import WEIGHTS_NAME
from veralab.fast.model_card import card_files
from veralab.fast.saving import adapter_files

LOSS_CURVE_NAME = "loss_curve.png"


def load_task(options: FinetuneOptions) -> TaskData:
    """The training and held-out examples the options name (at most `max_eval_examples` held out)."""
    if options.data is None:
        if options.eval_data is not None:
            raise ValueError("--eval-data needs --data: the embedded task brings its own held-out examples")
        task = alarm_task()
    elif options.eval_data is not None:
        task = TaskData(read_jsonl(options.data), read_jsonl(options.eval_data), source=str(options.data))
    else:
        task = split_held_out(
            read_jsonl(options.data), options.held_out_fraction, options.training.seed, options.data
        )
    return TaskData(task.train, task.held_out[: options.max_eval_examples], task.source)


def check_options(options: FinetuneOptions) -> None:
    """Every check that needs no data and no model: the options' values and the output directory."""
    options.check()
    inputs = {
        "--model": options.model if options.model is not None else default_model_path(),
        "--data": options.data,
        "--eval-data": options.eval_data,
    }
    check_output(options.output, inputs, "finetune", options.overwrite)


def resolve_model_dir(model: str | None, cluster: Cluster, log: Callable[[str], None]) -> Path:
    """The model directory; the embedded default is fetched by rank 0 while the other ranks wait."""
    if model is not None:
        return Path(model)
    if cluster.is_main:
        default_model_dir(log=log)
    cluster.barrier()
    return default_model_dir(log=log)


def lora_parameters_for(model: VeraModel, r: int) -> int:
    """Trainable parameters of a LoRA of rank `r` on the layers VeRA adapted."""
    shapes = [(name, layer.out_features, layer.in_features) for name, layer in model.vera_layers()]
    return lora_trainable_parameters(shapes, r)


def adapted_model(
    model_dir: Path,
    vera: VeraConfig,
    options: FinetuneOptions,
    cluster: Cluster,
    sharding: ShardingRequest | None,
) -> tuple[VeraModel, object]:
    """The base model adapted with VeRA, and its tokenizer: whole on each process, or sharded (FSDP2).

    Args:
        model_dir: the base model's directory.
        vera: the adapter's configuration.
        options: the fine-tune's options (quantization).
        cluster: the training processes.
        sharding: how to shard, or None for a whole model per process.
    """
    if sharding is None:
        base, tokenizer = load_base_model(model_dir, options.quantization, cluster.device)
        return get_model(base, vera), tokenizer
    from veralab.fast.fsdp import shard_model
    from veralab.fast.materialize import materialize

    base, tokenizer = build_on_meta(model_dir)
    model = get_model(base, vera)
    shard_model(model, reshard_after_forward=sharding.reshard_after_forward)
    materialize(model, model_dir, cluster.device)
    return model, tokenizer


def check_sharding(sharding: ShardingRequest | None, options: FinetuneOptions, cluster: Cluster) -> None:
    """Refuse FSDP where it cannot run: one process, a quantized base, or a torch older than FSDP2 needs."""
    if sharding is None:
        return
    if not cluster.distributed:
        raise ValueError(
            f"{sharding.source} shards the base model over several processes, but this is the only one; "
            "start it with torchrun --nproc_per_node N (N >= 2) or accelerate launch"
        )
    if options.quantization is not None:
        raise ValueError(
            f"{sharding.source} and --load-in-{options.quantization} cannot be combined: veralab shards "
            "full-precision bases only; drop one of them"
        )
    try:
        check_torch_for_fsdp2()
    except RuntimeError as error:
        raise ValueError(f"{sharding.source}: {error}") from None


def finetune(options: FinetuneOptions, log: Callable[[str], None] = print) -> RunSummary:
    """Run the main job (see the module docstring); returns the summary on every rank.

    Args:
        options: what to train, on what, and where to write.
        log: where rank 0's messages go.
    """
    start = time.perf_counter()
    cluster = Cluster.from_environment()
    say = log if (cluster.is_main and options.progress) else _silent
    try:
        check_options(options)
        task = load_task(options)
        options.training.validate(len(task.train), cluster.world_size)  # before any download or load
        sharding = sharding_request(options.fsdp)
        check_sharding(sharding, options, cluster)
        model_dir = resolve_model_dir(options.model, cluster, say)
        say(f"veralab: loading {model_dir}" + ("" if sharding is None else ", sharded over the processes"))
        vera = options.vera
        vera.base_model_name_or_path = str(model_dir.resolve())
        vera.task_type = "CAUSAL_LM"  # PEFT's AutoPeftModelForCausalLM reads it
        model, tokenizer = adapted_model(model_dir, vera, options, cluster, sharding)
        model.eval()

        say(f"veralab: held-out exact match before training ({len(task.held_out)} examples)")
        before = exact_match(model, tokenizer, task.held_out, cluster)
        result = train(model, tokenizer, task.train, options.training, cluster, progress=options.progress)
        say("veralab: held-out exact match after training")
        after = exact_match(model, tokenizer, task.held_out, cluster)
        cluster.check_identical({name: p for name, p in model.named_parameters() if p.requires_grad})

        output = Path(options.output)
        # A sharded adapter is gathered: every process takes part, only the main one writes.
        files = adapter_files(model, "default") if cluster.is_main or is_sharded(model) else {}
        if cluster.is_main:
            files.update(card_files(model, output, ["default"]))
        trainable, total = model.get_nb_trainable_parameters()
        summary = RunSummary(
            model=str(model_dir),
            data=task.source,
            train_examples=len(task.train),
            held_out_examples=len(task.held_out),
            processes=cluster.world_size,
            adapted_layers=sum(1 for _ in model.vera_layers()),
            r=vera.r,
            trainable_parameters=trainable,
            total_parameters=total,
            adapter_bytes=len(files[WEIGHTS_NAME]) if cluster.is_main else 0,
            projections_saved=vera.save_projection,
            lora_r=options.lora_r,
            lora_parameters=lora_parameters_for(model, options.lora_r),
            steps=len(result.losses),
            batch_size=options.training.batch_size,
            train_seconds=result.seconds,
            tokens_per_second=result.tokens_per_second,
            total_seconds=time.perf_counter() - start,
            accuracy_before=before.accuracy,
            accuracy_after=after.accuracy,
            correct_before=before.correct,
            correct_after=after.correct,
            losses=result.losses,
        )
        if cluster.is_main:
            _write_outputs(summary, output, model_dir, files)
            _show(summary, after, output, model_dir, options, log)
        cluster.barrier()
        return summary
    finally:
        cluster.close()


def _silent(message: str) -> None:
    pass


def _write_outputs(summary: RunSummary, output: Path, model_dir: Path, files: dict[str, bytes]) -> None:
    """The adapter, the loss curve and the summary, replacing an earlier run's all together."""
    name = MODEL_NAME if model_dir.name == MODEL_NAME else model_dir.name
    with staged_update(output) as staging:
        for file_name, data in files.items():
            (staging / file_name).write_bytes(data)
        plot_loss_curve(summary.losses, staging / LOSS_CURVE_NAME, title=f"VeRA on {name}: training loss")
        (staging / SUMMARY_NAME).write_text(summary.to_json(), encoding="utf-8")


def _show(
    summary: RunSummary,
    after: ExactMatch,
    output: Path,
    model_dir: Path,
    options: FinetuneOptions,
    log: Callable[[str], None],
) -> None:
    if not options.progress:
        return
    log("held-out samples after training:")
    for prompt, expected, generated in after.samples:
        shown = " | ".join(prompt.strip().splitlines()[-2:])
        log(f"  {shown} -> {generated.strip()!r} (expected {expected.strip()!r})")
    log(summary_table(summary))
    log(f"wrote {output}/: the adapter (PEFT format), loss_curve.png, summary.json")
    log("load it:")
    log(f"  veralab evaluate --adapter {output}" + ("" if options.model is None else f" --model {model_dir}"))
    log(
        '  python -c "from transformers import AutoModelForCausalLM; from veralab.fast import VeraModel; '
        f"model = VeraModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model_dir}'), "
        f"'{output}')\""
    )
