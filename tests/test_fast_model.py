"""VeraModel: target selection, adapters, merging, mixed batches and the transformers features around them."""

import copy

import pytest
import torch
from helpers import output_tensor, randomize_lambdas, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, token_batch
from torch import nn
from transformers import PreTrainedModel

from veralab import VeraConfig
from veralab.fast import VeraLinear, VeraModel, get_model

QV = ["q_proj", "v_proj"]


def adapted(base=None, **kwargs) -> VeraModel:
    kwargs.setdefault("r", 8)
    kwargs.setdefault("target_modules", QV)
    model = get_model(base if base is not None else tiny_llama(), VeraConfig(**kwargs))
    randomize_lambdas(model)
    return model.eval()


def logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return output_tensor(model(ids if ids is not None else token_batch(), **kwargs))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, ids=None, expected_logits=None):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    if expected_logits is not None:
        torch.testing.assert_close(logits(model, ids), expected_logits)


# ------------------------------------------------------------------ targets


def adapted_names(model):
    return sorted(name for name, _ in model.vera_layers())


def test_list_targets_match_names_and_suffixes():
    model = adapted(target_modules=["q_proj", "mlp.down_proj"])
    assert adapted_names(model) == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.q_proj")
    ]


def test_regex_target_matches_full_names():
    model = adapted(target_modules=r".*layers\.1\.self_attn\.(k|o)_proj")
    assert adapted_names(model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]


def test_all_linear_excludes_output_head():
    model = adapted(target_modules="all-linear")
    names = adapted_names(model)
    assert len(names) == 2 * 7 and "lm_head" not in names


def test_default_targets_per_model_type():
    assert {n.split(".")[-1] for n in adapted_names(adapted(target_modules=None))} == {"q_proj", "v_proj"}
    assert {n.split(".")[-1] for n in adapted_names(adapted(tiny_gpt2(), target_modules=None))} == {"c_attn"}
    assert {n.split(".")[-1] for n in adapted_names(adapted(tiny_bert(), target_modules=None))} == {
        "query",
        "value",
    }


def test_layers_to_transform_with_pattern():
    model = adapted(target_modules=QV, layers_to_transform=[1], layers_pattern="layers")
    assert adapted_names(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = adapted(target_modules=QV, layers_to_transform=0)
    assert adapted_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_target_matching_nothing_names_it():
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module"):
        get_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match="selects no module"):
        get_model(
            tiny_llama(), VeraConfig(r=4, target_modules=QV, layers_to_transform=[7], layers_pattern="layers")
        )


@pytest.mark.parametrize(
    "target, kind", [("rotary_emb", "LlamaRotaryEmbedding"), ("input_layernorm", "LlamaRMSNorm")]
)
def test_unsupported_target_type_names_it(target, kind):
    with pytest.raises(ValueError, match=rf"{target}.* is a {kind}, which VeRA cannot adapt"):
        get_model(tiny_llama(), VeraConfig(r=4, target_modules=[target]))


def test_defaults_need_a_known_model_type():
    with pytest.raises(ValueError, match="has no config.model_type"):
        get_model(nn.Sequential(nn.Linear(3, 3)), VeraConfig(r=2))


def test_plain_module_with_explicit_targets():
    base = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 2))
    model = get_model(base, VeraConfig(r=3, target_modules=["0", "2"], init_weights=False))
    assert model.vera_A.shape == (3, 9) and model.vera_B.shape == (9, 3)
    assert model(torch.randn(4, 5)).shape == (4, 2)


# ------------------------------------------------------------------ config handling


def test_fan_in_fan_out_corrected_with_warning_without_mutating_config():
    config = VeraConfig(r=4, target_modules=["c_attn"])
    with pytest.warns(UserWarning, match="fan_in_fan_out=False does not fit 2 target layer"):
        model = adapted(tiny_gpt2(), target_modules=["c_attn"])
        model = get_model(tiny_gpt2(), config)
    assert config.fan_in_fan_out is False
    assert all(layer.fan_in_fan_out for _, layer in model.vera_layers())


def test_shared_projections_are_one_storage():
    model = adapted(target_modules="all-linear")
    pointers = {
        layer.projections_of(name).vera_A.data_ptr() for _, layer in model.vera_layers() for name in layer.r
    }
    assert pointers == {model.vera_A.data_ptr()}
    assert model.vera_A.shape == (8, 44) and model.vera_B.shape == (44, 8)  # max in, max out over all layers


