"""Adapters on disk: PEFT's format in both directions, verified projections, exact LoRA export, safe writes,
clear load errors with nothing half-loaded, and transformers.Trainer checkpoints."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
from helpers import VOCAB, tiny_gpt2, tiny_llama, tiny_opt, token_batch
from safetensors import safe_open
from torch import nn
from transformers import GPT2ForSequenceClassification, LlamaForCausalLM, TrainingArguments

from veralab import VeraConfig, atomic
from veralab.fast import VeraModel, get_model, projections, saving
from veralab.fast.errors import AdapterLoadError, ProjectionMismatchError
from veralab.fast.fingerprint import FINGERPRINT_KEY
from veralab.fast.layout import CONFIG_NAME, WEIGHTS_NAME, adapter_directory
from veralab.fast.trainer import VeraTrainer

# PEFT and veralab warn about save_projection=False and fan_in_fan_out; tests that need a warning assert it.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EPS = torch.finfo(torch.float32).eps


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same weights, another float32 evaluation order (LoRA's (x A'^T) B'^T): a few roundings per output."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=64 * EPS, atol=64 * EPS * scale)


# --------------------------------------------------------------------------------------------- tiny models


@dataclass
class Arch:
    """A tiny base model and the adapters put on it (the first one covers the largest layers)."""

    build: object
    r: int
    adapters: dict[str, dict]
    fan_in_fan_out: bool = False

    def base(self) -> nn.Module:
        return self.build().eval()


ARCHS = {
    "llama": Arch(
        tiny_llama,
        r=6,
        adapters={
            "default": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
            "other": {"target_modules": ["k_proj", "o_proj"]},
            "third": {"target_modules": ["gate_proj"], "layers_to_transform": [1]},
        },
    ),
    "opt": Arch(
        tiny_opt,
        r=5,
        adapters={
            "default": {"target_modules": ["q_proj", "v_proj", "fc1", "fc2"]},
            "other": {"target_modules": ["k_proj"]},
        },
    ),
    "gpt2": Arch(
        tiny_gpt2,
        r=7,
        adapters={
            "default": {"target_modules": ["c_attn", "c_proj", "c_fc"]},
            "other": {"target_modules": ["c_attn"]},
        },
        fan_in_fan_out=True,
    ),
}
INPUT = token_batch()


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero lambdas everywhere, and random values for whatever else the adapters train."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda_" in name or param.requires_grad:
                param.normal_()


def vera_config(arch: Arch, name: str, save_projection: bool, library=VeraConfig, **overrides):
    fields = dict(
        r=arch.r, save_projection=save_projection, fan_in_fan_out=arch.fan_in_fan_out, init_weights=False
    )
    return library(**{**fields, **arch.adapters[name], **overrides})


def make_vera(arch: Arch, save_projection: bool) -> VeraModel:
    model = None
    for name in arch.adapters:
        config = vera_config(arch, name, save_projection)
        if model is None:
            model = get_model(arch.base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    randomize(model)
    return model.eval()


def make_peft(arch: Arch, save_projection: bool) -> peft.PeftModel:
    model = None
    for name in arch.adapters:
        config = vera_config(arch, name, save_projection, library=peft.VeraConfig)
        if model is None:
            model = peft.get_peft_model(arch.base(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    randomize(model)
    return model.eval()


def outputs(model, names) -> dict[str, torch.Tensor]:
    """Logits of every adapter (works for VeraModel and PeftModel alike)."""
    result = {}
    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            result[name] = model(input_ids=INPUT).logits
    return result


def load_all(first_loader, arch: Arch, directory: Path):
    """Load the saved adapters: "default" with `first_loader`, the others from their subdirectories."""
    model = first_loader(arch.base(), directory)
    for name in list(arch.adapters)[1:]:
        model.load_adapter(directory / name, name)
    return model


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def rewrite_file(path: Path, edit) -> None:
    tensors, metadata = read_file(path)
    edit(tensors, metadata)
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def edit_config(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


BOTH = pytest.mark.parametrize(
    "save_projection", [True, False], ids=["with_projections", "without_projections"]
)


@pytest.fixture(params=list(ARCHS))
def arch(request) -> Arch:
    return ARCHS[request.param]


# --------------------------------------------------------------------------------------------- the format


def test_saved_layout_uses_peft_names_subdirectories_and_a_fingerprint(tmp_path):
    arch = ARCHS["llama"]
    model = make_vera(arch, save_projection=True)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "other", "third"])
    tensors, metadata = read_file(tmp_path / WEIGHTS_NAME)
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    assert torch.equal(
        tensors[f"{layer}.vera_lambda_b"],
        model.model.model.layers[0].self_attn.q_proj.vera_lambda_b["default"],
    )
    assert tensors[f"{layer}.vera_lambda_d"].shape == (arch.r,)
    assert torch.equal(tensors["base_model.vera_A"], model.vera_A) and torch.equal(
        tensors["base_model.vera_B"], model.vera_B
    )
    assert len(tensors) == 2 * 4 * 2 + 2  # two lambdas x four targets x two layers, plus the projections
    fingerprint = json.loads(metadata[FINGERPRINT_KEY])
    assert fingerprint["vera_A_shape"] == [arch.r, 44] and fingerprint["vera_B_shape"] == [44, arch.r]
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "VERA" and config["inference_mode"] is True and config["r"] == arch.r
    third, _ = read_file(tmp_path / "third" / WEIGHTS_NAME)
    assert sorted(k for k in third if "lambda" in k) == [
        "base_model.model.model.layers.1.mlp.gate_proj.vera_lambda_b",
        "base_model.model.model.layers.1.mlp.gate_proj.vera_lambda_d",
    ]


def test_selected_adapters_and_pickle_requests_are_checked(tmp_path):
    model = make_vera(ARCHS["opt"], save_projection=True)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model.save_pretrained(tmp_path, selected_adapters=["nope"])
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert [p.name for p in tmp_path.iterdir()] == ["other"]


# --------------------------------------------------------------------------------------------- round trips


@BOTH
def test_veralab_adapters_round_trip_through_veralab_and_peft(arch, save_projection, tmp_path):
    model = make_vera(arch, save_projection)
    expected = outputs(model, arch.adapters)
    model.save_pretrained(tmp_path)

    reloaded = outputs(load_all(VeraModel.from_pretrained, arch, tmp_path), arch.adapters)
    for name in arch.adapters:
        assert torch.equal(reloaded[name], expected[name]), name
        # Each adapter reads the pair its key draws over its own targets: what PEFT gives it loaded alone.
        alone = peft.PeftModel.from_pretrained(arch.base(), adapter_directory(tmp_path, name))
        assert_fp32_close(outputs(alone, ["default"])["default"], expected[name])
    assert not torch.allclose(expected["default"], expected["other"])  # the adapters differ, so names matter


@pytest.mark.fault(
    "file",
    "PEFT loads an adapter of another projection group beside the model's first adapter",
    "PEFT raises (mixed save_projection, or a size mismatch of vera_A), never runs it with the wrong pair",
)
@BOTH
def test_peft_refuses_an_adapter_of_another_group_beside_the_first(arch, save_projection, tmp_path):
    model = make_vera(arch, save_projection)
    model.save_pretrained(tmp_path)
    others = [name for pair, names in model.projection_groups()[1:] for name in names]
    assert others  # every arch's "other" adapter targets smaller layers than "default"
    for name in others:
        assert json.loads((tmp_path / name / CONFIG_NAME).read_text())["save_projection"] is True
        in_peft = peft.PeftModel.from_pretrained(arch.base(), tmp_path)
        with pytest.raises((ValueError, RuntimeError), match="saved for all adapters or none|size mismatch"):
            in_peft.load_adapter(tmp_path / name, name)


@pytest.mark.fault(
    "file",
    "a PEFT adapter saved without projections (no fingerprint)",
    "loads, with a UserWarning that the regenerated projections cannot be verified",
)
@BOTH
def test_peft_adapters_load_into_veralab_and_save_back_identically(arch, save_projection, tmp_path):
    peft_model = make_peft(arch, save_projection)
    expected = outputs(peft_model, arch.adapters)
    peft_model.save_pretrained(tmp_path / "peft")

    if save_projection:  # the files carry the pair PEFT gave every adapter: the first adapter's
        model = load_all(VeraModel.from_pretrained, arch, tmp_path / "peft")
    else:  # PEFT records no fingerprint: veralab says it cannot verify the regenerated projections
        with pytest.warns(UserWarning, match="cannot be verified.*later adapter of a PEFT model"):
            model = load_all(VeraModel.from_pretrained, arch, tmp_path / "peft")
        # Each adapter then reads the pair its key draws over its own targets, as in PEFT loaded alone.
        for name in list(arch.adapters)[1:]:
            alone = peft.PeftModel.from_pretrained(arch.base(), tmp_path / "peft" / name).eval()
            expected[name] = outputs(alone, ["default"])["default"]
    for name, logits in outputs(model, arch.adapters).items():
        assert_fp32_close(logits, expected[name])

    model.save_pretrained(tmp_path / "veralab")
    for name in arch.adapters:
        sub = "" if name == "default" else name
        theirs, _ = read_file(tmp_path / "peft" / sub / WEIGHTS_NAME)
        ours, _ = read_file(tmp_path / "veralab" / sub / WEIGHTS_NAME)
        projections = {"base_model.vera_A", "base_model.vera_B"}
        if save_projection or model.projections_of(name) is model.projections:
            assert theirs.keys() == ours.keys()
        else:  # an adapter of another group carries its pair (so PEFT cannot give it the first one's)
            assert ours.keys() == theirs.keys() | projections
        assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


@BOTH
def test_lora_export_reproduces_every_adapter_in_peft(arch, save_projection, tmp_path):
    model = make_vera(arch, save_projection)
    expected = outputs(model, arch.adapters)
    for name in arch.adapters:
        model.save_as_lora(tmp_path / name, adapter_name=name)
        config = json.loads((tmp_path / name / CONFIG_NAME).read_text())
        assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == arch.r
        lora = peft.PeftModel.from_pretrained(arch.base(), tmp_path / name).eval()
        with torch.no_grad():
            assert_fp32_close(lora(input_ids=INPUT).logits, expected[name])


def test_lora_factors_are_the_scaled_projection_slices(tmp_path):
    model = make_vera(ARCHS["gpt2"], save_projection=True)
    model.save_as_lora(tmp_path, adapter_name="other")
    tensors, _ = read_file(tmp_path / WEIGHTS_NAME)
    layer = model.model.transformer.h[1].attn.c_attn  # Conv1D (24 -> 72)
    key = "base_model.model.transformer.h.1.attn.c_attn"
    pair = model.projections_of("other")
    A_s, B_s = pair.vera_A[:, :24], pair.vera_B[:72]
    assert torch.equal(tensors[f"{key}.lora_A.weight"], layer.vera_lambda_d["other"].detach()[:, None] * A_s)
    assert torch.equal(tensors[f"{key}.lora_B.weight"], layer.vera_lambda_b["other"].detach()[:, None] * B_s)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == ["c_attn"]


def test_classifier_head_and_biases_travel_both_ways_and_into_lora(tmp_path):
    def base():
        gpt2 = tiny_gpt2()
        gpt2.config.update(dict(num_labels=3, pad_token_id=0))
        torch.manual_seed(0)
        return GPT2ForSequenceClassification(gpt2.config).eval()

    config = dict(
        r=5,
        target_modules=["c_attn"],
        task_type="SEQ_CLS",
        bias="vera_only",
        fan_in_fan_out=True,
        init_weights=False,
    )
    model = get_model(base(), VeraConfig(**config))
    randomize(model)
    with torch.no_grad():
        expected = model.eval()(input_ids=INPUT).logits
    assert model.peft_config["default"].modules_to_save == ["score"]
    model.save_pretrained(tmp_path / "veralab")
    tensors, _ = read_file(tmp_path / "veralab" / WEIGHTS_NAME)
    assert "base_model.model.score.weight" in tensors
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in tensors

    in_peft = peft.PeftModel.from_pretrained(base(), tmp_path / "veralab").eval()
    with torch.no_grad():
        assert_fp32_close(in_peft(input_ids=INPUT).logits, expected)
    in_peft.save_pretrained(tmp_path / "peft")  # lists modules_to_save ["classifier", "score"], as PEFT does
    back = VeraModel.from_pretrained(base(), tmp_path / "peft")
    with torch.no_grad():
        assert_fp32_close(back(input_ids=INPUT).logits, expected)

    model.save_as_lora(tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(base(), tmp_path / "lora").eval()
    with torch.no_grad():
        assert_fp32_close(lora(input_ids=INPUT).logits, expected)


def test_bias_all_round_trips_through_peft(tmp_path):
    arch = ARCHS["opt"]
    model = get_model(arch.base(), vera_config(arch, "default", True, bias="all"))
    randomize(model)
    expected = outputs(model.eval(), ["default"])["default"]
    model.save_pretrained(tmp_path)
    assert "base_model.model.model.decoder.final_layer_norm.bias" in read_file(tmp_path / WEIGHTS_NAME)[0]
    for loader in (VeraModel.from_pretrained, peft.PeftModel.from_pretrained):
        with torch.no_grad():
            assert_fp32_close(loader(arch.base(), tmp_path)(input_ids=INPUT).logits, expected)


# --------------------------------------------------------------------------------------------- projections


def test_saved_projections_are_loaded_not_regenerated(tmp_path):
    arch = ARCHS["llama"]
    model = make_vera(arch, save_projection=True)
    untouched = outputs(model, ["default"])["default"]
    with torch.no_grad():
        model.vera_A.mul_(1.5)  # projections the key does not give: only the file knows them
    expected = outputs(model, ["default"])["default"]
    assert not torch.allclose(expected, untouched)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    for loader in (VeraModel.from_pretrained, peft.PeftModel.from_pretrained):
        assert_fp32_close(outputs(loader(arch.base(), tmp_path), ["default"])["default"], expected)


@BOTH
def test_a_later_adapter_saved_alone_loads_alone_with_the_projections_it_was_trained_with(
    save_projection, tmp_path
):
    # "other" reads the pair its key draws over its own (smaller) targets, not "default"'s larger one.
    arch = ARCHS["llama"]
    model = make_vera(arch, save_projection)
    expected = outputs(model, ["other"])["other"]
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    alone = VeraModel.from_pretrained(arch.base(), tmp_path / "other", adapter_name="other")
    assert alone.vera_A.shape == model.projections_of("other").vera_A.shape != model.vera_A.shape
    assert alone.vera_B.shape == model.projections_of("other").vera_B.shape
    assert torch.equal(outputs(alone, ["other"])["other"], expected)


@BOTH
def test_an_adapter_trained_with_a_larger_pair_keeps_it_and_peft_refuses_it_loudly(save_projection, tmp_path):
    # A file may record a pair larger than its targets need (an adapter that shared a larger pair when it
    # was trained): it is loaded with that pair, and saved again with it, so PEFT cannot draw another.
    arch = ARCHS["llama"]
    model = make_vera(arch, save_projection)
    larger = tuple(t.clone() for t in (model.vera_A, model.vera_B))
    config = vera_config(arch, "other", save_projection)
    model.add_adapter("wide", config, projections=larger)
    model.set_adapter("wide")
    randomize(model)
    assert model.projections_of("wide") is model.projections  # it joined the first group's pair
    expected = outputs(model, ["wide"])["wide"]
    model.save_pretrained(tmp_path, selected_adapters=["wide"])
    assert json.loads((tmp_path / "wide" / CONFIG_NAME).read_text())["save_projection"] is True
    alone = VeraModel.from_pretrained(arch.base(), tmp_path / "wide", adapter_name="wide")
    assert alone.vera_A.shape == larger[0].shape
    assert torch.equal(outputs(alone, ["wide"])["wide"], expected)
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT would draw the smaller pair: it refuses
        peft.PeftModel.from_pretrained(arch.base(), tmp_path / "wide")


@pytest.mark.fault(
    "file",
    "`save_projection=False` while the model's projections are not what the key regenerates",
    "ValueError before anything is written",
)
def test_saving_without_projections_refuses_projections_the_key_cannot_regenerate(tmp_path):
    model = make_vera(ARCHS["opt"], save_projection=False)
    with torch.no_grad():
        model.vera_B.add_(1e-3)
    with pytest.raises(ValueError, match=r"save_projection = True"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.fault(
    "file",
    "projections regenerated from the key differ (another torch version or device)",
    "ProjectionMismatchError saying how to recover (re-save with save_projection=True where it was saved); "
    "base model restored",
)
def test_regenerated_projections_that_differ_are_refused_with_a_recovery_hint(tmp_path, monkeypatch):
    arch = ARCHS["llama"]
    make_vera(arch, save_projection=False).save_pretrained(tmp_path, selected_adapters=["default"])
    real = projections.init_projections

    def other_machine(r, max_in, max_out, prng_key):  # another torch version / device drawing other numbers
        vera_A, vera_B = real(r, max_in, max_out, prng_key)
        return vera_A, vera_B * (1 + 4 * EPS)

    monkeypatch.setattr(projections, "init_projections", other_machine)
    base = arch.base()
    with pytest.raises(ProjectionMismatchError, match=r"do not match the fingerprint.*To recover") as error:
        VeraModel.from_pretrained(base, tmp_path)
    assert str(tmp_path / WEIGHTS_NAME) in str(error.value)
    assert_untouched_base(base, arch)


def tampered(case: str, tamper, message: str, id: str):
    return pytest.param(
        tamper,
        message,
        id=id,
        marks=pytest.mark.fault("file", case, "ProjectionMismatchError naming the file"),
    )


@pytest.mark.parametrize(
    "tamper, message",
    [
        tampered(
            "fingerprint hash edited",
            lambda fp: fp.update(sha256="0" * 64),
            "do not match the fingerprint",
            "hash",
        ),
        tampered(
            "fingerprint shapes edited",
            lambda fp: fp.update(vera_A_shape=[3, 3]),
            "projections of shapes",
            "shape",
        ),
        tampered(
            "config's `projection_prng_key` differs from the fingerprint's",
            lambda fp: fp.update(projection_prng_key=7),
            "restore the config's original key",
            "key",
        ),
    ],
)
def test_tampered_fingerprints_are_refused(tmp_path, tamper, message):
    arch = ARCHS["gpt2"]
    make_vera(arch, save_projection=False).save_pretrained(tmp_path, selected_adapters=["default"])

    def edit(tensors, metadata):
        fingerprint = json.loads(metadata[FINGERPRINT_KEY])
        tamper(fingerprint)
        metadata[FINGERPRINT_KEY] = json.dumps(fingerprint)

    rewrite_file(tmp_path / WEIGHTS_NAME, edit)
    base = arch.base()
    with pytest.raises(ProjectionMismatchError, match=message):
        VeraModel.from_pretrained(base, tmp_path)
    assert_untouched_base(base, arch)


@pytest.mark.fault("file", "saved vera_A/vera_B bytes corrupted", "AdapterLoadError: the file is corrupted")
def test_corrupted_saved_projections_are_caught_by_the_fingerprint(tmp_path):
    arch = ARCHS["opt"]
    make_vera(arch, save_projection=True).save_pretrained(tmp_path, selected_adapters=["default"])
    rewrite_file(tmp_path / WEIGHTS_NAME, lambda tensors, _: tensors["base_model.vera_A"].neg_())
    base = arch.base()
    with pytest.raises(AdapterLoadError, match="file is corrupted"):
        VeraModel.from_pretrained(base, tmp_path)
    assert_untouched_base(base, arch)


def test_an_adapter_with_other_saved_projections_joins_a_model_as_its_own_group(tmp_path):
    arch = ARCHS["llama"]
    donor = make_vera(arch, save_projection=True)
    with torch.no_grad():
        donor.set_projections(donor.vera_A, -donor.vera_B)  # a pair no key draws: only the file knows it
    expected = outputs(donor, ["default"])["default"]
    donor.save_pretrained(tmp_path, selected_adapters=["default"])
    model = make_vera(arch, save_projection=True)
    before = {name: logits for name, logits in outputs(model, arch.adapters).items()}
    model.load_adapter(tmp_path, "donor")
    assert len(model.projection_groups()) == len(make_vera(arch, True).projection_groups()) + 1
    assert model.projections_of("donor").holds((donor.vera_A, donor.vera_B))
    assert torch.equal(outputs(model, ["donor"])["donor"], expected)
    for name, logits in outputs(model, arch.adapters).items():
        assert torch.equal(logits, before[name])


# --------------------------------------------------------------------------------------------- safe writes


@pytest.mark.fault(
    "file",
    "a save that fails midway (disk full)",
    "the previous files stay byte-identical and loadable; no staging directory is left, no new directory "
    "appears",
)
def test_a_save_that_fails_midway_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    arch = ARCHS["llama"]
    model = make_vera(arch, save_projection=True)
    expected = outputs(model, ["default"])["default"]
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize(model, seed=2)  # the next save would write other lambdas

    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the weights are staged, writing the config fails
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path, selected_adapters=["default"])
    with pytest.raises(OSError, match="No space left"):  # into a new directory: nothing appears
        calls.clear()
        model.save_pretrained(tmp_path / "fresh", selected_adapters=["default"])
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved  # no staging directory left either
    assert torch.equal(
        outputs(VeraModel.from_pretrained(arch.base(), tmp_path), ["default"])["default"], expected
    )


@pytest.mark.fault(
    "file",
    "a read-only output directory",
    "OSError naming the adapter and the directory; the adapter already there stays byte-identical and "
    "loadable",
)
def test_saving_into_a_read_only_directory_is_refused_clearly(tmp_path, monkeypatch):
    arch = ARCHS["llama"]
    model = make_vera(arch, save_projection=True)
    expected = outputs(model, ["default"])["default"]
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize(model, seed=2)

    def read_only(*args, **kwargs):
        # Tests run as root, which ignores chmod; fail where the OS would for a read-only directory.
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.os, "mkdir", read_only)
    with pytest.raises(
        PermissionError, match=rf"could not save adapter 'default' to {tmp_path}: Permission denied"
    ):
        model.save_pretrained(tmp_path, selected_adapters=["default"])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved
    assert torch.equal(
        outputs(VeraModel.from_pretrained(arch.base(), tmp_path), ["default"])["default"], expected
    )


# --------------------------------------------------------------------------------------------- load errors


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must not change: module types, tensors, adapters, trainability."""
    return {
        "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "adapters": list(getattr(model, "peft_config", {})),
    }


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual["modules"] == expected["modules"]
    assert actual["requires_grad"] == expected["requires_grad"]
    assert actual["adapters"] == expected["adapters"]
    assert actual["tensors"].keys() == expected["tensors"].keys()
    assert all(torch.equal(actual["tensors"][k], v) for k, v in expected["tensors"].items())


