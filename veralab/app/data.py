"""Training data for the main job: the embedded alarm task, JSON-lines files, tokenization and batching.

An example is a `prompt` and the `completion` the model should write after it. The embedded task is
generated here, deterministically from a seed, so veralab ships its data without shipping a file:

    prompt:      Convert the request into JSON with the day and the time.
                 Request: wake me up at 07:30PM on Tuesday
                 JSON:
    completion:   {"day": "tue", "time": "7:30 pm"}

A pretrained model does not answer in this exact form zero-shot (SmolLM2-135M-Instruct scores 0% exact
match: it writes full day names and keeps the request's spelling of the time), and learns it in a few dozen
steps: the phrasing varies, and every spelling of a time ("07:30PM", "7pm", "7:30 PM") must become one.
The held-out split shares no (day, time) answer with the training split, so exact match on it measures
generalization.

User data is a JSON-lines file with one `{"prompt": ..., "completion": ...}` object per line.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch

ALARM_INSTRUCTION = "Convert the request into JSON with the day and the time."
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MINUTES = (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55)
REQUEST_TEMPLATES = (
    "Set an alarm for {time} on {day}",
    "wake me up at {time} on {day}",
    "Please set an alarm on {day} at {time}",
    "{day} {time} alarm",
    "I need to be up by {time} on {day}, set an alarm",
    "can you ring me at {time} {day}?",
    "alarm {day} {time}",
)


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: the model reads `prompt` and should write `completion`."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class TaskData:
    """A task's two disjoint splits, and where they came from (for the summary)."""

    train: list[Example]
    held_out: list[Example]
    source: str


# ---------------------------------------------------------------------------------------------------
# The embedded alarm task
# ---------------------------------------------------------------------------------------------------


def _spoken_time(hour24: int, minute: int, rng: random.Random) -> str:
    """A 12-hour clock time the way people type it: "7:30 pm", "7pm", "07:30 PM", "12:05am"."""
    hour12 = hour24 % 12 or 12
    suffix = "am" if hour24 < 12 else "pm"
    suffix = rng.choice((suffix, suffix.upper()))
    if minute == 0 and rng.random() < 0.5:
        clock = str(hour12)
    else:
        clock = f"{rng.choice((str(hour12), f'{hour12:02d}'))}:{minute:02d}"
    return clock + rng.choice(("", " ")) + suffix


def _canonical_time(hour24: int, minute: int) -> str:
    """The answer's one spelling of a time: "7:30 pm", "12:05 am"."""
    return f"{hour24 % 12 or 12}:{minute:02d} {'am' if hour24 < 12 else 'pm'}"


def _alarm_example(day: str, hour24: int, minute: int, rng: random.Random) -> Example:
    template = rng.choice(REQUEST_TEMPLATES)
    spoken_day = rng.choice((day, day.capitalize()))
    request = template.format(time=_spoken_time(hour24, minute, rng), day=spoken_day)
    prompt = f"{ALARM_INSTRUCTION}\nRequest: {request}\nJSON:"
    completion = " " + json.dumps({"day": day[:3], "time": _canonical_time(hour24, minute)})
    return Example(prompt=prompt, completion=completion)


def alarm_task(train_size: int = 512, held_out_size: int = 64, seed: int = 0) -> TaskData:
    """The embedded task: alarm requests in free phrasing -> `{"day": "tue", "time": "7:30 pm"}`.

    Args:
        train_size: number of training examples.
        held_out_size: number of held-out examples; their (day, time) answers never occur in training.
        seed: everything (answers, phrasing, split) follows from it.
    """
    answers = [(day, hour, minute) for day in DAYS for hour in range(24) for minute in MINUTES]
    if held_out_size + 1 > len(answers):
        raise ValueError(
            f"held_out_size={held_out_size} leaves no answer for training: the alarm task has {len(answers)} "
            "distinct answers; ask for fewer held-out examples"
        )
    rng = random.Random(seed)
    rng.shuffle(answers)
    held_out_answers, train_answers = answers[:held_out_size], answers[held_out_size:]
    held_out = [_alarm_example(*answer, rng) for answer in held_out_answers]
    train = [_alarm_example(*rng.choice(train_answers), rng) for _ in range(train_size)]
    return TaskData(train=train, held_out=held_out, source=f"embedded alarm task (seed {seed})")


# ---------------------------------------------------------------------------------------------------
# JSON-lines files
# ---------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read `{"prompt": ..., "completion": ...}` lines; blank lines are skipped, anything else is an error."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from e
            if not (
                isinstance(record, dict)
                and isinstance(record.get("prompt"), str)
                and isinstance(record.get("completion"), str)
                and record["completion"].strip()
            ):
                raise ValueError(
                    f'{path}:{number}: expected an object with string fields "prompt" and a non-empty '
                    f'"completion", got {line.strip()[:80]!r}'
                )
            examples.append(Example(prompt=record["prompt"], completion=record["completion"]))
    if not examples:
        raise ValueError(
            f'{path} holds no examples; write one JSON object per line with "prompt" and "completion"'
        )
    return examples


def write_jsonl(examples: list[Example], path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps({"prompt": example.prompt, "completion": example.completion}) + "\n")


def split_held_out(examples: list[Example], held_out_fraction: float, seed: int, source: str) -> TaskData:
    """Shuffle and split user examples; an example whose prompt is held out never occurs in training.

    Args:
        examples: all examples.
        held_out_fraction: share of distinct prompts held out for evaluation, in (0, 1).
        seed: the shuffle's seed.
        source: where the examples came from, for the summary.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(
            f"held_out_fraction={held_out_fraction} is invalid: expected a number in (0, 1), e.g. 0.1"
        )
    prompts = sorted({example.prompt for example in examples})
    if len(prompts) < 2:
        raise ValueError(
            f"{source} has {len(prompts)} distinct prompt(s); at least 2 are needed to hold one out"
        )
    random.Random(seed).shuffle(prompts)
    held_out_count = min(len(prompts) - 1, max(1, round(held_out_fraction * len(prompts))))
    held_out_prompts = set(prompts[:held_out_count])
    return TaskData(
        train=[e for e in examples if e.prompt not in held_out_prompts],
        held_out=[e for e in examples if e.prompt in held_out_prompts],
        source=source,
    )


# ---------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------

IGNORE_INDEX = -100  # the label of prompt and padding tokens: no loss there


@dataclass(frozen=True)
class TokenizedExample:
    """`input_ids` = prompt + completion + eos; `labels` are -100 over the prompt (loss on the answer
    only)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens, with the tokenizer's own special tokens (e.g. BOS) as at generation time."""
    return tokenizer(prompt)["input_ids"]


def tokenize(tokenizer, example: Example, max_length: int) -> TokenizedExample:
    """Tokenize prompt and completion separately (so the prompt's tokens match generation) and join them.

    Args:
        tokenizer: a transformers tokenizer with an eos token.
        example: the example.
        max_length: the prompt is cut from the left so the whole fits; the completion is never cut.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no eos token; the model must learn where an "
            "answer ends: set tokenizer.eos_token in the model directory's tokenizer_config.json"
        )
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    if len(completion) >= max_length:
        raise ValueError(
            f"a completion is {len(completion)} tokens long but max_length={max_length}; raise --max-length "
            f"(completion starts {example.completion[:60]!r})"
        )
    prompt = prompt_ids(tokenizer, example.prompt)[-(max_length - len(completion)) :]
    return TokenizedExample(input_ids=prompt + completion, labels=[IGNORE_INDEX] * len(prompt) + completion)


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: `input_ids`, `attention_mask` and `labels`, each (batch, longest)."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
