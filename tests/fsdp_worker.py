"""FSDP2 scenarios on several CPU processes, run by tests/test_fsdp.py; results go to files.

    accelerate launch --config_file fsdp2.yaml tests/fsdp_worker.py WORKDIR

A launch costs 15-30 s of start-up on a small machine, so one launch runs every scenario and the tests read
what it wrote. `accelerate launch` runs torchrun's own launcher (torch.distributed.run) and adds its settings
to the environment as ACCELERATE_* / FSDP_* variables: the library scenarios ignore them, and the `cli`
scenario runs `veralab finetune` once as under plain torchrun (those variables removed, `--fsdp` given) and
once as under accelerate (no flag: the config alone asks for FSDP2).

WORKDIR/spec.json (written by the test) names the base checkpoints, the adapters to start from, the training
data and settings; each scenario writes under WORKDIR/out/<scenario>/:

- `float32`: a float32 base built on the meta device, sharded, materialised from its checkpoint (each rank
  reports what it read and holds); two adapters loaded into it; saved straight back (`loaded/`); a
  mixed-adapter batch; merging and adding an adapter refused; trained with the application's loop
  (`trained/`); logits before and after training.
- `resume`: train two steps, save the training state (`checkpoint/`), two more (`continuous/`); a fresh
  sharded model loads the checkpoint and takes the same two steps (`resumed/`).
- `bfloat16`: a bf16 base with float32 lambdas, three steps of plain SGD (`trained/`).
- `cli`: `veralab finetune` (spec["cli_args"]) in both ways (`torchrun/`, `accelerate/`): each writes its
  output in `output/`, what each rank printed (file descriptors 1 and 2) in `rank<N>.stdout|stderr`, and the
  names of the files each rank opened for writing under `output/` in `rank<N>.writes.json`.

Every rank writes `rank<N>.json` (what it measured) and rank-suffixed tensors where ranks must agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from write_audit import WriteAudit

from veralab.app.cli import main as veralab_main
from veralab.app.data import collate, read_jsonl, tokenize
from veralab.app.distributed import Cluster
from veralab.app.options import TrainingOptions
from veralab.app.train import answer_token_loss_sum, train
from veralab.config import VeraConfig
from veralab.fast import get_model
from veralab.fast.fingerprint import projection_fingerprint
from veralab.fast.fsdp import resident_bytes, shard_model
from veralab.fast.materialize import materialize
from veralab.fast.training_state import load_training_state, save_training_state


def sharded_model(checkpoint: str, adapters: dict[str, str], dtype: torch.dtype):
    """A VeraModel built on the meta device with `adapters` ({name: directory}), sharded and materialised."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=dtype)
    configs = {}
    for name, directory in adapters.items():
        configs[name] = VeraConfig.from_json_file(Path(directory) / "adapter_config.json")
        configs[name].inference_mode = False  # to be trained
    names = list(configs)
    model = get_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    shard_model(model)
    report = materialize(model, checkpoint)
    for name, directory in adapters.items():
        model.load_adapter(directory, name, is_trainable=True)
    model.set_adapter(names[0])
    return model, report


def eval_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def measurements(model, report, cluster: Cluster) -> dict:
    held = resident_bytes(model)
    base = model.get_base_model()
    parameters = dict(model.named_parameters())
    return {
        "world_size": cluster.world_size,
        "bytes_read": report.bytes_read,
        "checkpoint_bytes": report.checkpoint_bytes,
        "resident": {k: getattr(held, k) for k in ("base", "adapter", "projections", "buffers")},
        "projections_sha256": projection_fingerprint(model.vera_A, model.vera_B, model.projections.prng_key)[
            "sha256"
        ],
        "tied": base.lm_head.weight is base.model.embed_tokens.weight,
        "dtypes": sorted(
            {f"{'lambda' if model.prefix in name else 'base'} {p.dtype}" for name, p in parameters.items()}
        ),
        "parameter_types": sorted({type(p).__name__ for p in parameters.values()}),
    }


def refusal(action) -> str | None:
    try:
        action()
    except ValueError as e:
        return str(e)
    return None


