"""VeRA under FSDP2 on two CPU processes (gloo) equals one process; meta-device start-up; sharded files; the
`veralab finetune` command sharded under torchrun and under `accelerate launch`.

One launch (`fsdp_worker.py`, started by `accelerate launch` with the FSDP2 config file docs/scaling.md shows)
runs every two-process scenario and writes its results; the tests here compute the single-process references
and compare. What needs no second process (reading a checkpoint into a model built on the meta device,
resuming, accelerate's settings, refusals) is tested in-process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import randomize_lambdas, tiny_llama, veralab_lines
from safetensors import safe_open
from tiny_pretrained import save_tiny_causal_lm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from veralab.app.cli import main
from veralab.app.data import alarm_task, collate, read_jsonl, tokenize, write_jsonl
from veralab.app.distributed import Cluster, ShardingRequest, sharding_request
from veralab.app.finetune import check_sharding
from veralab.app.options import FinetuneOptions, TrainingOptions
from veralab.app.train import answer_token_loss_sum, train
from veralab.config import VeraConfig
from veralab.fast import VeraModel, get_model
from veralab.fast.dtensors import is_sharded
from veralab.fast.fsdp import check_torch_for_fsdp2, shard_model
from veralab.fast.materialize import checkpoint_files, materialize
from veralab.fast.saving import adapter_tensors
from veralab.fast.training_state import load_training_state

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
EPS32 = torch.finfo(torch.float32).eps
TARGETS = ["q_proj", "v_proj", "down_proj"]
TRAINING = {"steps": 4, "batch_size": 4, "learning_rate": 0.05, "max_length": 64, "seed": 0}
BATCHES = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # the global batches of the loops
SGD_LEARNING_RATE = 1.0
ADAPTER_NAMES = ["default", "other", "__base__", "default"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SCALING_PAGE = REPO / "docs" / "scaling.md"
CLI_RUNS = ["torchrun", "accelerate"]
OUTPUT_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "loss_curve.png",
    "summary.json",
}
CLI_STEPS, CLI_LEARNING_RATE = 3, 0.5  # as tests/test_cli.py: three steps that change greedy answers


def accelerate_config() -> str:
    """The accelerate FSDP2 config file docs/scaling.md shows (its only yaml block)."""
    (config,) = re.findall(r"```yaml\n(.*?)```", SCALING_PAGE.read_text(encoding="utf-8"), flags=re.S)
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vera_config(save_projection: bool) -> VeraConfig:
    return VeraConfig(r=16, target_modules=TARGETS, save_projection=save_projection, inference_mode=False)


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (len(ADAPTER_NAMES), 12), generator=torch.Generator().manual_seed(5))


def save_start_adapters(checkpoint: Path, dtype: torch.dtype, directory: Path, names: list[str]) -> Path:
    """Adapters with random (non-zero) lambdas, saved by one process: what the sharded runs start from."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    model = get_model(base, vera_config(save_projection=dtype != torch.float32), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, vera_config(save_projection=dtype != torch.float32))
    randomize_lambdas(model, seed=7)
    model.save_pretrained(directory)
    return directory


def adapter_dirs(root: Path, names: list[str]) -> dict[str, str]:
    return {name: str(root if name == "default" else root / name) for name in names}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Checkpoints, start adapters, data, and the scenarios' spec."""
    work = tmp_path_factory.mktemp("fsdp")
    float32 = save_tiny_causal_lm(work / "base-float32")
    bfloat16 = work / "base-bfloat16"
    AutoModelForCausalLM.from_pretrained(float32).to(torch.bfloat16).save_pretrained(bfloat16)
    AutoTokenizer.from_pretrained(float32).save_pretrained(bfloat16)
    task = alarm_task(train_size=32, held_out_size=4, seed=1)
    write_jsonl(task.train, work / "train.jsonl")
    write_jsonl(task.held_out, work / "held_out.jsonl")
    both = ["default", "other"]
    spec = {
        "checkpoints": {str(torch.float32): str(float32), str(torch.bfloat16): str(bfloat16)},
        "adapters": adapter_dirs(
            save_start_adapters(float32, torch.float32, work / "start-float32", both), both
        ),
        "adapters_bfloat16": adapter_dirs(
            save_start_adapters(bfloat16, torch.bfloat16, work / "start-bfloat16", ["default"]), ["default"]
        ),
        "data": str(work / "train.jsonl"),
        "training": TRAINING,
        "ids": token_ids(AutoConfig.from_pretrained(float32).vocab_size).tolist(),
        "adapter_names": ADAPTER_NAMES,
        "batches": BATCHES,
        "sgd_learning_rate": SGD_LEARNING_RATE,
        "cli_args": cli_args(float32, work),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "fsdp2.yaml").write_text(accelerate_config())
    return work