def test_projections_bit_identical_to_reference():
    from veralab import reference as ref

    model = adapted(target_modules="all-linear", projection_prng_key=17)
    A, B = ref.init_projections(8, 44, 44, 17)
    assert torch.equal(model.vera_A, A) and torch.equal(model.vera_B, B)


def test_output_equals_base_at_init():
    base = tiny_llama()
    expected = logits(base)
    model = get_model(base, VeraConfig(r=8, target_modules="all-linear"))
    torch.testing.assert_close(logits(model.eval()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["none", "vera_only", "all"])
def test_bias_modes(bias):
    base = tiny_opt()
    every_bias = {"model." + n for n, _ in base.named_parameters() if n.endswith("bias")}
    model = get_model(base, VeraConfig(r=4, target_modules=QV, bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    adapted_biases = {
        f"model.model.decoder.layers.{i}.self_attn.{m}.base_layer.bias"
        for i in range(2)
        for m in ("q_proj", "v_proj")
    }
    expected = {
        "none": set(),
        "vera_only": adapted_biases,
        "all": every_bias - {b.replace(".base_layer", "") for b in adapted_biases} | adapted_biases,
    }
    assert trainable == expected[bias]


def test_modules_to_save_trains_a_copy_per_adapter():
    model = get_model(tiny_bert(), VeraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "model.classifier.modules_to_save.default.weight" in trainable
    assert all("original_module" not in n for n in trainable)
    model.add_adapter("other", VeraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.model.classifier.modules_to_save["other"].weight.add_(1.0)
    ids = token_batch()
    first = logits(model.eval(), ids)
    model.set_adapter("other")
    assert not torch.allclose(logits(model, ids), first)


def test_seq_cls_task_trains_the_head():
    model = get_model(tiny_bert(), VeraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    assert any(
        "classifier.modules_to_save.default" in n for n, p in model.named_parameters() if p.requires_grad
    )


def test_trainable_parameter_count():
    model = get_model(tiny_llama(), VeraConfig(r=8, target_modules=QV))
    trainable, total = model.get_nb_trainable_parameters()
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8); two layers; r + out each
    assert trainable == 2 * ((8 + 32) + (8 + 16))
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable


def test_print_trainable_parameters(capsys):
    get_model(tiny_llama(), VeraConfig(r=8, target_modules=QV)).print_trainable_parameters()
    assert "trainable params: 128 || all params: 21,024 || trainable%: 0.6088" in capsys.readouterr().out


# ------------------------------------------------------------------ several adapters


def two_adapters():
    model = adapted()
    model.add_adapter("second", VeraConfig(r=8, target_modules=["q_proj", "k_proj"], init_weights=False))
    randomize_lambdas(model, seed=3)
    return model


def test_added_adapter_is_inactive_and_frozen_until_set():
    model = two_adapters()
    assert model.active_adapter == "default"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".default") for n in trainable)
    model.set_adapter("second")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".second") for n in trainable)


def test_adapters_share_the_projections_and_differ_in_output():
    model = two_adapters()
    ids = token_batch()
    first = logits(model, ids)
    model.set_adapter("second")
    assert not torch.allclose(logits(model, ids), first)
    assert {
        layer.projections_of(name).vera_A.data_ptr() for _, layer in model.vera_layers() for name in layer.r
    } == {model.vera_A.data_ptr()}


def test_several_active_adapters_add_up():
    model = two_adapters()
    ids = token_batch()
    first = logits(model, ids)
    model.set_adapter("second")
    second = logits(model, ids)
    model.set_adapter(["default", "second"])
    both = logits(model, ids)
    assert not torch.allclose(both, first) and not torch.allclose(both, second)
    assert model.active_adapter == ["default", "second"]


@pytest.mark.parametrize(
    "name, message",
    [("default", "already exists"), ("__base__", "reserved"), ("a.b", "without '.'"), ("", "non-empty")],
)
def test_bad_adapter_names(name, message):
    model = adapted()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.add_adapter(name, VeraConfig(r=8, target_modules=QV))
    assert_unchanged(model, before)


def test_set_unknown_adapter_raises():
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        adapted().set_adapter("nope")


def test_delete_adapter():
    model = two_adapters()
    model.set_adapter("second")
    with pytest.warns(UserWarning, match="deleted the active adapter 'second'"):
        model.delete_adapter("second")
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert not any(".second" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="last adapter"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.delete_adapter("second")


def test_disable_adapter_gives_base_output():
    base = tiny_llama()
    ids = token_batch()
    expected = logits(base, ids)
    model = adapted(copy.deepcopy(base))
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    assert not torch.allclose(logits(model, ids), expected)


def trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def merged_model() -> tuple[VeraModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An adapted tiny Llama with its adapter merged; a token batch; the base's and the adapted logits."""
    base = tiny_llama()
    ids = token_batch()
    expected = logits(base, ids)
    model = adapted(copy.deepcopy(base))
    merged_output = logits(model, ids)
    model.merge_adapter()
    return model, ids, expected, merged_output


def test_nested_disable_adapter_on_a_merged_model_merges_back_when_the_outer_block_ends():
    model, ids, expected, merged_output = merged_model()
    with pytest.warns(UserWarning, match="unmerging for the block"), model.disable_adapter():
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, ids), expected, atol=1e-6, rtol=0)
        assert not model.merged_adapters  # the inner block found nothing merged, and merges nothing back
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-6, rtol=0)
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(logits(model, ids), merged_output, atol=1e-5, rtol=1e-4)


