"""The main job's data: the embedded alarm task, JSON-lines files, the held-out split, tokens and batches."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_pretrained import tiny_tokenizer

from veralab.app.data import (
    IGNORE_INDEX,
    Example,
    alarm_task,
    collate,
    read_jsonl,
    split_held_out,
    tokenize,
    write_jsonl,
)
from veralab.app.train import batch_schedule


def answer(example: Example) -> tuple[str, str]:
    parsed = json.loads(example.completion)
    return parsed["day"], parsed["time"]


@pytest.mark.parametrize("seed", [0, 7])
def test_alarm_task_is_deterministic_and_its_held_out_answers_never_occur_in_training(seed):
    task = alarm_task(train_size=300, held_out_size=40, seed=seed)
    assert task == alarm_task(train_size=300, held_out_size=40, seed=seed)
    assert len(task.train) == 300 and len(task.held_out) == 40
    assert {answer(e) for e in task.train}.isdisjoint({answer(e) for e in task.held_out})
    assert {e.prompt for e in task.train}.isdisjoint({e.prompt for e in task.held_out})


def test_alarm_answers_spell_every_time_of_the_request_one_way():
    spellings = set()
    for example in alarm_task(train_size=400, held_out_size=40).train:
        request = example.prompt.splitlines()[1]
        match = re.search(r"\b(\d{1,2})(?::(\d\d))?( ?)([AaPp][Mm])\b", request)
        hour, minute, space, suffix = match.groups()
        assert answer(example)[1] == f"{int(hour)}:{minute or '00'} {suffix.lower()}"
        spellings.update(
            {
                "zero-padded" if hour.startswith("0") else "plain",
                "no minutes" if minute is None else "minutes",
                "spaced" if space else "joined",
                "upper" if suffix.isupper() else "lower",
            }
        )
    assert len(spellings) == 8  # every variation of the spelling occurs


def test_jsonl_round_trip_and_one_line_errors(tmp_path):
    examples = [Example("a", " b"), Example("c\nd", ' {"x": 1}')]
    write_jsonl(examples, tmp_path / "ok.jsonl")
    assert read_jsonl(tmp_path / "ok.jsonl") == examples
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_split_held_out_keeps_every_prompt_on_one_side():
    examples = [Example(f"p{i % 10}", f" {i}") for i in range(50)]  # 10 prompts, 5 answers each
    task = split_held_out(examples, held_out_fraction=0.2, seed=3, source="x")
    assert len({e.prompt for e in task.held_out}) == 2
    assert {e.prompt for e in task.train}.isdisjoint({e.prompt for e in task.held_out})
    assert sorted(task.train + task.held_out, key=lambda e: int(e.completion)) == examples


def test_tokenize_masks_the_prompt_and_ends_with_eos():
    tokenizer = tiny_tokenizer()
    example = alarm_task(train_size=1, held_out_size=1).train[0]
    tokenized = tokenize(tokenizer, example, max_length=32)
    assert len(tokenized.input_ids) == 32  # the long prompt is cut from the left to fit
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert tokenized.labels[-len(completion) :] == completion
    assert set(tokenized.labels[: -len(completion)]) == {IGNORE_INDEX}
    assert tokenizer.decode(tokenized.input_ids[-len(completion) : -1]) == example.completion
    with pytest.raises(ValueError, match="raise --max-length"):
        tokenize(tokenizer, example, max_length=len(completion))


def test_collate_right_pads_with_no_loss_on_padding():
    tokenizer = tiny_tokenizer()
    examples = [tokenize(tokenizer, e, 128) for e in alarm_task(train_size=3, held_out_size=1).train]
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)


def test_batch_schedule_covers_each_epoch_once_and_reshuffles():
    schedule = batch_schedule(num_examples=10, batch_size=3, steps=7, seed=0)
    assert len(schedule) == 7 and all(len(b) == 3 for b in schedule)
    first_epoch, second_epoch = schedule[:3], schedule[3:6]  # 10 // 3 = 3 full batches an epoch
    assert len({i for b in first_epoch for i in b}) == 9 and len({i for b in second_epoch for i in b}) == 9
    assert first_epoch != second_epoch
    assert schedule == batch_schedule(num_examples=10, batch_size=3, steps=7, seed=0)
