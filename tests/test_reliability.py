"""Bad inputs to a model: each raises (or warns) clearly and leaves outputs and state dict exactly as they
were."""

import warnings

import pytest
import torch
from helpers import (
    assert_same_model_state,
    model_state,
    output_tensor,
    randomize_lambdas,
    tiny_llama,
    token_batch,
)
from torch import nn

from veralab import VeraConfig
from veralab.fast import VeraLinear, VeraModel, get_model

QV = ["q_proj", "v_proj"]


def quiet_config(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VeraConfig(**{"r": 8, "target_modules": QV, **kwargs})


def two_adapter_model():
    model = get_model(tiny_llama(), VeraConfig(r=8, target_modules=QV))
    model.add_adapter("other", VeraConfig(r=8, target_modules=QV))
    randomize_lambdas(model)
    return model.eval()


def merged(model):
    model.merge_adapter()
    return model


def only_default(model):
    model.delete_adapter("other")
    return model


def fault(case, behaviour, operation, expected, match, prepare=None):
    """One model fault: `operation(model)` must raise/warn `expected` matching `match` and change nothing."""
    return pytest.param(
        prepare,
        operation,
        expected,
        match,
        id=case,
        marks=pytest.mark.fault("model", case, behaviour + "; model unchanged"),
    )


MODEL_FAULTS = [
    fault(
        "target that matches nothing",
        "ValueError naming the target and showing real module names",
        lambda m: m.add_adapter("x", quiet_config(target_modules=["q_proj", "nope"])),
        ValueError,
        r"\['nope'\] match no module",
    ),
    fault(
        "target that is a rotary position embedding (no weight)",
        "ValueError naming the module and its type",
        lambda m: m.add_adapter("x", quiet_config(target_modules=["rotary_emb"])),
        ValueError,
        "is a LlamaRotaryEmbedding, which VeRA cannot adapt",
    ),
    fault(
        "target that is a norm layer",
        "ValueError naming the module and its type",
        lambda m: m.add_adapter("x", quiet_config(target_modules=["input_layernorm"])),
        ValueError,
        "LlamaRMSNorm, which VeRA cannot adapt",
    ),
    fault(
        "layer indices that select nothing",
        "ValueError naming targets, indices and pattern",
        lambda m: m.add_adapter("x", quiet_config(layers_to_transform=[9], layers_pattern="layers")),
        ValueError,
        "selects no module",
    ),
    fault(
        "duplicate adapter name",
        "ValueError: already exists",
        lambda m: m.add_adapter("other", quiet_config()),
        ValueError,
        "already exists",
    ),
    fault(
        "reserved adapter name `__base__`",
        "ValueError: reserved for base rows of mixed batches",
        lambda m: m.add_adapter("__base__", quiet_config()),
        ValueError,
        "reserved",
    ),
    fault(
        "adapter name with a dot",
        "ValueError: it would corrupt state-dict keys",
        lambda m: m.add_adapter("a.b", quiet_config()),
        ValueError,
        "without '.'",
    ),
    *[
        fault(
            f"adapter name {case}",
            "ValueError stating the rule (one path component: printable, no '.', '/' or '\\')",
            lambda m, name=name: m.add_adapter(name, quiet_config()),
            ValueError,
            "is invalid: use a non-empty string of printable characters without",
        )
        for case, name in [
            ("that is an absolute path (`/tmp/elsewhere`: a save would write there)", "/tmp/elsewhere"),
            ("that climbs out of the save directory (`../escape`)", "../escape"),
            ("with a Windows separator (`a\\b`)", "a\\b"),
            ("that is empty", ""),
            ("with a control character (a tab)", "tab\tname"),
            ("that is not a string (`3`)", 3),
        ]
    ],
    fault(
        "activating a missing adapter",
        "ValueError listing the model's adapters",
        lambda m: m.set_adapter("missing"),
        ValueError,
        r"unknown adapter\(s\) \['missing'\]",
    ),
    fault(
        "deleting a missing adapter",
        "ValueError listing the model's adapters",
        lambda m: m.delete_adapter("missing"),
        ValueError,
        "unknown adapter 'missing'",
    ),
    fault(
        "deleting the last adapter",
        "ValueError pointing to unload()",
        lambda m: m.delete_adapter("default"),
        ValueError,
        "last adapter",
        prepare=only_default,
    ),
    fault(
        "deleting a merged adapter",
        "ValueError: unmerge first",
        lambda m: m.delete_adapter("default"),
        ValueError,
        "unmerge_adapter\\(\\) first",
        prepare=merged,
    ),
    fault(
        "merging twice",
        "UserWarning, the second merge is skipped",
        lambda m: m.merge_adapter(),
        UserWarning,
        "already merged",
        prepare=merged,
    ),
    fault(
        "unmerging with nothing merged",
        "UserWarning, nothing happens",
        lambda m: m.unmerge_adapter(),
        UserWarning,
        "nothing to unmerge",
    ),
    fault(
        "merging an unknown adapter",
        "ValueError listing the model's adapters",
        lambda m: m.merge_adapter(["nope"]),
        ValueError,
        "unknown adapter",
    ),
    fault(
        "mixed batch naming an unknown adapter",
        "ValueError naming it",
        lambda m: m(token_batch(batch=2), adapter_names=["default", "nope"]),
        ValueError,
        r"unknown adapter\(s\) \['nope'\]",
    ),
    fault(
        "mixed batch with the wrong number of names",
        "ValueError with both counts",
        lambda m: m(token_batch(batch=2), adapter_names=["default"]),
        ValueError,
        "1 entries but the batch has 2 rows",
    ),
    fault(
        "mixed batch on merged weights",
        "ValueError: unmerge first",
        lambda m: m(token_batch(batch=2), adapter_names=["default", "other"]),
        ValueError,
        "unmerged weights",
        prepare=merged,
    ),
]


@pytest.mark.parametrize("prepare, operation, expected, match", MODEL_FAULTS)
def test_model_fault_is_clear_and_changes_nothing(prepare, operation, expected, match):
    model = two_adapter_model()
    if prepare is not None:
        prepare(model)
    ids = token_batch()
    with torch.no_grad():
        expected_output = output_tensor(model(ids))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapters, active = dict(model.peft_config), model.active_adapters
    checker = pytest.warns if issubclass(expected, Warning) else pytest.raises
    with checker(expected, match=match):
        operation(model)
    assert dict(model.peft_config) == adapters and model.active_adapters == active
    assert model.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(model(ids)), expected_output, rtol=0, atol=0)


