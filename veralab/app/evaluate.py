"""Exact-match accuracy: greedy generation on held-out prompts, compared with the expected completion.

An answer counts when the generated text up to the end-of-sequence token, stripped of surrounding
whitespace, equals the expected completion stripped the same way. Several processes each generate their
share of the examples and the counts are summed. A model sharded over the processes (FSDP2) gathers each
layer's weights in every forward, a collective: then every process makes the same number of `generate` calls
(one with fewer batches adds calls on a filler prompt, not counted) and keeps running forwards until all are
done (`synced_gpus`); the batches that count are the ones DistributedDataParallel generates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig

from veralab.app.data import Example, prompt_ids
from veralab.app.distributed import Cluster
from veralab.fast.dtensors import is_sharded


@dataclass
class ExactMatch:
    """Exact-match result: `correct` of `total`, and a few (prompt, expected, generated) samples from rank
    0."""

    correct: int
    total: int
    samples: list[tuple[str, str, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _left_padded(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts so every row's next token is generated at the same position."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, longest - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, longest - len(sequence) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    synced_calls: int | None = None,
    filler_prompt: str | None = None,
) -> list[str]:
    """Greedy completions of `prompts`, each cut at the first end-of-sequence token.

    Args:
        model: a causal language model (or a VeraModel around one) with `generate`.
        tokenizer: its tokenizer (its eos token ends an answer).
        prompts: the prompts, tokenized exactly as in training.
        max_new_tokens: the longest answer generated.
        batch_size: prompts generated together.
        synced_calls: the model is sharded over processes: make exactly this many `generate` calls (the
            ones past the prompts' batches on `filler_prompt`, their answers dropped), each running forwards
            until every process is done.
        filler_prompt: the prompt of those extra calls (default: the first of `prompts`).
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    starts = list(range(0, len(prompts), batch_size))
    calls = len(starts) if synced_calls is None else synced_calls
    for call in range(calls):
        chunk = prompts[starts[call] : starts[call] + batch_size] if call < len(starts) else None
        chunk = chunk or [filler_prompt if filler_prompt is not None else prompts[0]]
        batch = _left_padded([prompt_ids(tokenizer, p) for p in chunk], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        generated = model.generate(**batch, generation_config=config, synced_gpus=synced_calls is not None)
        if call < len(starts):
            answers.extend(
                tokenizer.decode(_until_eos(row.tolist(), tokenizer.eos_token_id))
                for row in generated[:, batch["input_ids"].shape[1] :]
            )
    model.train(was_training)
    return answers


def _until_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


def exact_match(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    cluster: Cluster | None = None,
    batch_size: int = 32,
    samples: int = 3,
    max_new_tokens: int | None = None,
) -> ExactMatch:
    """Exact-match accuracy of greedy generation on `examples`, each rank generating its share.

    Args:
        model: the model to evaluate (not wrapped in DistributedDataParallel).
        tokenizer: its tokenizer.
        examples: the held-out examples.
        cluster: the processes sharing the work (default: this one alone).
        batch_size: prompts generated together.
        samples: how many (prompt, expected, generated) triples to keep for display.
        max_new_tokens: the longest answer generated (default: the longest expected answer + 2 tokens).
    """
    cluster = cluster or Cluster()
    if not examples:
        raise ValueError("no held-out examples to evaluate; give at least one")
    if max_new_tokens is None:
        max_new_tokens = 2 + max(
            len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) for e in examples
        )
    mine = cluster.shard(examples)
    synced_calls = None
    if cluster.distributed and is_sharded(model):  # every process calls generate as often as the busiest
        synced_calls = math.ceil(math.ceil(len(examples) / cluster.world_size) / batch_size)
    answers = generate_answers(
        model,
        tokenizer,
        [e.prompt for e in mine],
        max_new_tokens,
        batch_size,
        synced_calls=synced_calls,
        filler_prompt=examples[0].prompt,
    )
    correct = sum(answer.strip() == e.completion.strip() for answer, e in zip(answers, mine, strict=True))
    (correct_total,) = cluster.sum([correct])
    kept = [
        (e.prompt, e.completion, answer) for e, answer in zip(mine[:samples], answers[:samples], strict=True)
    ]
    return ExactMatch(correct=int(correct_total), total=len(examples), samples=kept)
