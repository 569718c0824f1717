"""`get_peft_model_state_dict` / `set_peft_model_state_dict` beyond what PEFT does: a set that does not fit
writes nothing, lambdas on the meta device are materialized, a given state dict must hold the adapter.
(What they share with PEFT is compared in test_peft_parity.py.)"""

import warnings

import pytest
import torch
from helpers import assert_fp32_close, randomize_lambdas, tiny_bert, tiny_llama, token_batch

from veralab import VeraConfig
from veralab.fast import get_model, get_peft_model_state_dict, set_peft_model_state_dict

QV = ["q_proj", "v_proj"]


def adapted(seed: int = 0, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_model(tiny_llama(), VeraConfig(r=4, target_modules=QV, **kwargs))
    randomize_lambdas(model, seed=seed)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_tensors_are_the_models_own_and_a_given_state_dict_gives_the_same():
    model = adapted()
    state = get_peft_model_state_dict(model)
    layer = model.model.model.layers[0].self_attn.q_proj
    key = "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b"
    assert state[key].data_ptr() == layer.vera_lambda_b["default"].data_ptr() and not state[key].requires_grad
    given = get_peft_model_state_dict(model, state_dict=model.state_dict())
    assert given.keys() == state.keys() and all(torch.equal(given[k], state[k]) for k in state)
    assert get_peft_model_state_dict(torch.compile(model), unwrap_compiled=True).keys() == state.keys()


@pytest.mark.fault(
    "model",
    "get_peft_model_state_dict with a state_dict lacking some of the adapter's tensors",
    "ValueError naming the missing keys",
)
def test_a_given_state_dict_must_hold_the_adapter():
    model = adapted()
    partial = {k: v for k, v in model.state_dict().items() if "layers.1" not in k}
    with pytest.raises(ValueError, match=r"lacks 4 tensor\(s\) of adapter 'default'"):
        get_peft_model_state_dict(model, state_dict=partial)


@pytest.mark.fault(
    "model",
    "get_peft_model_state_dict(save_embedding_layers=True)",
    "ValueError: a VeRA adapter holds no embedding weights",
)
def test_embedding_layers_are_not_part_of_an_adapter():
    with pytest.raises(ValueError, match="holds no embedding weights"):
        get_peft_model_state_dict(adapted(), save_embedding_layers=True)


def drop_one(state):
    return dict(list(state.items())[1:])


def add_one(state):
    return {**state, "base_model.model.model.layers.0.mlp.up_proj.vera_lambda_b": torch.zeros(44)}


def integer_lambdas(state):
    return {k: (v.to(torch.int64) if "lambda_d" in k else v) for k, v in state.items()}


def wider(state):
    key = next(k for k in state if k.endswith("vera_lambda_b"))
    return {**state, key: torch.zeros(state[key].shape[0] + 1)}


@pytest.mark.parametrize(
    "edit, error, message",
    [
        pytest.param(
            drop_one,
            ValueError,
            r"missing 1 key\(s\)",
            id="missing key",
            marks=pytest.mark.fault(
                "model",
                "set_peft_model_state_dict without one of the adapter's keys",
                "ValueError; nothing written",
            ),
        ),
        pytest.param(
            add_one,
            ValueError,
            r"1 unexpected key\(s\)",
            id="unexpected key",
            marks=pytest.mark.fault(
                "model",
                "set_peft_model_state_dict with a key the adapter does not have",
                "ValueError (PEFT ignores it); nothing written",
            ),
        ),
        pytest.param(
            integer_lambdas,
            ValueError,
            "adapter tensors are floating point",
            id="integer tensors",
            marks=pytest.mark.fault(
                "model", "set_peft_model_state_dict with integer tensors", "ValueError; nothing written"
            ),
        ),
        pytest.param(
            wider,
            RuntimeError,
            r"(?s)Error\(s\) in loading state_dict for VeraModel:\n\tsize mismatch for .*Nothing was written",
            id="wrong shape",
            marks=pytest.mark.fault(
                "model",
                "set_peft_model_state_dict with a tensor of another shape",
                "RuntimeError worded as PEFT's (load_state_dict's); nothing written",
            ),
        ),
    ],
)
def test_a_state_dict_that_does_not_fit_writes_nothing(edit, error, message):
    source, target = adapted(seed=1), adapted(seed=2)
    before = snapshot(target)
    with pytest.raises(error, match=message):
        set_peft_model_state_dict(target, edit(get_peft_model_state_dict(source)))
    assert_unchanged(target, before)


@pytest.mark.fault(
    "model",
    "set_peft_model_state_dict with projections other than the pair the adapter shares with others",
    "ValueError; nothing written (an adapter reading a pair alone takes them)",
)
def test_saved_projections_must_be_the_adapters_pair_unless_no_other_adapter_reads_it():
    source = adapted(seed=1, projection_prng_key=5)
    state = get_peft_model_state_dict(source)
    target = adapted(seed=2)
    target.add_adapter("other", VeraConfig(r=4, target_modules=QV))
    before = snapshot(target)
    with pytest.raises(ValueError, match="differ from the pair adapter 'other' shares with adapters"):
        set_peft_model_state_dict(target, state, adapter_name="other")
    assert_unchanged(target, before)
    alone = adapted(seed=2)
    set_peft_model_state_dict(alone, state)
    assert torch.equal(alone.vera_A, source.vera_A)
    assert_fp32_close(logits(alone), logits(source))


def test_ignore_mismatched_sizes_leaves_out_what_does_not_fit_and_says_so():
    source, target = adapted(seed=1), adapted(seed=2)
    state = wider(get_peft_model_state_dict(source))
    left_out = next(k for k in state if k.endswith("vera_lambda_b"))
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        result = set_peft_model_state_dict(target, state, ignore_mismatched_sizes=True)
    assert result.missing_keys == [left_out.removeprefix("base_model.") + ".default"]
    assert result.unexpected_keys == []
    written = get_peft_model_state_dict(target)
    assert all(torch.equal(written[k], state[k]) for k in state if k != left_out)


def test_lambdas_on_the_meta_device_are_materialized():
    source = adapted(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = get_model(tiny_llama(), VeraConfig(r=4, target_modules=QV), low_cpu_mem_usage=True)
    set_peft_model_state_dict(target, get_peft_model_state_dict(source))
    lambdas = {n: p for n, p in target.named_parameters() if "vera_lambda_" in n}
    assert lambdas and not any(p.is_meta for p in lambdas.values())
    assert all(p.requires_grad for p in lambdas.values())  # the active adapter still trains
    assert_fp32_close(logits(target.eval()), logits(source))


def test_values_are_cast_to_the_lambdas_dtype():
    def bert(**kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_model(
                tiny_bert().to(torch.bfloat16), VeraConfig(r=4, target_modules=["query"]), **kwargs
            )

    source = bert()  # float32 lambdas over the bf16 layers (autocast_adapter_dtype=True)
    randomize_lambdas(source, seed=3)
    state = get_peft_model_state_dict(source)
    target = bert(autocast_adapter_dtype=False)
    set_peft_model_state_dict(target, state)
    lambdas = {k: v for k, v in get_peft_model_state_dict(target).items() if "vera_lambda_" in k}
    assert lambdas
    for key, tensor in lambdas.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, state[key].to(torch.bfloat16)), key