def float32_scenario(spec: dict, cluster: Cluster, out: Path):
    checkpoint, adapters = spec["checkpoints"][str(torch.float32)], spec["adapters"]
    model, report = sharded_model(checkpoint, adapters, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    facts = measurements(model, report, cluster)
    ids = torch.tensor(spec["ids"])

    model.save_pretrained(out / "loaded", is_main_process=cluster.is_main)
    logits = {"loaded": eval_logits(model, ids)}  # a first inference forward: a kept S would now be stale
    logits["mixed"] = eval_logits(model, ids, adapter_names=spec["adapter_names"])
    facts["merge_refused"] = refusal(model.merge_adapter)
    facts["new_adapter_refused"] = refusal(lambda: model.load_adapter(adapters["default"], "new"))

    options = TrainingOptions(**spec["training"])
    examples = read_jsonl(spec["data"])
    result = train(model, tokenizer, examples, options, cluster, progress=False)
    facts["losses"] = result.losses
    model.save_pretrained(out / "trained", is_main_process=cluster.is_main)
    logits["trained"] = eval_logits(model, ids)
    save_tensors(logits, out / f"logits.rank{cluster.rank}.safetensors")
    (out / f"rank{cluster.rank}.json").write_text(json.dumps(facts, indent=1))


class Batches:
    """The spec's fixed global batches of training examples, and one optimizer step on this rank's share."""

    def __init__(self, spec: dict, checkpoint: str, cluster: Cluster) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        examples = read_jsonl(spec["data"])
        tokenized = [tokenize(self.tokenizer, e, spec["training"]["max_length"]) for e in examples]
        self.batches = [[tokenized[i] for i in batch] for batch in spec["batches"]]
        self.cluster = cluster

    def step(self, model, optimizer, index: int) -> None:
        """The application's step (train.py): this rank's share, the loss over the global batch's tokens."""
        batch, cluster = self.batches[index], self.cluster
        model.train()
        answer_tokens = sum(example.target_tokens for example in batch)
        inputs = collate(cluster.shard(batch), self.tokenizer.eos_token_id)
        labels = inputs.pop("labels")
        loss_sum = answer_token_loss_sum(model(**inputs).logits, labels)
        (loss_sum * (cluster.world_size / answer_tokens)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def bfloat16_scenario(spec: dict, cluster: Cluster, out: Path):
    """A bf16 base, float32 lambdas: plain SGD (the update is the gradient itself) over three batches."""
    checkpoint = spec["checkpoints"][str(torch.bfloat16)]
    model, report = sharded_model(checkpoint, spec["adapters_bfloat16"], torch.bfloat16)
    facts = measurements(model, report, cluster)
    batches = Batches(spec, checkpoint, cluster)
    optimizer = torch.optim.SGD(trainable(model), lr=spec["sgd_learning_rate"])
    for index in range(3):
        batches.step(model, optimizer, index)
    model.save_pretrained(out / "trained", is_main_process=cluster.is_main)
    (out / f"rank{cluster.rank}.json").write_text(json.dumps(facts, indent=1))


def resume_scenario(spec: dict, cluster: Cluster, out: Path):
    checkpoint = spec["checkpoints"][str(torch.float32)]
    adapters = {"default": spec["adapters"]["default"]}
    batches = Batches(spec, checkpoint, cluster)

    def optimizer_for(model):
        return torch.optim.AdamW(trainable(model), lr=spec["training"]["learning_rate"], weight_decay=0.01)

    model, _ = sharded_model(checkpoint, adapters, torch.float32)
    optimizer = optimizer_for(model)
    for index in (0, 1):
        batches.step(model, optimizer, index)
    save_training_state(model, optimizer, out / "checkpoint", is_main_process=cluster.is_main)
    for index in (2, 3):
        batches.step(model, optimizer, index)
    model.save_pretrained(out / "continuous", is_main_process=cluster.is_main)
    del model, optimizer

    model, _ = sharded_model(checkpoint, adapters, torch.float32)  # a fresh start, as after a restart
    optimizer = optimizer_for(model)
    load_training_state(model, optimizer, out / "checkpoint")
    for index in (2, 3):
        batches.step(model, optimizer, index)
    model.save_pretrained(out / "resumed", is_main_process=cluster.is_main)


@contextlib.contextmanager
def printed_to(stdout: Path, stderr: Path) -> Iterator[None]:
    """Everything this process writes to file descriptors 1 and 2 (Python's and libraries'), into files."""
    saved = []
    with stdout.open("w") as out, stderr.open("w") as err:
        for stream, target in ((sys.stdout, out), (sys.stderr, err)):
            stream.flush()
            saved.append(os.dup(stream.fileno()))
            os.dup2(target.fileno(), stream.fileno())
        try:
            yield
        finally:
            for stream, fd in zip((sys.stdout, sys.stderr), saved, strict=True):
                stream.flush()
                os.dup2(fd, stream.fileno())
                os.close(fd)


@contextlib.contextmanager
def plain_torchrun_environment() -> Iterator[None]:
    """The environment plain torchrun gives: accelerate's ACCELERATE_* / FSDP_* settings removed."""
    removed = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("ACCELERATE_", "FSDP_"))}
    try:
        yield
    finally:
        os.environ.update(removed)


AUDIT = WriteAudit()


def cli_scenario(spec: dict, cluster: Cluster, out: Path):
    """`veralab finetune` under torchrun with `--fsdp`, then under accelerate's FSDP2 config (no flag)."""
    runs = {"torchrun": (plain_torchrun_environment, ["--fsdp"]), "accelerate": (contextlib.nullcontext, [])}
    for name, (environment, flags) in runs.items():
        run = out / name
        run.mkdir(exist_ok=True)
        argv = [*spec["cli_args"], "--output", str(run / "output"), *flags]
        with environment(), AUDIT.watch(run / "output") as writes:
            with printed_to(run / f"rank{cluster.rank}.stdout", run / f"rank{cluster.rank}.stderr"):
                status = veralab_main(argv)
        (run / f"rank{cluster.rank}.writes.json").write_text(json.dumps({"status": status, "writes": writes}))
        cluster.barrier()


SCENARIOS = {
    "float32": float32_scenario,
    "resume": resume_scenario,
    "bfloat16": bfloat16_scenario,
    "cli": cli_scenario,
}


def main(workdir: Path) -> None:
    spec = json.loads((workdir / "spec.json").read_text())
    cluster = Cluster.from_environment()
    try:
        for name, scenario in SCENARIOS.items():
            out = workdir / "out" / name
            out.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            scenario(spec, cluster, out)
            cluster.barrier()
    finally:
        cluster.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