@pytest.fixture(scope="module")
def workdir(prepared) -> Path:
    """`prepared`, then one two-process launch of every scenario (torch new enough for FSDP2)."""
    try:
        check_torch_for_fsdp2()
    except RuntimeError as error:
        pytest.skip(str(error))
    work = prepared
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(work / "fsdp2.yaml"),
        "--num_processes", str(WORLD_SIZE), "--main_process_port", str(free_port()),
        str(REPO / "tests" / "fsdp_worker.py"), str(work),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-5000:]
    return work


def cli_args(model_dir: Path, work: Path) -> list[str]:
    """`veralab finetune` on the float32 checkpoint, as tests/test_cli.py runs it (--output added later)."""
    return [
        "finetune", "--model", str(model_dir), "--data", str(work / "train.jsonl"),
        "--eval-data", str(work / "held_out.jsonl"), "--steps", str(CLI_STEPS), "--batch-size", "4",
        "--lr", str(CLI_LEARNING_RATE), "--rank", "16", "--targets", ",".join(TARGETS),
    ]  # fmt: skip


def spec_of(work: Path) -> dict:
    return json.loads((work / "spec.json").read_text())


def rank_facts(work: Path, scenario: str) -> list[dict]:
    return [json.loads((work / "out" / scenario / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def rank_logits(work: Path, scenario: str) -> list[dict[str, torch.Tensor]]:
    return [
        safetensors.torch.load_file(work / "out" / scenario / f"logits.rank{r}.safetensors")
        for r in range(WORLD_SIZE)
    ]


def adapter_file(directory: Path | str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(Path(directory) / "adapter_model.safetensors")


def one_process_model(
    work: Path, dtype: torch.dtype, adapters: dict[str, str], checkpoint_dtype: torch.dtype | None = None
) -> tuple[VeraModel, object]:
    """The single-process twin of the worker's sharded model: the same checkpoint and start adapters.

    Args:
        work: the test's directory.
        dtype: the base model's dtype.
        adapters: {name: directory} of the adapters to load (trainable), the first one active.
        checkpoint_dtype: the checkpoint to read (default: the one saved in `dtype`).
    """
    checkpoint = spec_of(work)["checkpoints"][str(checkpoint_dtype or dtype)]
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    configs = {}
    for name, directory in adapters.items():
        configs[name] = VeraConfig.from_json_file(Path(directory) / "adapter_config.json")
        configs[name].inference_mode = False
    names = list(configs)
    model = get_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    for name, directory in adapters.items():
        model.load_adapter(directory, name, is_trainable=True)
    model.set_adapter(names[0])
    return model, AutoTokenizer.from_pretrained(checkpoint)


def trained_in_one_process(
    work: Path, dtype: torch.dtype, adapters: dict[str, str], checkpoint_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    model, tokenizer = one_process_model(work, dtype, adapters, checkpoint_dtype)
    train(model, tokenizer, read_jsonl(work / "train.jsonl"), TrainingOptions(**TRAINING), progress=False)
    return adapter_tensors(model, "default")


def global_step(model, optimizer, tokenizer, examples: list, indices: list[int]) -> None:
    """One optimizer step of one process on a whole global batch (the loss per answer token)."""
    batch = [tokenize(tokenizer, examples[i], TRAINING["max_length"]) for i in indices]
    inputs = collate(batch, tokenizer.eos_token_id)
    labels = inputs.pop("labels")
    model.train()
    loss = answer_token_loss_sum(model(**inputs).logits, labels) / sum(e.target_tokens for e in batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def sgd_in_one_process(
    work: Path, dtype: torch.dtype, adapters: dict[str, str], checkpoint_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The worker's bfloat16 scenario on one process: three plain SGD steps over the first three batches."""
    model, tokenizer = one_process_model(work, dtype, adapters, checkpoint_dtype)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LEARNING_RATE)
    examples = read_jsonl(work / "train.jsonl")
    for indices in BATCHES[:3]:
        global_step(model, optimizer, tokenizer, examples, indices)
    return adapter_tensors(model, "default")


def logits_of(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# Two processes sum the gradient of half the global batch each and the halves are then added: float32 sums in
# another order, a few ulps apart. Adam moves a lambda by at most ~lr a step, so the lambdas agree to within
# steps * lr * (a generous 1e4 ulps), the bound the DistributedDataParallel test in test_cli.py uses.
FLOAT32_TOLERANCE = TRAINING["steps"] * TRAINING["learning_rate"] * 1e4 * EPS32


# ---------------------------------------------------------------------------------------------------
# Training: two sharded processes equal one
# ---------------------------------------------------------------------------------------------------


def test_fsdp_training_equals_one_process_on_the_same_global_batch(workdir):
    spec = spec_of(workdir)
    single = trained_in_one_process(workdir, torch.float32, spec["adapters"])
    sharded = adapter_file(workdir / "out" / "float32" / "trained")
    start = adapter_file(spec["adapters"]["default"])
    assert single.keys() == sharded.keys() == start.keys()
    for key in single:
        assert (single[key] - sharded[key]).abs().max() <= FLOAT32_TOLERANCE, key
    moved = max((single[key] - start[key]).abs().max() for key in single)
    assert moved > 100 * FLOAT32_TOLERANCE  # training did move the lambdas, far past the tolerance
    losses = [facts["losses"] for facts in rank_facts(workdir, "float32")]
    assert losses[0] == losses[1] and len(losses[0]) == TRAINING["steps"]


def test_bf16_base_with_float32_lambdas_is_as_close_to_float32_training_as_one_process(workdir):
    """bf16 rounds the base's activations, so a bf16 run's gradients (and with plain SGD, its lambdas) differ
    from the float32 computation by an error e of bf16's making, measured here on one process from the same
    start and the same bf16-rounded weights. Two processes round other partial sums than one does, so they
    land elsewhere within bf16's reach: within 2e of the float32 result (the repository's bound for a bf16
    computation against its float32 reference), plus float32's own summation-order tolerance."""
    facts = rank_facts(workdir, "bfloat16")
    assert facts[0]["dtypes"] == ["base torch.bfloat16", "lambda torch.float32"]
    adapters = spec_of(workdir)["adapters_bfloat16"]
    one_bf16 = sgd_in_one_process(workdir, torch.bfloat16, adapters)
    float32_run = sgd_in_one_process(workdir, torch.float32, adapters, checkpoint_dtype=torch.bfloat16)
    sharded = adapter_file(workdir / "out" / "bfloat16" / "trained")
    start = adapter_file(adapters["default"])
    lambdas = [key for key in start if "vera_lambda" in key]
    error = max((one_bf16[k] - float32_run[k]).abs().max() for k in lambdas)
    moved = max((float32_run[k] - start[k]).abs().max() for k in lambdas)
    assert moved > 20 * error  # bf16's error is small next to what training changes
    tolerance = 2 * error + 3 * SGD_LEARNING_RATE * 1e4 * EPS32 * moved
    for key in lambdas:
        assert sharded[key].dtype == torch.float32
        assert (sharded[key] - float32_run[key]).abs().max() <= tolerance, key
    assert all(rank["resident"]["base"] < facts[0]["checkpoint_bytes"] for rank in facts)


def test_inference_after_training_sees_the_trained_lambdas(workdir):
    """The sharded model's logits after training are those of its gathered adapter in one process (FSDP
    rewrites gathered lambdas without moving their version counters: nothing built from the old ones is
    reused)."""
    spec = spec_of(workdir)
    ids = torch.tensor(spec["ids"])
    sharded = rank_logits(workdir, "float32")
    trained = workdir / "out" / "float32" / "trained"
    adapters = {"default": str(trained), "other": str(trained / "other")}
    model, _ = one_process_model(workdir, torch.float32, adapters)
    expected = logits_of(model, ids)
    # The same float32 operations on the same values in both processes and in this one.
    assert torch.equal(sharded[0]["trained"], sharded[1]["trained"])
    assert torch.equal(sharded[0]["trained"], expected)
    assert not torch.equal(sharded[0]["trained"], sharded[0]["loaded"])


# ---------------------------------------------------------------------------------------------------
# Start-up on the meta device: no process holds the whole base
# ---------------------------------------------------------------------------------------------------


def shard_bound(checkpoint: Path, world_size: int) -> tuple[int, int]:
    """(bytes of the whole checkpoint, bytes of the largest shard set one process can hold: dimension 0
    split in ceil(rows / world_size) rows, as FSDP2 pads it)."""
    whole = largest = 0
    for name, path in checkpoint_files(checkpoint).items():
        with safe_open(path, framework="pt") as f:
            tensor = f.get_slice(name)
            shape, size = tensor.get_shape(), f.get_tensor(name).element_size()
        rest = math.prod(shape[1:])
        whole += shape[0] * rest * size
        largest += math.ceil(shape[0] / world_size) * rest * size
    return whole, largest


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_process_reads_and_holds_only_its_shards_of_the_base(workdir, dtype):
    spec = spec_of(workdir)
    whole, largest_shard = shard_bound(Path(spec["checkpoints"][str(DTYPES[dtype])]), WORLD_SIZE)
    facts = rank_facts(workdir, dtype)
    r, max_in, max_out = 16, 48, 32  # the projections: r x (largest in), (largest out) x r, float32
    for rank in facts:
        assert rank["world_size"] == WORLD_SIZE
        assert rank["checkpoint_bytes"] == whole
        assert rank["bytes_read"] <= largest_shard < whole
        assert rank["resident"]["base"] <= largest_shard
        assert rank["resident"]["projections"] == 4 * (r * max_in + max_out * r)
        assert rank["tied"]  # the head still shares the embedding's (sharded) weight
        assert rank["parameter_types"] == ["DTensor"]
    # Together the processes hold (and read) the whole base, each about half of it.
    assert sum(rank["resident"]["base"] for rank in facts) >= whole
    assert sum(rank["bytes_read"] for rank in facts) == whole
    assert len({rank["projections_sha256"] for rank in facts}) == 1


@pytest.mark.parametrize("pairs_on_meta", [False, True], ids=["pairs-drawn", "pairs-on-meta"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_process_materialises_a_meta_model_equal_to_from_pretrained(workdir, dtype, pairs_on_meta):
    """materialize without sharding: the same weights, buffers and projections as from_pretrained +
    get_model, with save_projection=False, for two projection groups (adapters of two keys). get_model draws
    the pairs on the CPU even over a meta base, and materialize puts them back after to_empty; a model moved
    wholly to the meta device has its pairs drawn again from their keys."""
    checkpoint = spec_of(workdir)["checkpoints"][str(DTYPES[dtype])]
    config = vera_config(save_projection=False)
    other = VeraConfig(
        r=8,
        target_modules=["q_proj", "v_proj"],
        projection_prng_key=1,
        save_projection=False,
        inference_mode=False,
    )

    def adapted(base):
        model = get_model(base, config)
        model.add_adapter("other", other)
        return model

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=DTYPES[dtype])
    built = adapted(meta)
    if pairs_on_meta:
        built.to("meta")
    assert len(built.projection_groups()) == 2
    report = materialize(built, checkpoint)
    loaded = adapted(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=DTYPES[dtype]))
    assert report.bytes_read == report.checkpoint_bytes  # one process reads everything
    assert built.state_dict().keys() == loaded.state_dict().keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(built.state_dict()[key], tensor), key
    for (name, buffer), (_, expected) in zip(built.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(buffer, expected), name
    ids = token_ids(loaded.config.vocab_size)
    randomize_lambdas(built)
    randomize_lambdas(loaded)
    expected = logits_of(loaded, ids, adapter_names=ADAPTER_NAMES)  # rows of both groups and the base
    assert torch.equal(logits_of(built, ids, adapter_names=ADAPTER_NAMES), expected)


# ---------------------------------------------------------------------------------------------------
# Adapter files from a sharded model; loading into one; resuming
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "other"])
def test_a_sharded_save_is_byte_identical_to_the_single_process_save(workdir, name):
    start = Path(spec_of(workdir)["adapters"][name])
    loaded = workdir / "out" / "float32" / "loaded"
    saved = loaded if name == "default" else loaded / name
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (saved / file).read_bytes() == (start / file).read_bytes(), file


def test_mixed_adapter_batch_on_a_sharded_model_equals_one_process(workdir):
    spec = spec_of(workdir)
    model, _ = one_process_model(workdir, torch.float32, spec["adapters"])
    expected = logits_of(model, torch.tensor(spec["ids"]), adapter_names=ADAPTER_NAMES)
    for rank in rank_logits(workdir, "float32"):
        assert torch.equal(rank["mixed"], expected)  # the same float32 operations on the same values


def test_merged_inference_after_gathering_equals_the_sharded_model(workdir):
    """Merging needs whole weights: the sharded model refuses it, and its gathered adapter merges into an
    unsharded base with the outputs the sharded model computes."""
    facts = rank_facts(workdir, "float32")
    assert all("merge_adapter needs each layer's whole weight" in rank["merge_refused"] for rank in facts)
    spec = spec_of(workdir)
    ids = torch.tensor(spec["ids"])
    sharded = rank_logits(workdir, "float32")[0]["trained"]
    checkpoint = spec["checkpoints"][str(torch.float32)]
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    adapted = VeraModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(checkpoint), workdir / "out" / "float32" / "trained"
    )
    merged = adapted.merge_and_unload()
    # As for `veralab merge` (test_cli.py): merging rounds W + dW once per weight, a few ulps of the logits.
    tolerance = 100 * EPS32 * sharded.abs().max()
    assert (logits_of(merged, ids) - sharded).abs().max() <= tolerance
    assert (logits_of(base, ids) - sharded).abs().max() > 100 * tolerance  # the adapter does change them


def test_loading_a_new_adapter_into_a_sharded_model_is_refused(workdir):
    for rank in rank_facts(workdir, "float32"):
        assert "adapter 'new' is new, but this model is already sharded" in rank["new_adapter_refused"]


def test_resuming_a_sharded_run_equals_not_stopping(workdir):
    out = workdir / "out" / "resume"
    continuous = (out / "continuous" / "adapter_model.safetensors").read_bytes()
    assert (out / "resumed" / "adapter_model.safetensors").read_bytes() == continuous
    assert continuous != (out / "checkpoint" / "adapter_model.safetensors").read_bytes()


def test_a_sharded_checkpoint_resumes_in_one_process(workdir):
    """The training checkpoint holds whole tensors: one process resumes what two saved, and lands where the
    two did, within float32 summation order."""
    spec = spec_of(workdir)
    out = workdir / "out" / "resume"
    model, tokenizer = one_process_model(workdir, torch.float32, {"default": spec["adapters"]["default"]})
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=TRAINING["learning_rate"], weight_decay=0.01
    )
    load_training_state(model, optimizer, out / "checkpoint")
    assert all(state["step"].item() == 2 for state in optimizer.state.values())
    examples = read_jsonl(workdir / "train.jsonl")
    for indices in BATCHES[2:]:
        global_step(model, optimizer, tokenizer, examples, indices)
    resumed = adapter_tensors(model, "default")
    two_processes = adapter_file(out / "continuous")
    for key, tensor in resumed.items():
        assert (tensor - two_processes[key]).abs().max() <= FLOAT32_TOLERANCE, key


# ---------------------------------------------------------------------------------------------------
# `veralab finetune` sharded: under torchrun with --fsdp, under accelerate launch with an FSDP2 config
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_run(workdir) -> Path:
    """The same `veralab finetune` in this one process: what DistributedDataParallel is tested against."""
    output = workdir / "one-process"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*spec_of(workdir)["cli_args"], "--output", str(output)]) == 0
    return output


@pytest.mark.parametrize("run", CLI_RUNS)
def test_sharded_finetune_gives_the_one_process_adapter_and_summary(workdir, one_process_run, run):
    """As for DistributedDataParallel (test_cli.py): the lambdas within float32 summation order after Adam's
    steps, the same losses, answers and counts, the same files."""
    output = workdir / "out" / "cli" / run / "output"
    assert {p.name for p in output.iterdir()} == OUTPUT_FILES
    single, sharded = adapter_file(one_process_run), adapter_file(output)
    assert single.keys() == sharded.keys()
    tolerance = CLI_STEPS * CLI_LEARNING_RATE * 1e4 * EPS32
    for key in single:
        assert (single[key] - sharded[key]).abs().max() <= tolerance, key
    assert max(single[k].abs().max() for k in single if k.endswith("vera_lambda_b")) > 100 * tolerance
    config = "adapter_config.json"
    assert (output / config).read_bytes() == (one_process_run / config).read_bytes()

    summary = json.loads((output / "summary.json").read_text())
    expected = json.loads((one_process_run / "summary.json").read_text())
    assert summary["processes"] == WORLD_SIZE and expected["processes"] == 1
    assert summary["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    timings = {"processes", "losses", "train_seconds", "tokens_per_second", "total_seconds"}
    assert {k: v for k, v in summary.items() if k not in timings} == {
        k: v for k, v in expected.items() if k not in timings
    }


@pytest.mark.parametrize("run", CLI_RUNS)
def test_only_rank_0_of_a_sharded_finetune_prints_and_writes(workdir, run):
    directory = workdir / "out" / "cli" / run
    ranks = [json.loads((directory / f"rank{r}.writes.json").read_text()) for r in range(WORLD_SIZE)]
    printed = [
        {stream: (directory / f"rank{r}.{stream}").read_text() for stream in ("stdout", "stderr")}
        for r in range(WORLD_SIZE)
    ]
    assert [rank["status"] for rank in ranks] == [0, 0]
    assert OUTPUT_FILES <= set(ranks[0]["writes"]) and ranks[1]["writes"] == []
    assert "VeRA fine-tune summary" in printed[0]["stdout"] and "training" in printed[0]["stderr"]
    assert "sharded over the processes" in printed[0]["stderr"] + printed[0]["stdout"]
    assert veralab_lines(**printed[1]) == []


# accelerate launch puts its config into the environment; these are the variables it writes for the keys.
ACCELERATE_FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "no"}


@pytest.mark.parametrize(
    ("flag", "environ", "expected"),
    [
        (False, {}, None),
        (True, {}, ShardingRequest()),
        (False, ACCELERATE_FSDP2, ShardingRequest(source="accelerate config")),
        (
            False,
            {**ACCELERATE_FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"},
            ShardingRequest(reshard_after_forward=False, source="accelerate config"),
        ),
        (False, {"ACCELERATE_USE_FSDP": "false"}, None),
    ],
)
def test_fsdp_is_asked_for_by_the_flag_or_an_accelerate_fsdp2_config(flag, environ, expected):
    assert sharding_request(flag, environ) == expected


@pytest.mark.fault(
    "cli", "an accelerate FSDP config veralab cannot honour", "ValueError naming the config key and the fix"
)
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"FSDP_VERSION": "1"}, "fsdp_version: 1; veralab shards with FSDP2, set fsdp_version: 2"),
        ({"FSDP_VERSION": None}, "pip install 'accelerate>=1.6' and set fsdp_version: 2"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true"),
        ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "fsdp_activation_checkpointing: true"),
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "mixed_precision: bf16"),
        ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy: SIZE_BASED_WRAP"),
        ({"FSDP_RESHARD_AFTER_FORWARD": "maybe"}, "fsdp_reshard_after_forward: maybe"),
    ],
)
def test_an_accelerate_setting_veralab_cannot_honour_is_refused_with_its_key(setting, message):
    environ = {k: v for k, v in {**ACCELERATE_FSDP2, **setting}.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)):
        sharding_request(False, environ)


