"""The guarantees of every adapted layer class (VeraLinear, VeraEmbedding, VeraConv) on one model holding
one of each: a failed or interrupted change leaves the model exactly as it was, NaN/inf lambdas are refused
on save and flagged on load, naming the layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import EmbeddingLinearConv, assert_same_model_state, model_state, randomize_lambdas

from veralab import VeraConfig
from veralab.fast import VeraModel, get_model
from veralab.fast.conv import VeraConv
from veralab.fast.embedding import VeraEmbedding
from veralab.fast.layer import VeraLinear

IDS = torch.tensor([[1, 4, 2, 9, 0], [3, 3, 10, 7, 5]])
LAYER_CLASSES = {"embed": VeraEmbedding, "proj": VeraLinear, "conv": VeraConv}


def config(**kwargs) -> VeraConfig:
    return VeraConfig(**{"r": 4, "target_modules": EmbeddingLinearConv.TARGETS, **kwargs})


def adapted(seed: int = 0) -> VeraModel:
    torch.manual_seed(seed)
    model = get_model(EmbeddingLinearConv(), config())
    model.add_adapter("other", config())
    randomize_lambdas(model, seed=seed)
    return model.eval()


def merged(model: VeraModel) -> VeraModel:
    model.merge_adapter(["default", "other"])
    return model


def interrupt(monkeypatch, layer_class: type, method: str) -> None:
    """Ctrl-C when `layer_class.method` runs: the layers before it (in module order) are already done."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(layer_class, method, interrupted)


def case(operation: str, subject: str, run, method: str, prepare=None):
    return pytest.param(
        subject,
        run,
        method,
        prepare,
        id=operation,
        marks=pytest.mark.fault(
            "model",
            f"Ctrl-C during {operation} on a model with an Embedding, a Linear and a Conv1d target, in the "
            "last layer (the Embedding and the Linear already changed), and again in the first",
            "KeyboardInterrupt propagates; modules, parameters, requires_grad, buffers, adapters and outputs "
            "are exactly as before",
        ),
    )


CASES = [
    case("`get_model`", "base", lambda m, d: get_model(m, config()), "update_layer"),
    case("`from_pretrained`", "base", lambda m, d: VeraModel.from_pretrained(m, d), "update_layer"),
    case("`add_adapter`", "model", lambda m, d: m.add_adapter("third", config()), "update_layer"),
    case("`load_adapter`", "model", lambda m, d: m.load_adapter(d, "third"), "update_layer"),
    case("`merge_adapter`", "model", lambda m, d: m.merge_adapter(["default", "other"]), "set_base_weight"),
    case("`merge_and_unload`", "model", lambda m, d: m.merge_and_unload(), "set_base_weight"),
    case("`unmerge_adapter`", "model", lambda m, d: m.unmerge_adapter(), "set_base_weight", merged),
]


@pytest.mark.parametrize("interrupted_class", [VeraConv, VeraEmbedding], ids=["in-conv", "in-embedding"])
@pytest.mark.parametrize("subject, run, method, prepare", CASES)
def test_an_interrupted_change_restores_every_layer_class_exactly(
    subject, run, method, prepare, interrupted_class, tmp_path, monkeypatch
):
    adapted(seed=3).save_pretrained(tmp_path, selected_adapters=["default"])
    target = EmbeddingLinearConv().train() if subject == "base" else adapted()
    if prepare is not None:
        prepare(target)
    with torch.no_grad():
        expected = target(IDS)
    before = model_state(target)
    interrupt(monkeypatch, interrupted_class, method)
    with pytest.raises(KeyboardInterrupt):
        run(target, tmp_path)
    monkeypatch.undo()
    assert_same_model_state(model_state(target), before)
    with torch.no_grad():
        torch.testing.assert_close(target(IDS), expected, rtol=0, atol=0)
    if subject == "base":
        assert all(p.requires_grad for p in target.parameters())


def broken(model: VeraModel, layer: str, value: float) -> VeraModel:
    with torch.no_grad():
        getattr(model.model, layer).vera_lambda_d["default"][1] = value
    return model


@pytest.mark.fault(
    "file",
    "saving or exporting an adapter with NaN/inf lambdas in an Embedding, a Linear or a Conv layer",
    "ValueError naming the tensor and the opt-in `allow_non_finite=True`; nothing is written",
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layer", LAYER_CLASSES)
def test_non_finite_lambdas_are_not_saved_without_the_opt_in(layer, value, tmp_path):
    model = broken(adapted(), layer, value)
    assert isinstance(getattr(model.model, layer), LAYER_CLASSES[layer])
    with pytest.raises(ValueError, match=rf"model\.{layer}\.vera_lambda_d.*allow_non_finite=True"):
        model.save_pretrained(tmp_path / "vera", selected_adapters=["default"])
    with pytest.raises(ValueError, match="allow_non_finite=True"):
        model.save_as_lora(tmp_path / "lora")
    assert not (tmp_path / "vera").exists() and not (tmp_path / "lora").exists()


@pytest.mark.fault(
    "file",
    "loading an adapter whose lambdas hold NaN/inf (saved with `allow_non_finite=True`), in an Embedding, a "
    "Linear or a Conv layer",
    "loads, with a UserWarning naming the file and the layer",
)
@pytest.mark.parametrize("layer", LAYER_CLASSES)
def test_non_finite_lambdas_load_with_a_warning_naming_the_file_and_layer(layer, tmp_path):
    broken(adapted(), layer, float("nan")).save_pretrained(
        tmp_path, selected_adapters=["default"], allow_non_finite=True
    )
    with pytest.warns(UserWarning, match="hold NaN/inf") as caught:
        loaded = VeraModel.from_pretrained(EmbeddingLinearConv(), tmp_path)
    message = next(str(w.message) for w in caught if "NaN/inf" in str(w.message))
    assert str(tmp_path / "adapter_model.safetensors") in message and f"'{layer}'" in message
    others = [name for name in LAYER_CLASSES if name != layer]
    assert not any(f"'{name}'" in message for name in others)
    assert torch.isnan(getattr(loaded.model, layer).vera_lambda_d["default"]).any()


@pytest.mark.fault(
    "file",
    "loading an adapter whose lambdas are finite but so large (1e30) that a layer's adapter term can "
    "overflow, in an Embedding, a Linear or a Conv layer",
    "loads, with a UserWarning naming the file and the layer (outputs through it may be NaN/inf)",
)
@pytest.mark.parametrize("layer", LAYER_CLASSES)
def test_overflowing_lambdas_load_with_a_warning_naming_the_file_and_layer(layer, tmp_path):
    model = adapted()
    with torch.no_grad():
        getattr(model.model, layer).vera_lambda_d["default"].fill_(1e30)
        getattr(model.model, layer).vera_lambda_b["default"].fill_(1e30)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    with pytest.warns(UserWarning, match="adapter term exceeds 1e\\+12") as caught:
        VeraModel.from_pretrained(EmbeddingLinearConv(), tmp_path)
    message = next(str(w.message) for w in caught if "adapter term exceeds" in str(w.message))
    assert str(tmp_path / "adapter_model.safetensors") in message and f"['{layer}']" in message


def test_finite_lambdas_load_without_a_warning(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    torch.manual_seed(0)  # the base `adapted` built
    base = EmbeddingLinearConv()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = VeraModel.from_pretrained(base, tmp_path)
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)
