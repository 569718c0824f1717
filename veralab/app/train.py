"""The training loop: AdamW on the trainable parameters of a VeRA model, one process or several.

    result = train(vera_model, tokenizer, examples, TrainingOptions(steps=30, batch_size=8))

`batch_size` is the *global* batch. Every process computes the same schedule of global batches from the
seed and takes its own share of each (`Cluster.shard`); the loss is the sum of the token losses divided by
the global batch's number of answer tokens, so N processes compute exactly the gradient that one process
computes on the whole batch, up to floating-point summation order. Gradients are averaged by
DistributedDataParallel; the frozen projections are never broadcast (see `veralab.app.distributed`).

Training stops at the first step whose loss is NaN/inf (before that step updates anything), and when the
trained parameters end up NaN/inf, with a `NonFiniteLossError`: a diverged run produces no adapter.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from veralab.app.data import IGNORE_INDEX, Example, TokenizedExample, collate, tokenize
from veralab.app.distributed import Cluster
from veralab.app.options import TrainingOptions


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a step's loss (or the trained parameters) became NaN/inf."""


@dataclass
class TrainingResult:
    """What training did: the loss of every step (over the global batch), wall time and tokens seen."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def batch_schedule(num_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The global batches of example indices, identical on every process.

    Each epoch is a fresh permutation drawn from `seed`; a last partial batch is dropped so every step sees
    `batch_size` examples.
    """
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_examples // batch_size
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(num_examples, generator=generator).tolist()
        batches.extend(order[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
    return batches[:steps]


def answer_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the next-token cross-entropies over the answer tokens (labels != -100).

    Args:
        logits: (batch, seq, vocab) from a causal language model.
        labels: (batch, seq), -100 where there is no loss.
    """
    predictions = (
        logits[:, :-1].flatten(0, 1).float()
    )  # (batch * (seq - 1), vocab): position t predicts t + 1
    targets = labels[:, 1:].flatten()  # (batch * (seq - 1),)
    return F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters; adapt it with veralab.fast.get_model first")
    return parameters


def wrap_for_cluster(model: nn.Module, cluster: Cluster) -> nn.Module:
    """DistributedDataParallel over several processes, the model itself for one.

    Nothing is broadcast: not at start (`init_sync=False`: every rank loads the same weights and draws the
    same projections, which `train` checks by checksum) and not before each forward (buffers are frozen).
    """
    if not cluster.distributed:
        return model
    device_ids = [cluster.device.index] if cluster.device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(model, device_ids=device_ids, init_sync=False, **no_buffer_sync)


def train(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    options: TrainingOptions,
    cluster: Cluster | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train `model`'s trainable parameters on `examples` (loss on the completion tokens only).

    Args:
        model: a causal language model adapted with VeRA (only its lambdas require grad), on
            `cluster.device`.
        tokenizer: the model's tokenizer.
        examples: the training examples.
        options: steps, batch, learning rate, ...
        cluster: the training processes (default: this one alone).
        progress: show a progress bar with loss and throughput (on rank 0 only).
    """
    cluster = cluster or Cluster()
    options.validate(len(examples), cluster.world_size)
    tokenized = [tokenize(tokenizer, example, options.max_length) for example in examples]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parameters = trainable_parameters(model)
    cluster.check_identical(
        {
            name: tensor
            for name, tensor in model.named_buffers()
            if name.split(".")[-1] in ("vera_A", "vera_B")
        }
        | {name: p for name, p in model.named_parameters() if p.requires_grad}
    )

    torch.manual_seed(options.seed + cluster.rank)  # dropout masks differ per rank, like per-example masks
    steps = options.total_steps(len(examples))
    schedule = batch_schedule(len(examples), options.batch_size, steps, options.seed)
    optimizer = torch.optim.AdamW(parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
    trained = wrap_for_cluster(model, cluster)
    trained.train()

    result = TrainingResult()
    bar = tqdm(
        total=steps,
        desc="training",
        unit="step",
        disable=not (progress and cluster.is_main),
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    for step, global_batch in enumerate(schedule, start=1):
        loss, tokens = _step(trained, optimizer, [tokenized[i] for i in global_batch], pad_token_id, cluster)
        if not math.isfinite(loss):
            bar.close()
            raise NonFiniteLossError(
                f"training diverged: the loss of step {step} of {steps} is {loss} (the steps before had "
                f"{_last(result.losses)}); nothing was saved. Lower the learning rate (learning_rate="
                f"{options.learning_rate}) or check the data"
            )
        result.losses.append(loss)
        result.tokens += tokens
        result.seconds = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss:.4f}", tok_per_s=f"{result.tokens_per_second:,.0f}", refresh=False)
        bar.update()
    bar.close()
    broken = [name for name, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
    if broken:
        raise NonFiniteLossError(
            f"training diverged: after the last step {len(broken)} trained parameter(s) hold NaN/inf (e.g. "
            f"{broken[:2]}); nothing was saved. Lower the learning rate (learning_rate="
            f"{options.learning_rate})"
        )
    model.eval()
    return result


def _last(losses: list[float]) -> str:
    return f"a last loss of {losses[-1]:.4g}" if losses else "no steps"


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    global_batch: list[TokenizedExample],
    pad_token_id: int,
    cluster: Cluster,
) -> tuple[float, int]:
    """One optimizer step on this rank's share of the global batch; returns (global mean loss, global
    tokens). A step whose loss is NaN/inf (on any rank: the sum is global) changes nothing."""
    answer_tokens = sum(example.target_tokens for example in global_batch)
    batch = {k: v.to(cluster.device) for k, v in collate(cluster.shard(global_batch), pad_token_id).items()}
    labels = batch.pop("labels")
    loss_sum = answer_token_loss_sum(model(**batch).logits, labels)
    # DDP averages gradients over ranks, hence * world_size: the result is the global batch's mean.
    (loss_sum * (cluster.world_size / answer_tokens)).backward()
    loss_total, tokens = cluster.sum([loss_sum.item(), batch["attention_mask"].sum().item()])
    if math.isfinite(loss_total):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total / answer_tokens, int(tokens)