def assert_untouched_base(base: nn.Module, arch: Arch) -> None:
    assert_same_state(snapshot(base), snapshot(arch.base()))
    assert all(p.requires_grad for p in base.parameters())


def drop_a_lambda(tensors, metadata):
    del tensors[next(k for k in tensors if k.endswith("vera_lambda_d"))]


def integer_lambda(tensors, metadata):
    key = next(k for k in tensors if k.endswith("vera_lambda_d"))
    tensors[key] = tensors[key].to(torch.int32)


def corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16
    path.write_bytes(bytes(data))


LOAD_REFUSAL = "AdapterLoadError naming the file and the problem; model unchanged, base model restored"


def broken(case: str, damage, file_name: str, message: str, id: str):
    """One damaged adapter directory: loading must raise `message` naming `file_name` and change nothing."""
    return pytest.param(
        damage, file_name, message, id=id, marks=pytest.mark.fault("file", case, LOAD_REFUSAL)
    )


def truncate(path: Path, keep) -> None:
    path.write_bytes(path.read_bytes()[:keep])


BROKEN_FILES = [
    broken(
        "adapter_config.json missing",
        lambda d: (d / CONFIG_NAME).unlink(),
        CONFIG_NAME,
        "missing",
        "no-config",
    ),
    broken(
        "adapter_model.safetensors missing",
        lambda d: (d / WEIGHTS_NAME).unlink(),
        WEIGHTS_NAME,
        "missing",
        "no-weights",
    ),
    broken(
        "only a pickled adapter_model.bin (never unpickled)",
        lambda d: (d / WEIGHTS_NAME).rename(d / "adapter_model.bin"),
        "adapter_model.bin",
        "safetensors only",
        "pickle-only",
    ),
    broken(
        "empty adapter_model.safetensors (0 bytes)",
        lambda d: (d / WEIGHTS_NAME).write_bytes(b""),
        WEIGHTS_NAME,
        "empty",
        "empty-weights",
    ),
    broken(
        "empty adapter_config.json (0 bytes)",
        lambda d: (d / CONFIG_NAME).write_bytes(b""),
        CONFIG_NAME,
        "empty",
        "empty-config",
    ),
    broken(
        "truncated adapter_model.safetensors",
        lambda d: truncate(d / WEIGHTS_NAME, -12),
        WEIGHTS_NAME,
        "truncated",
        "truncated-weights",
    ),
    broken(
        "corrupted safetensors header",
        lambda d: corrupt_header(d / WEIGHTS_NAME),
        WEIGHTS_NAME,
        "corrupted",
        "corrupted-header",
    ),
    broken(
        "truncated adapter_config.json",
        lambda d: truncate(d / CONFIG_NAME, 40),
        CONFIG_NAME,
        "not valid JSON",
        "truncated-config",
    ),
    broken(
        "`peft_type` of another method (LORA)",
        lambda d: edit_config(d / CONFIG_NAME, lambda c: c.update(peft_type="LORA")),
        CONFIG_NAME,
        "peft_type='LORA'",
        "wrong-peft-type",
    ),
    broken(
        "unknown field in adapter_config.json",
        lambda d: edit_config(d / CONFIG_NAME, lambda c: c.update(lora_alpha=8)),
        CONFIG_NAME,
        "unknown VeraConfig",
        "unknown-field",
    ),
    broken(
        "a tensor missing from the file",
        lambda d: rewrite_file(d / WEIGHTS_NAME, drop_a_lambda),
        WEIGHTS_NAME,
        "missing 1 tensor",
        "missing-key",
    ),
    broken(
        "an unexpected tensor in the file",
        lambda d: rewrite_file(
            d / WEIGHTS_NAME, lambda t, m: t.update({"base_model.model.extra": torch.ones(2)})
        ),
        WEIGHTS_NAME,
        "unexpected tensor",
        "unexpected-key",
    ),
    broken(
        "an integer tensor where lambdas are floats",
        lambda d: rewrite_file(d / WEIGHTS_NAME, integer_lambda),
        WEIGHTS_NAME,
        "dtype torch.int32",
        "integer-dtype",
    ),
    broken(
        "corrupted projection fingerprint in the metadata",
        lambda d: rewrite_file(d / WEIGHTS_NAME, lambda t, m: m.update({FINGERPRINT_KEY: "{"})),
        WEIGHTS_NAME,
        "metadata is corrupted",
        "corrupted-fingerprint",
    ),
]


