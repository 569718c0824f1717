"""Projection groups: every adapter reads the pair it would read alone; equal pairs are held once.

An adapter's pair is `init_projections(r, max_in, max_out, projection_prng_key)` over its own targets.
Adapters of other ranks, keys or target sizes live side by side, each exactly as it would be alone (outputs,
lambda gradients, files), and mixed batches and merges run across groups.
"""

import peft
import pytest
import torch
from helpers import output_tensor, randomize_lambdas, tiny_llama, token_batch
from torch import nn

from veralab import VeraConfig
from veralab import reference as ref
from veralab.fast import VeraLinear, VeraModel, get_model
from veralab.fast import layer as layer_module
from veralab.fast.projections import SharedProjections
from veralab.targets import select_targets

QV = ["q_proj", "v_proj"]
FIRST = dict(r=8, target_modules=QV)
# An adapter that differs from the first in one of what sizes or draws its pair.
OTHERS = {
    "another key": dict(projection_prng_key=1),
    "a lower rank": dict(r=4),
    "a higher rank": dict(r=16),
    "larger layers": dict(target_modules=["gate_proj", "down_proj"]),
    "smaller layers": dict(target_modules=["k_proj"]),
    "another key, rank and size": dict(projection_prng_key=5, r=3, target_modules=["o_proj", "up_proj"]),
}
# Rounding of float64 results computed in another order (a few dozen operations, each off by at most eps).
EPS = torch.finfo(torch.float32).eps
ROUNDOFF64 = dict(rtol=1e4 * torch.finfo(torch.float64).eps, atol=1e4 * torch.finfo(torch.float64).eps)


def config(**fields) -> VeraConfig:
    return VeraConfig(**{**FIRST, "init_weights": False, **fields})


def logits(model, ids=None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(ids if ids is not None else token_batch(), **kwargs))


def copy_lambdas(source: VeraModel, target: VeraModel, name: str) -> None:
    sources = dict(source.named_parameters())
    with torch.no_grad():
        for key, param in target.named_parameters():
            if key.endswith(f"vera_lambda_d.{name}") or key.endswith(f"vera_lambda_b.{name}"):
                param.copy_(sources[key])


def with_first_adapter() -> VeraModel:
    model = get_model(tiny_llama(), config())
    randomize_lambdas(model)
    return model.eval()


def with_other(fields: dict) -> tuple[VeraModel, VeraModel]:
    """A model holding "default" and then "other", and a fresh model holding "other" alone, same lambdas."""
    model = with_first_adapter()
    model.add_adapter("other", config(**fields))
    torch.manual_seed(3)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(".other"):
                param.normal_()
    alone = get_model(tiny_llama(), config(**fields), adapter_name="other").eval()
    copy_lambdas(model, alone, "other")
    return model, alone


def lambda_gradients(model: VeraModel, name: str) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    output_tensor(model(token_batch())).square().mean().backward()
    return {
        key: p.grad for key, p in model.named_parameters() if key.endswith(f".{name}") and p.requires_grad
    }


# ------------------------------------------------------------------------------- each adapter as if alone


@pytest.mark.parametrize("fields", OTHERS.values(), ids=OTHERS.keys())
def test_an_adapter_of_another_group_reads_its_own_pair_and_equals_itself_alone(fields, tmp_path):
    model, alone = with_other(fields)
    first_before = logits(with_first_adapter())
    assert torch.equal(logits(model), first_before)  # the first adapter is untouched

    other = config(**fields)
    shapes = [(t.out_features, t.in_features) for t in select_targets(alone.model, other)]
    expected_pair = ref.init_projections(other.r, *ref.find_max_dims(shapes), other.projection_prng_key)
    assert model.projections_of("other").holds(expected_pair)
    assert model.projections_of("other") is not model.projections_of("default")
    assert len(model.projection_groups()) == 2

    model.set_adapter("other")
    alone.set_adapter("other")
    assert torch.equal(logits(model), logits(alone))
    grads, grads_alone = lambda_gradients(model, "other"), lambda_gradients(alone, "other")
    assert grads.keys() == grads_alone.keys() and grads
    for key in grads:
        assert torch.equal(grads[key], grads_alone[key]), key

    model.save_pretrained(tmp_path / "together", selected_adapters=["other"])
    alone.save_pretrained(tmp_path / "alone")
    ours = VeraModel.from_pretrained(tiny_llama(), tmp_path / "together" / "other").eval()
    assert torch.equal(logits(ours), logits(alone.eval()))


