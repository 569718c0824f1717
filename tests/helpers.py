"""Tiny transformers models built from configs (no hub), shared by the test files."""

from __future__ import annotations

import contextlib
import signal

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from benchmarks.fuzz_adapter_files import EmbeddingLinearConv  # noqa: F401 (used by the tests)

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        ffn_dim=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=24,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return OPTForCausalLM(config)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=24,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def tiny_roberta(seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=70,
        num_labels=3,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(config)


TINY_MODELS = {
    "llama": tiny_llama,
    "opt": tiny_opt,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "roberta": tiny_roberta,
}


def token_batch(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def output_tensor(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same weights, another float32 evaluation order (LoRA's (x A'^T) B'^T, weight space against activation
    space): a few roundings per output, so 64 units in the last place at the output's scale."""
    eps = torch.finfo(torch.float32).eps
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=64 * eps, atol=64 * eps * scale)


def randomize_lambdas(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero lambdas everywhere (at init lambda_b = 0 hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "vera_lambda_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


class Hung(Exception):
    """A call that should have returned long ago was still running (see `no_hang`)."""


@contextlib.contextmanager
def no_hang(seconds: float):
    """Fail (raise `Hung`) instead of hanging when the block runs longer than `seconds`.

    A guard for tests of code that used to loop for ever; it never decides a pass by timing (SIGALRM, main
    thread only, Unix).
    """

    def interrupt(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def model_state(model: torch.nn.Module) -> dict:
    """Everything a failed operation must leave as it was: modules (types, training mode), parameters
    (values, requires_grad), buffers, and for a VeraModel its adapters."""
    return {
        "modules": [(name, type(m).__name__, m.training) for name, m in model.named_modules()],
        "parameters": [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in model.named_buffers()],
        "adapters": (list(getattr(model, "peft_config", {})), getattr(model, "active_adapters", None)),
    }


def assert_same_model_state(actual: dict, expected: dict) -> None:
    assert actual["modules"] == expected["modules"]
    assert actual["adapters"] == expected["adapters"]
    for kind in ("parameters", "buffers"):
        assert [entry[0] for entry in actual[kind]] == [entry[0] for entry in expected[kind]], kind
        for now, before in zip(actual[kind], expected[kind], strict=True):
            assert torch.equal(now[1], before[1]), now[0]
            assert now[2:] == before[2:], f"{now[0]}: requires_grad"


def lm_batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    """A causal-LM training batch: 4 rows of 12 tokens, labels = inputs."""
    ids = token_batch(batch=4, seq=12).to(device)
    return {"input_ids": ids, "labels": ids}


def eval_loss(model: torch.nn.Module, inputs) -> float:
    model.eval()
    with torch.no_grad():
        return model(**inputs).loss.item()


def train_lambdas(model: torch.nn.Module, inputs, steps: int = 8, lr: float = 5e-2) -> None:
    """A few AdamW steps on whatever the model trains."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def veralab_lines(stdout: str, stderr: str) -> list[str]:
    """The lines of one process's output that veralab printed: every stdout line but torch's gloo
    connection notes ("[Gloo] Rank 1 is connected to 1 peer ranks...", from torch 2.8), and the stderr
    lines veralab writes (its "veralab ..." messages, the training progress). Other libraries' warnings on
    stderr (torchao's optional kernels, naming the venv's path) are theirs, on any rank."""
    printed = [line for line in stdout.splitlines() if not line.startswith("[Gloo]")]
    written = [line for line in stderr.splitlines() if line.startswith("veralab") or "training" in line]
    return printed + written