def test_what_changes_inside_disable_adapter_takes_effect_when_it_ends():
    model = two_adapters()
    ids = token_batch()
    with model.disable_adapter():
        expected = logits(model, ids)
        model.set_adapter("second")  # trains once the adapters are enabled again, not inside the block
        model.set_requires_grad("default")
        model.add_adapter("third", VeraConfig(r=8, target_modules=["o_proj"], init_weights=False))
        assert trainable(model) == []
        torch.testing.assert_close(logits(model, ids), expected)  # the new adapter's layers are off too
    names = trainable(model)
    assert all(n.endswith((".second", ".default")) for n in names)
    assert any(n.endswith(".second") for n in names) and any(n.endswith(".default") for n in names)
    model.set_adapter("third")
    assert not torch.allclose(logits(model, ids), expected)


def test_adapter_names_are_refused_while_the_adapters_are_disabled():
    model = two_adapters()
    model.disable_adapter_layers()
    with pytest.raises(ValueError, match="inside disable_adapter"):
        logits(model, token_batch(batch=2), adapter_names=["default", "second"])
    model.enable_adapter_layers()
    logits(model, token_batch(batch=2), adapter_names=["default", "second"])


def test_disable_adapter_layers_unmerges_a_merged_model():
    base = tiny_llama()
    ids = token_batch()
    model = adapted(copy.deepcopy(base))
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.disable_adapter_layers()
    assert not model.merged_adapters
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", ["all", "vera_only"])
def test_biases_a_mode_trains_are_frozen_inside_disable_adapter_and_train_again_after(bias):
    model = get_model(tiny_bert(), VeraConfig(r=4, target_modules=["query"], bias=bias))
    before = trainable(model)
    assert any(n.endswith("bias") for n in before)
    with pytest.warns(UserWarning, match="trains biases"), model.disable_adapter():
        assert trainable(model) == []
    assert trainable(model) == before


def test_set_adapter_inference_mode_keeps_the_activated_adapters_frozen():
    model = two_adapters()
    model.set_adapter("second", inference_mode=True)
    assert trainable(model) == []
    model.set_adapter("second")
    assert trainable(model) and all(n.endswith(".second") for n in trainable(model))


@pytest.mark.parametrize("autocast", [True, False])
def test_lambda_dtype_follows_the_base_layer(autocast):
    half = get_model(
        tiny_llama().to(torch.bfloat16), VeraConfig(r=4, target_modules=QV), autocast_adapter_dtype=autocast
    )
    lambdas = {p.dtype for n, p in half.named_parameters() if "vera_lambda_" in n}
    assert lambdas == {torch.float32 if autocast else torch.bfloat16}
    double = get_model(
        tiny_llama().double(), VeraConfig(r=4, target_modules=QV), autocast_adapter_dtype=autocast
    )
    assert {p.dtype for n, p in double.named_parameters() if "vera_lambda_" in n} == {torch.float64}