@pytest.mark.fault(
    "model",
    "NaN/inf lambdas merged with `safe_merge=True`",
    "ValueError naming the layer before any weight changes; no layer is merged",
)
def test_safe_merge_with_nan_lambdas_changes_nothing():
    model = two_adapter_model()
    last = list(model.vera_layers())[-1][1]
    with torch.no_grad():
        last.vera_lambda_d["default"][0] = float("inf")
    weights = {n: layer.base_layer.weight.clone() for n, layer in model.vera_layers()}
    with pytest.raises(ValueError, match="NaN/inf.*nothing was merged"):
        model.merge_adapter(safe_merge=True)
    for name, layer in model.vera_layers():
        assert torch.equal(layer.base_layer.weight, weights[name]) and not layer.merged


@pytest.mark.parametrize(
    "module, target, kind",
    [
        pytest.param(
            nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)),
            "0",
            "Conv2d",
            id="grouped-conv2d",
            marks=pytest.mark.fault(
                "model",
                "target that is a grouped Conv2d (groups > 1)",
                "ValueError naming the module, its type and why groups are refused",
            ),
        ),
        pytest.param(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
            "1",
            "LayerNorm",
            id="layernorm",
            marks=pytest.mark.fault(
                "model", "target that is a LayerNorm", "ValueError naming the module and its type"
            ),
        ),
    ],
)
def test_unsupported_layers_on_plain_modules(module, target, kind):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=rf"target '{target}' is a {kind}, which VeRA cannot adapt: \w+"):
        get_model(module, VeraConfig(r=2, target_modules=[target]))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert all(type(m).__module__.startswith("torch") for m in module.modules())  # nothing was replaced


@pytest.mark.fault(
    "model",
    "a model without a config and `target_modules=None`",
    "ValueError: no model type to look defaults up; set target_modules",
)
def test_model_without_config_needs_explicit_targets():
    with pytest.raises(ValueError, match="has no config.model_type"):
        get_model(nn.Sequential(nn.Linear(3, 3)), VeraConfig(r=2))


# ---------------------------------------------------------------------------------------------------
# All or nothing: a failure midway, KeyboardInterrupt included, restores the model exactly
# ---------------------------------------------------------------------------------------------------


@pytest.mark.fault(
    "model",
    "`VeraConfig.d_initial` set to 1e39 after the config was built (finite, beyond float32)",
    "ValueError naming d_initial before any layer is injected; the base model is unchanged",
)
def test_a_config_made_invalid_after_construction_is_refused_before_anything_changes():
    base = tiny_llama().eval()
    before = model_state(base)
    config = quiet_config()
    config.d_initial = 1e39
    with pytest.raises(ValueError, match="VeraConfig.d_initial=1e\\+39 is invalid"):
        get_model(base, config)
    assert_same_model_state(model_state(base), before)