@pytest.mark.parametrize("damage, file_name, message", BROKEN_FILES)
def test_broken_files_are_refused_naming_the_file_and_nothing_is_half_loaded(
    damage, file_name, message, tmp_path
):
    arch = ARCHS["opt"]
    make_vera(arch, save_projection=True).save_pretrained(tmp_path, selected_adapters=["default", "other"])
    intact = make_vera(arch, save_projection=True)
    damage(tmp_path / "other")

    before = snapshot(intact)
    with pytest.raises(AdapterLoadError, match=message) as error:
        intact.load_adapter(tmp_path / "other", "loaded")
    assert str(tmp_path / "other" / file_name) in str(error.value)
    assert_same_state(snapshot(intact), before)

    base = arch.base()
    with pytest.raises(AdapterLoadError, match=message):
        VeraModel.from_pretrained(base, tmp_path / "other")
    assert_untouched_base(base, arch)


@pytest.mark.fault("file", "an adapter of another architecture (targets not in the model)", LOAD_REFUSAL)
@pytest.mark.fault("file", "an adapter of a model with other layer sizes", LOAD_REFUSAL)
def test_an_adapter_for_another_architecture_or_other_shapes_is_refused(tmp_path):
    def wider_mlp() -> nn.Module:
        config = tiny_llama().config
        config.intermediate_size = 60
        return LlamaForCausalLM(config)

    make_vera(ARCHS["llama"], save_projection=True).save_pretrained(tmp_path, selected_adapters=["default"])
    gpt2 = ARCHS["gpt2"].base()
    with pytest.raises(AdapterLoadError, match=r"does not fit the model.*match no module of GPT2LMHeadModel"):
        VeraModel.from_pretrained(gpt2, tmp_path)
    assert_untouched_base(gpt2, ARCHS["gpt2"])

    wider = Arch(wider_mlp, r=6, adapters={})
    base = wider.base()
    with pytest.raises(AdapterLoadError, match=r"has shape \(\d+,\) but the model needs \(\d+,\)"):
        VeraModel.from_pretrained(base, tmp_path)
    assert_untouched_base(base, wider)