def test_loading_into_an_existing_half_precision_adapter_upcasts_it_unless_asked_not_to(tmp_path):
    model = get_model(
        tiny_llama().to(torch.bfloat16), VeraConfig(r=4, target_modules=QV), autocast_adapter_dtype=False
    )
    model.save_pretrained(tmp_path)
    params = dict(model.named_parameters())
    model.load_adapter(tmp_path, "default", is_trainable=True, autocast_adapter_dtype=False)
    assert all(p is params[n] for n, p in model.named_parameters())  # in place: an optimizer keeps working
    model.load_adapter(tmp_path, "default", is_trainable=True)
    lambdas = {n: p for n, p in model.named_parameters() if "vera_lambda_" in n}
    assert {p.dtype for p in lambdas.values()} == {torch.float32}
    assert all(p.requires_grad for p in lambdas.values())


# ------------------------------------------------------------------ merging


def test_merge_unmerge_round_trip():
    model = adapted(target_modules="all-linear")
    ids = token_batch()
    unmerged = logits(model, ids)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model.vera_layers()}
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    for name, layer in model.vera_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="nothing to unmerge"):
        model.unmerge_adapter()


def test_merge_several_adapters():
    model = two_adapters()
    model.set_adapter(["default", "second"])
    ids = token_batch()
    both = logits(model, ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), both, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merge_rounds_once(dtype):
    model = adapted(tiny_llama().to(dtype))
    for _, layer in model.vera_layers():
        before = layer.base_layer.weight.detach().clone()
        exact = before.float() + layer.delta_weight("default")
        layer.merge()
        # one rounding of the exact float32 sum: the result is the nearest representable value
        assert torch.equal(layer.base_layer.weight, exact.to(dtype))


def test_safe_merge_refuses_nonfinite_and_leaves_model_untouched():
    model = adapted(target_modules="all-linear")
    last_layer = list(model.vera_layers())[-1][1]
    with torch.no_grad():
        last_layer.vera_lambda_b["default"][0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN/inf.*nothing was merged"):
        model.merge_adapter(safe_merge=True)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value) or torch.isnan(value).any(), key
    assert not any(layer.merged for _, layer in model.vera_layers())


def test_merge_and_unload_returns_plain_base_class():
    base = tiny_llama()
    model = adapted(copy.deepcopy(base), target_modules="all-linear")
    ids = token_batch()
    expected = logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged) is type(base)
    assert not any(isinstance(m, VeraLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-4)


def test_unload_returns_untouched_base():
    base = tiny_llama()
    ids = token_batch()
    expected = logits(base, ids)
    model = adapted(copy.deepcopy(base))
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, VeraLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, ids), expected, atol=1e-6, rtol=0)