def test_adapters_with_the_same_pair_share_one_object_and_storage():
    model = with_first_adapter()
    model.add_adapter("twin", config(target_modules=["v_proj", "q_proj"]))  # same key, rank and sizes
    model.add_adapter("other", config(r=4))
    pairs = model.projection_groups()
    assert [names for _, names in pairs] == [["default", "twin"], ["other"]]
    assert model.projections_of("twin") is model.projections_of("default")
    pointers = {
        layer.projections_of(name).vera_A.data_ptr() for _, layer in model.vera_layers() for name in layer.r
    }
    assert pointers == {model.vera_A.data_ptr(), model.vera_A_1.data_ptr()}
    assert model.vera_A_1.shape == (4, 32) and model.vera_B_1.shape == (32, 4)


def test_deleting_the_last_adapter_of_a_group_frees_its_pair():
    model = with_first_adapter()
    model.add_adapter("other", config(r=4))
    model.add_adapter("third", config(r=3))
    model.delete_adapter("other")
    assert [names for _, names in model.projection_groups()] == [["default"], ["third"]]
    assert model.vera_A_1.shape[0] == 3 and not hasattr(model, "vera_A_2")
    model.delete_adapter("default")
    assert model.vera_A.shape[0] == 3  # the remaining group is now the first: vera_A / vera_B
    assert [name for name, _ in model.named_buffers(recurse=False)] == ["vera_A", "vera_B"]


def test_projection_buffers_of_every_group_follow_the_model():
    model = with_first_adapter()
    model.add_adapter("other", config(r=4, projection_prng_key=2))
    model.set_adapter("other")
    before = logits(model)
    model.to(torch.float64)
    assert model.projections_of("other").vera_A is model.vera_A_1 and model.vera_A_1.dtype == torch.float64
    torch.testing.assert_close(logits(model).float(), before, atol=1e-5, rtol=1e-4)


def test_projections_from_a_file_must_have_the_rank_and_cover_the_targets():
    model = with_first_adapter()
    pair = ref.init_projections(8, 10, 10, 0)
    with pytest.raises(ValueError, match=r"do not fit this model: its targets need max_in >= 32"):
        model.add_adapter("small", config(), projections=pair)
    with pytest.raises(ValueError, match=r"do not have rank r=4"):
        model.add_adapter("rank", config(r=4), projections=ref.init_projections(8, 32, 32, 0))
    huge = (torch.empty(8, 10**6), torch.empty(10**6, 8))
    with pytest.raises(ValueError, match=r"no layer of the model is larger"):
        model.add_adapter("huge", config(), projections=huge)
    assert list(model.peft_config) == ["default"] and len(model.projection_groups()) == 1


# ------------------------------------------------------------------------------- computing across groups


def mixed_model() -> VeraModel:
    model = with_first_adapter()
    model.add_adapter("twin", config())  # shares "default"'s pair
    model.add_adapter("low", config(r=4))
    model.add_adapter("keyed", config(r=5, projection_prng_key=9, target_modules=["q_proj", "k_proj"]))
    randomize_lambdas(model, seed=7)
    return model.eval()


def test_a_mixed_batch_across_groups_equals_each_adapter_alone():
    model = mixed_model()
    rows = ["default", "low", "__base__", "keyed", "twin", "low"]
    ids = token_batch(batch=len(rows))
    mixed = logits(model, ids, adapter_names=rows)
    for row, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, ids[row : row + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-4)