# ------------------------------------------------------------------------------------- loading semantics


def test_is_trainable_decides_whether_a_loaded_adapter_trains(tmp_path):
    arch = ARCHS["opt"]
    make_vera(arch, save_projection=True).save_pretrained(tmp_path)
    frozen = VeraModel.from_pretrained(arch.base(), tmp_path)
    assert not frozen.training
    frozen.add_adapter("extra", vera_config(arch, "other", True))
    frozen.set_adapter("default")
    assert frozen.get_nb_trainable_parameters()[0] == 0  # still frozen after adding and activating

    trainable = VeraModel.from_pretrained(arch.base(), tmp_path, is_trainable=True)
    trainable.load_adapter(tmp_path / "other", "other", is_trainable=True)
    trainable.set_adapter("other")
    lambdas = [p for n, p in trainable.named_parameters() if "vera_lambda_" in n and n.endswith(".other")]
    assert lambdas and all(p.requires_grad for p in lambdas)


@pytest.mark.fault(
    "file", "loading weights into an adapter that is merged", "ValueError asking to unmerge first"
)
def test_loading_into_an_existing_adapter_replaces_its_weights_in_place(tmp_path):
    arch = ARCHS["gpt2"]
    model = make_vera(arch, save_projection=False)
    expected = outputs(model, arch.adapters)
    model.save_pretrained(tmp_path)
    params = dict(model.named_parameters())
    randomize(model, seed=5)
    for name in arch.adapters:
        sub = tmp_path if name == "default" else tmp_path / name
        model.load_adapter(sub, name, is_trainable=True)
    assert all(p is params[n] for n, p in model.named_parameters())  # an optimizer holding them still works
    assert all(torch.equal(outputs(model, [n])[n], expected[n]) for n in arch.adapters)
    model.merge_adapter(["other"])  # loading into a merged adapter would leave stale merged weights
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.load_adapter(tmp_path / "other", "other")


