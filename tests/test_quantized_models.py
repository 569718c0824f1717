"""Tiny Llama, OPT and GPT-2 models saved from their configs, loaded quantized by torchao, optimum-quanto and
HQQ (as `veralab finetune --quantize` loads them: `from_pretrained(..., quantization_config=TorchAoConfig /
QuantoConfig)`, HQQ layer by layer after loading), then adapted, trained for a few steps on the CPU (the loss
goes down), saved, reloaded onto a freshly quantized base (bit for bit the trained model) and merged.

GPT-2 keeps its attention and MLP in transformers' `Conv1D`, which transformers' torchao and quanto quantizers
leave in float: there VeRA adapts plain layers, and that is what the test pins. HQQ converts them.

GPTQ and AWQ models cannot be produced without calibration here: a Llama whose q/v projections are GPT-QModel
layers (round-to-nearest in the GPTQ / AWQ storage formats) trains, saves and loads, and refuses merging.

Packages missing here skip with the extra that installs them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import eval_loss, lm_batch, tiny_gpt2, tiny_llama, tiny_opt, train_lambdas
from torch import nn

from veralab import VeraConfig
from veralab.app.base_model import load_model
from veralab.app.options import QUANTIZATIONS
from veralab.fast import VeraLinear, VeraModel, get_model
from veralab.fast.backends import unavailable_reason
from veralab.fast.errors import MergeNotSupportedError

ARCHITECTURES = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}
# The --quantize choices beyond bitsandbytes (tests/test_bnb.py covers bnb-4bit / bnb-8bit) and the VeRA
# layer class each gives a quantized linear layer.
BACKEND_LAYERS = {
    "torchao-int8": "TorchaoLinear",
    "torchao-int4": "TorchaoLinear",
    "quanto-int8": "QuantoLinear",
    "quanto-int4": "QuantoLinear",
    "hqq-4bit": "HqqLinear",
}
CONVERTS_CONV1D = {"hqq-4bit"}


def backend_param(name: str):
    reason = unavailable_reason(QUANTIZATIONS[name][0])
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Each tiny architecture saved once, with random weights, to be reloaded quantized."""
    paths = {}
    for name, build in ARCHITECTURES.items():
        paths[name] = tmp_path_factory.mktemp(name)
        build().save_pretrained(paths[name])
    return paths


def lambdas_of(model: VeraModel) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{kind}": getattr(layer, kind)["default"].detach().clone()
        for name, layer in model.vera_layers()
        for kind in VeraLinear.adapter_layer_names
    }


@pytest.mark.parametrize("quantization", [backend_param(name) for name in BACKEND_LAYERS])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_quantized_model_trains_saves_reloads_and_merges(saved_models, architecture, quantization, tmp_path):
    inputs = lm_batch()
    path = saved_models[architecture]
    model = get_model(load_model(path, quantization), VeraConfig(r=16))
    expected = BACKEND_LAYERS[quantization]
    if architecture == "gpt2" and quantization not in CONVERTS_CONV1D:
        expected = "VeraLinear"  # Conv1D stays float under transformers' torchao / quanto quantizers
    assert {type(layer).__name__ for _, layer in model.vera_layers()} == {expected}
    initial = eval_loss(model, inputs)
    train_lambdas(model, inputs)
    trained = eval_loss(model, inputs)
    assert trained < initial

    model.save_pretrained(tmp_path)
    reloaded = VeraModel.from_pretrained(load_model(path, quantization), tmp_path)
    expected_lambdas = lambdas_of(model)
    for key, value in lambdas_of(reloaded).items():
        assert torch.equal(value, expected_lambdas[key]), key
    assert eval_loss(reloaded, inputs) == trained  # the same quantized base, the same lambdas

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the requantization warning
        merged = model.merge_and_unload()
    assert not any(isinstance(m, VeraLinear) for m in merged.modules())
    merged_loss = eval_loss(merged, inputs)
    assert abs(merged_loss - trained) < 0.5 * (initial - trained)  # the merge keeps what training learned


GPTQ_REASON = unavailable_reason("gptqmodel")


@pytest.mark.skipif(GPTQ_REASON is not None, reason=GPTQ_REASON or "")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_llama_over_gptq_or_awq_layers_trains_saves_reloads_and_refuses_merging(
    saved_models, method, tmp_path
):
    from transformers import AutoModelForCausalLM

    from veralab.fast.backends.gptq import quantized_copy

    def load() -> nn.Module:
        base = AutoModelForCausalLM.from_pretrained(saved_models["llama"])
        for layer in base.model.layers:
            attention = layer.self_attn
            attention.q_proj = quantized_copy(attention.q_proj, method, group_size=16)
            attention.v_proj = quantized_copy(attention.v_proj, method, group_size=16)
        return base

    inputs = lm_batch()
    model = get_model(load(), VeraConfig(r=16))
    assert {type(layer).__name__ for _, layer in model.vera_layers()} == {"GptqLinear"}
    initial = eval_loss(model, inputs)
    train_lambdas(model, inputs)
    trained = eval_loss(model, inputs)
    assert trained < initial
    model.save_pretrained(tmp_path)
    reloaded = VeraModel.from_pretrained(load(), tmp_path)
    assert eval_loss(reloaded, inputs) == trained
    with pytest.raises(MergeNotSupportedError, match="nothing was merged"):
        model.merge_and_unload()
    assert eval_loss(model, inputs) == trained