@pytest.mark.fault("cli", "`--fsdp` in one process (no torchrun)", "one clear line: how to start several")
def test_fsdp_in_one_process_is_one_clear_line(prepared, tmp_path, capsys):
    output = tmp_path / "out"
    assert main([*spec_of(prepared)["cli_args"], "--output", str(output), "--fsdp", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--fsdp shards the base model over several processes, but this is the only one" in err
    assert "torchrun --nproc_per_node N" in err
    assert not output.exists()


@pytest.mark.fault("cli", "`--fsdp` with `--load-in-4bit`", "ValueError saying the two cannot be combined")
def test_fsdp_over_a_quantized_base_is_refused():
    with pytest.raises(ValueError, match=re.escape("--fsdp and --load-in-4bit cannot be combined")):
        check_sharding(ShardingRequest(), FinetuneOptions(quantization="4bit"), Cluster(world_size=2))


@pytest.mark.fault(
    "cli", "`--fsdp` (or `shard_model`) on a torch older than 2.9", "one clear line naming the torch it needs"
)
def test_fsdp_on_an_older_torch_names_the_torch_it_needs(monkeypatch):
    model = get_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"]))
    monkeypatch.setattr(torch, "__version__", "2.8.0+cu128")
    message = "sharding with FSDP2 needs torch >= 2.9, and this is torch 2.8.0+cu128: upgrade it"
    with pytest.raises(ValueError, match=re.escape(f"--fsdp: {message}")):
        check_sharding(ShardingRequest(), FinetuneOptions(), Cluster(world_size=2))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        shard_model(model)
    assert not is_sharded(model)