# --------------------------------------------------------------------------------------------- Trainer


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count: int = 8):
        generator = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(0, VOCAB, (8,), generator=generator) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@dataclass
class TrainerRun:
    output_dir: Path
    arch: Arch = field(default_factory=lambda: ARCHS["llama"])

    def model(self) -> VeraModel:
        model = get_model(self.arch.base(), vera_config(self.arch, "default", False, init_weights=True))
        model.add_adapter("other", vera_config(self.arch, "other", False))
        return model

    def trainer(self, model: VeraModel, **overrides) -> VeraTrainer:
        args = dict(
            output_dir=str(self.output_dir),
            max_steps=3,
            save_steps=2,
            per_device_train_batch_size=4,
            learning_rate=2e-2,
            logging_steps=100,
            report_to=[],
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
        )
        arguments = TrainingArguments(**{**args, **overrides})
        return VeraTrainer(
            model=model, args=arguments, train_dataset=TokenDataset(), eval_dataset=TokenDataset(4)
        )


def test_trainer_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path):
    run = TrainerRun(tmp_path)
    straight = run.model()
    run.trainer(straight).train()
    checkpoint = tmp_path / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME, "other", "optimizer.pt"} <= files
    assert "model.safetensors" not in files

    resumed = run.model()
    run.trainer(resumed).train(resume_from_checkpoint=str(checkpoint))
    trained = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(p, dict(resumed.named_parameters())[n]) for n, p in trained.items())

    trainer = run.trainer(resumed)
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} == {
        CONFIG_NAME,
        WEIGHTS_NAME,
        "other",
        "training_args.bin",
    }
    final = VeraModel.from_pretrained(run.arch.base(), tmp_path / "final")
    assert torch.equal(
        outputs(final, ["default"])["default"], outputs(straight.eval(), ["default"])["default"]
    )


def test_trainer_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    run = TrainerRun(tmp_path)
    model = run.model()
    # "Best" = highest eval loss: an early checkpoint, so loading it visibly changes the trained model.
    trainer = run.trainer(
        model,
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-3"
    saved, _ = read_file(best / WEIGHTS_NAME)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(
        layer.vera_lambda_b["default"].detach(),
        saved["base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b"],
    )