def test_adapter_names_are_checked_by_every_entry_point(tmp_path):
    model = two_adapter_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    base = tiny_llama()
    before = model_state(base)
    with pytest.raises(ValueError, match="is invalid: use a non-empty string"):
        get_model(base, quiet_config(), adapter_name="/tmp/elsewhere")
    with pytest.raises(ValueError, match="is invalid: use a non-empty string"):
        VeraModel.from_pretrained(base, tmp_path, adapter_name="../x")
    assert_same_model_state(model_state(base), before)
    with pytest.raises(ValueError, match="is invalid: use a non-empty string"):
        model.load_adapter(tmp_path, "a/b")
    assert list(model.peft_config) == ["default", "other"]


def interrupt_at(monkeypatch, owner, name: str, after: int) -> None:
    """Let `owner.name` run `after` times, then raise KeyboardInterrupt (a Ctrl-C midway)."""
    original, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) > after:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


def saved_adapter(directory):
    model = two_adapter_model()
    randomize_lambdas(model, seed=5)
    model.save_pretrained(directory, selected_adapters=["default"])


def interrupted_case(case: str, subject: str, run, owner, name: str, after: int, prepare=None):
    return pytest.param(
        subject,
        run,
        owner,
        name,
        after,
        prepare,
        id=case,
        marks=pytest.mark.fault(
            "model",
            f"Ctrl-C (KeyboardInterrupt) during {case}",
            "the exception propagates; the model is restored exactly (modules, parameters, requires_grad, "
            "buffers, training mode, adapters, outputs)",
        ),
    )


INTERRUPTED = [
    interrupted_case(
        "`get_model`, after two of four layers were injected",
        "base",
        lambda base, d: get_model(base, quiet_config()),
        VeraLinear,
        "update_layer",
        2,
    ),
    interrupted_case(
        "`from_pretrained`, after two of four layers were injected",
        "base",
        lambda base, d: VeraModel.from_pretrained(base, d),
        VeraLinear,
        "update_layer",
        2,
    ),
    interrupted_case(
        "`from_pretrained`, after the lambdas were copied in",
        "base",
        lambda base, d: VeraModel.from_pretrained(base, d),
        VeraModel,
        "eval",
        0,
    ),
    interrupted_case(
        "`add_adapter`, after two of four layers were injected",
        "model",
        lambda m, d: m.add_adapter("third", quiet_config()),
        VeraLinear,
        "update_layer",
        2,
    ),
    interrupted_case(
        "`load_adapter` of a new adapter, midway through injecting it",
        "model",
        lambda m, d: m.load_adapter(d, "third"),
        VeraLinear,
        "update_layer",
        2,
    ),
    interrupted_case(
        "`load_adapter` into an existing adapter, after its weights were overwritten in place",
        "model",
        lambda m, d: m.load_adapter(d, "other"),
        VeraModel,
        "eval",
        0,
    ),
    interrupted_case(
        "`merge_adapter`, after two of four layers were merged",
        "model",
        lambda m, d: m.merge_adapter(["default", "other"]),
        VeraLinear,
        "set_base_weight",
        2,
    ),
    interrupted_case(
        "`merge_and_unload`, after the merge, while unloading",
        "model",
        lambda m, d: m.merge_and_unload(),
        VeraModel,
        "_replace_module",
        2,
    ),
    interrupted_case(
        "`unmerge_adapter`, after two of four layers were unmerged",
        "model",
        lambda m, d: m.unmerge_adapter(),
        VeraLinear,
        "set_base_weight",
        2,
        prepare=merged,
    ),
    interrupted_case(
        "`unload` of a merged model, midway through unmerging",
        "model",
        lambda m, d: m.unload(),
        VeraLinear,
        "set_base_weight",
        1,
        prepare=merged,
    ),
]


@pytest.mark.parametrize("subject, run, owner, name, after, prepare", INTERRUPTED)
def test_an_interrupted_operation_restores_the_model_exactly(
    subject, run, owner, name, after, prepare, tmp_path, monkeypatch
):
    saved_adapter(tmp_path)
    target = tiny_llama().train() if subject == "base" else two_adapter_model()
    if prepare is not None:
        prepare(target)
    ids = token_batch()
    with torch.no_grad():
        expected_output = output_tensor(target(ids))
    before = model_state(target)
    interrupt_at(monkeypatch, owner, name, after)
    with pytest.raises(KeyboardInterrupt):
        run(target, tmp_path)
    monkeypatch.undo()
    assert_same_model_state(model_state(target), before)
    if subject == "base":
        assert all(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(target(ids)), expected_output, rtol=0, atol=0)