def test_a_mixed_batch_costs_one_pair_of_thin_matmuls_per_group_not_per_adapter(monkeypatch):
    model = mixed_model()
    calls = []
    real = layer_module.mixed_batch_vera

    def counted(*args, **kwargs):
        calls.append(args[1].shape[-1])  # h's rank
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "mixed_batch_vera", counted)
    logits(model, token_batch(batch=3), adapter_names=["default", "twin", "low"])
    # 4 adapted q/v layers, each with two groups in this batch ("default"+"twin" share one pair): 8, not 12.
    assert sorted(calls) == sorted([8, 4] * 4)


def test_several_active_groups_merge_exactly():
    model = mixed_model()
    model.set_adapter(["default", "low", "keyed"])
    together = logits(model)
    with model.disable_adapter():
        assert not torch.allclose(logits(model), together)
    weights = {name: layer.get_base_weight().clone() for name, layer in model.vera_layers()}
    model.merge_adapter()
    torch.testing.assert_close(logits(model), together, atol=1e-5, rtol=1e-4)
    model.unmerge_adapter()
    for name, layer in model.vera_layers():
        torch.testing.assert_close(layer.get_base_weight(), weights[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tokens", [2, 400], ids=["activation space", "weight space for the first group"])
def test_a_layer_with_two_groups_active_matches_the_formula_in_outputs_and_gradients(tokens):
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64).requires_grad_(False)
    pairs = {
        "a": SharedProjections(*(t.double() for t in ref.init_projections(4, 30, 25, 0)), 0),
        "b": SharedProjections(*(t.double() for t in ref.init_projections(6, 24, 20, 3)), 3),
    }
    layer = VeraLinear(base, pairs["a"])
    for name, pair in pairs.items():
        layer.update_layer(name, VeraConfig(r=pair.r, init_weights=False), projections=pair)
    layer.double()
    layer.set_adapter(["a", "b"])
    x = torch.randn(tokens, 24, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    grads = {n: (layer.vera_lambda_d[n].grad, layer.vera_lambda_b[n].grad) for n in pairs}

    lambdas = {
        n: (layer.vera_lambda_d[n].detach().clone().requires_grad_(), layer.vera_lambda_b[n].detach().clone())
        for n in pairs
    }
    for _, lambda_b in lambdas.values():
        lambda_b.requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = base(x_ref)
    for name, (lambda_d, lambda_b) in lambdas.items():
        A_s, B_s = pairs[name].vera_A[:, :24], pairs[name].vera_B[:20]
        y = y + lambda_b * ((lambda_d * (x_ref @ A_s.T)) @ B_s.T)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **ROUNDOFF64)
    for name, (lambda_d, lambda_b) in lambdas.items():
        torch.testing.assert_close(grads[name][0], lambda_d.grad, **ROUNDOFF64)
        torch.testing.assert_close(grads[name][1], lambda_b.grad, **ROUNDOFF64)


def test_every_group_saves_reloads_and_exports_as_lora(tmp_path):
    model = mixed_model()
    model.save_pretrained(tmp_path)
    reloaded = VeraModel.from_pretrained(tiny_llama(), tmp_path).eval()
    for name in ("twin", "low", "keyed"):
        reloaded.load_adapter(tmp_path / name, name)
    assert len(reloaded.projection_groups()) == len(model.projection_groups()) == 3
    for name in model.peft_config:
        model.set_adapter(name)
        reloaded.set_adapter(name)
        expected = logits(model)
        assert torch.equal(logits(reloaded), expected), name
        model.save_as_lora(tmp_path / "lora" / name, adapter_name=name)
        lora = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora" / name).eval()
        scale = expected.abs().max().item()  # same weights, another float32 order: a few roundings
        torch.testing.assert_close(logits(lora), expected, rtol=64 * EPS, atol=64 * EPS * scale)