def test_disable_adapter_on_merged_model_unmerges_for_the_block():
    model, ids, expected, merged_output = merged_model()
    with pytest.warns(UserWarning, match="unmerging for the block"), model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-6, rtol=0)
    assert all(layer.merged for _, layer in model.vera_layers())
    torch.testing.assert_close(logits(model, ids), merged_output, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ mixed batches


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = two_adapters()
    ids = token_batch(batch=5)
    names = ["second", "default", "__base__", "second", "default"]
    mixed = logits(model, ids, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, ids[row : row + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, ids[row : row + 1])
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-4)


def test_mixed_batch_with_modules_to_save_routes_rows():
    model = get_model(tiny_bert(), VeraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    model.add_adapter(
        "b", VeraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"], init_weights=False)
    )
    with torch.no_grad():
        model.model.classifier.modules_to_save["b"].weight.mul_(-2.0)
    model.eval()
    ids = token_batch(batch=4)
    mixed = logits(model, ids, adapter_names=["b", "default", "default", "b"])
    for row, name in enumerate(["b", "default", "default", "b"]):
        model.set_adapter(name)
        torch.testing.assert_close(
            mixed[row : row + 1], logits(model, ids[row : row + 1]), atol=1e-5, rtol=1e-4
        )


def test_mixed_batch_errors():
    model = two_adapters()
    ids = token_batch(batch=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]"):
        logits(model, ids, adapter_names=["x", "default"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        logits(model, ids, adapter_names=["default"] * 3)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerged weights"):
        logits(model, ids, adapter_names=["default", "second"])


def test_mixed_batch_generate():
    model = two_adapters()
    ids = token_batch(batch=2, seq=4)
    out = model.generate(
        input_ids=ids, adapter_names=["default", "second"], max_new_tokens=3, do_sample=False
    )
    model.set_adapter("second")
    alone = model.generate(input_ids=ids[1:], max_new_tokens=3, do_sample=False)
    assert torch.equal(out[1:], alone)


# ------------------------------------------------------------------ transformers features


def train_steps(model, steps=5, lr=5e-2, ids=None):
    ids = ids if ids is not None else token_batch(batch=4, seq=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_reduces_loss_and_touches_only_lambdas():
    model = get_model(tiny_llama(), VeraConfig(r=8, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, steps=8)
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "enable, kwargs",
    [
        # transformers 5.23 renamed gradient_checkpointing_enable; the old name still works (deprecated
        # there).
        pytest.param(
            "activation_checkpointing_enable",
            {},
            marks=pytest.mark.skipif(
                not hasattr(PreTrainedModel, "activation_checkpointing_enable"),
                reason="transformers before 5.23 names it gradient_checkpointing_enable (tested below)",
            ),
        ),
        ("gradient_checkpointing_enable", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}),
    ],
)
def test_gradient_checkpointing_gives_same_gradients(enable, kwargs):
    ids = token_batch(batch=2, seq=6)

    def grads(checkpointing):
        model = adapted(tiny_llama(), target_modules="all-linear").train()
        if checkpointing:
            getattr(model, enable)(**kwargs)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_generate_runs_and_matches_at_init():
    base = tiny_llama()
    ids = token_batch(batch=1, seq=4)
    expected = base.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    model = get_model(copy.deepcopy(base), VeraConfig(r=8, target_modules=QV))
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), expected)


def test_torch_compile_matches_eager():
    model = adapted(target_modules=QV)
    ids = token_batch()
    eager = logits(model, ids)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(logits(compiled, ids), eager)


def test_meta_device_model_can_be_adapted_and_counted():
    with torch.device("meta"):
        meta_base = type(tiny_llama())(tiny_llama().config)
    model = get_model(meta_base, VeraConfig(r=8, target_modules=QV), low_cpu_mem_usage=True)
    lambdas = [p for n, p in model.named_parameters() if "vera_lambda_" in n]
    assert lambdas and all(p.is_meta for p in lambdas)
    assert model.vera_A.device.type == "cpu"  # the projections are real: they come from the seed
    assert model.get_nb_trainable_parameters()[0] == 2 * ((8 + 32) + (8 + 16))


def test_low_cpu_mem_usage_lambdas_are_filled_by_assignment():
    base = tiny_llama()
    trained = adapted(copy.deepcopy(base), init_weights=False)
    model = get_model(copy.deepcopy(base), VeraConfig(r=8, target_modules=QV), low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in model.named_parameters() if "vera_lambda_" in n)
    lambdas = {k: v for k, v in trained.state_dict().items() if "vera_lambda_" in k}
    model.load_state_dict(lambdas, strict=False, assign=True)
    ids = token_batch()
    torch.testing.assert_close(logits(model.eval(), ids), logits(trained, ids))


def test_model_moves_with_to_and_projection_cache_follows():
    model = adapted()
    ids = token_batch()
    fp32 = logits(model, ids)
    model.to(torch.float64)
    assert model.vera_A.dtype == torch.float64
    assert all(layer.projections_of("default").vera_A is model.vera_A for _, layer in model.vera_layers())
    torch.testing.assert_close(logits(model, ids).float(), fp32, atol=1e-5, rtol=1e-4)


def test_trainer_short_run():
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Repeated(Dataset):
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return 16

        def __getitem__(self, i):
            row = self.ids[i % len(self.ids)]
            return {"input_ids": row, "labels": row}

    model = get_model(tiny_llama(), VeraConfig(r=8, target_modules="all-linear"))
    lambdas_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir="unused",
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Repeated(token_batch(batch=4, seq=8)))
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 6 and losses[-1] < losses[0]
    assert any(
        not torch.equal(p, lambdas_before[n]) for n, p in model.named_parameters() if n in lambdas_before
    )
