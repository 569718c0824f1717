"""VeraConfig: PEFT's fields and defaults, validation that names the field, and PEFT's JSON round trip."""

import dataclasses
import json
import warnings

import pytest

from veralab import VeraConfig

PEFT_DEFAULTS = {
    "r": 256,
    "target_modules": None,
    "projection_prng_key": 0,
    "save_projection": True,
    "vera_dropout": 0.0,
    "d_initial": 0.1,
    "fan_in_fan_out": False,
    "bias": "none",
    "modules_to_save": None,
    "init_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "peft_type": "VERA",
}


def test_defaults_match_peft_seed():
    config = VeraConfig()
    for name, default in PEFT_DEFAULTS.items():
        assert getattr(config, name) == default, name


def test_defaults_match_installed_peft():
    peft = pytest.importorskip("peft")
    ours = VeraConfig().to_dict()
    theirs = peft.VeraConfig().to_dict()
    for name in PEFT_DEFAULTS:
        assert ours[name] == theirs[name], name


def invalid(kwargs, field, case):
    return pytest.param(
        kwargs,
        field,
        id=f"{field}={kwargs[field]!r}",
        marks=pytest.mark.fault(
            "config", case, f"ValueError naming `{field}`, the value and what is allowed"
        ),
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        invalid({"r": 0}, "r", "`r=0`"),
        invalid({"r": -3}, "r", "`r=-3`"),
        invalid({"r": 2.5}, "r", "`r=2.5` (not an int)"),
        invalid({"r": True}, "r", "`r=True` (a bool is not a rank)"),
        invalid({"vera_dropout": 1.0}, "vera_dropout", "`vera_dropout=1.0` (outside [0, 1))"),
        invalid({"vera_dropout": -0.1}, "vera_dropout", "`vera_dropout=-0.1`"),
        invalid({"d_initial": float("nan")}, "d_initial", "`d_initial=nan`"),
        invalid(
            {"d_initial": 1e39},
            "d_initial",
            "`d_initial=1e39` (finite, but beyond float32: the lambdas could not hold it)",
        ),
        invalid({"d_initial": 10**400}, "d_initial", "`d_initial` an int too large for any float"),
        invalid({"bias": "lora_only"}, "bias", "unknown `bias` mode"),
        invalid(
            {"layers_pattern": "layers"}, "layers_pattern", "`layers_pattern` without `layers_to_transform`"
        ),
        invalid({"layers_to_transform": [-1]}, "layers_to_transform", "negative layer index"),
        invalid({"layers_to_transform": []}, "layers_to_transform", "empty `layers_to_transform`"),
        invalid({"target_modules": []}, "target_modules", "empty target list"),
        invalid({"target_modules": ""}, "target_modules", "empty target regex"),
        invalid({"target_modules": ["q_proj", 3]}, "target_modules", "a non-string target"),
        invalid({"target_modules": "(q_proj"}, "target_modules", "a target regex `re` cannot compile"),
        invalid(
            {"target_modules": "(" * 5000 + ")" * 5000},
            "target_modules",
            "a target regex nested too deeply to compile",
        ),
        invalid({"task_type": 5}, "task_type", "a bookkeeping field of the wrong type (`task_type=5`)"),
        invalid({"auto_mapping": ["x"]}, "auto_mapping", "`auto_mapping` that is not an object"),
        invalid({"projection_prng_key": -1}, "projection_prng_key", "negative `projection_prng_key`"),
        invalid({"save_projection": "yes"}, "save_projection", "a string where a bool is expected"),
        invalid({"peft_type": "LORA"}, "peft_type", "`peft_type` other than VERA"),
    ],
)
def test_invalid_value_raises_naming_field_value_and_allowed(kwargs, field):
    with pytest.raises(ValueError) as excinfo:
        VeraConfig(**kwargs)
    message = str(excinfo.value)
    assert f"VeraConfig.{field}=" in message
    assert repr(kwargs[field]) in message
    assert "expected" in message


@pytest.mark.fault(
    "config", "`save_projection=False`", "UserWarning on the risk and how veralab guards it (fingerprint)"
)
def test_save_projection_false_warns():
    with pytest.warns(UserWarning, match="save_projection=False"):
        VeraConfig(save_projection=False)


def test_target_list_becomes_sorted_unique_list():
    assert VeraConfig(target_modules=["v_proj", "q_proj", "v_proj"]).target_modules == ["q_proj", "v_proj"]


def test_round_trip_through_json():
    config = VeraConfig(
        r=64,
        target_modules=["q_proj", "v_proj"],
        projection_prng_key=7,
        vera_dropout=0.05,
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        task_type="CAUSAL_LM",
    )
    again = VeraConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config


def test_reads_json_written_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.VeraConfig(
            r=32, target_modules=["q_proj", "v_proj"], save_projection=False, task_type="CAUSAL_LM"
        )
    theirs.save_pretrained(tmp_path)
    ours = VeraConfig.from_json_file(tmp_path / "adapter_config.json")
    assert ours.r == 32 and ours.target_modules == ["q_proj", "v_proj"] and ours.save_projection is False
    assert ours.task_type == "CAUSAL_LM" and ours.peft_version == theirs.peft_version


def test_json_peft_reads_back(tmp_path):
    peft = pytest.importorskip("peft")
    ours = VeraConfig(r=16, target_modules=["c_attn"], fan_in_fan_out=True, bias="vera_only")
    (tmp_path / "adapter_config.json").write_text(ours.to_json_string())
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(theirs, peft.VeraConfig)
    for f in dataclasses.fields(VeraConfig):
        if f.name == "peft_version":  # PEFT stamps its own version on every config it builds
            continue
        value = getattr(theirs, f.name)
        expected = getattr(ours, f.name)
        if isinstance(value, set):
            value = sorted(value)
        assert value == expected, f.name


@pytest.mark.fault(
    "config",
    "unknown key in a loaded adapter_config.json",
    "ValueError naming the key and the allowed fields",
)
def test_unknown_key_in_json_raises_naming_it():
    with pytest.raises(ValueError, match="lora_alpha"):
        VeraConfig.from_dict({"r": 8, "lora_alpha": 16})


@pytest.mark.fault(
    "config", "adapter_config.json of another PEFT method", "ValueError: not a VeRA adapter config"
)
def test_wrong_peft_type_in_json_raises():
    with pytest.raises(ValueError, match="not a VeRA adapter"):
        VeraConfig.from_dict({"peft_type": "LORA", "r": 8})


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param(
            '{"r": 8,',
            "not valid JSON",
            id="truncated",
            marks=pytest.mark.fault(
                "config", "corrupted adapter_config.json", "ValueError naming the file and the JSON error"
            ),
        ),
        pytest.param(
            "[" * 100_000 + "]" * 100_000,
            "nested too deeply",
            id="deeply-nested",
            marks=pytest.mark.fault(
                "config",
                "adapter_config.json nested 100,000 levels deep (RecursionError in the JSON reader)",
                "ValueError naming the file",
            ),
        ),
        pytest.param(
            '{"r": ' + "9" * 5000 + "}",
            "not valid JSON",
            id="huge-integer",
            marks=pytest.mark.fault(
                "config",
                "an integer of 5,000 digits in adapter_config.json (beyond Python's conversion limit)",
                "ValueError naming the file",
            ),
        ),
    ],
)
def test_corrupted_json_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "adapter_config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        VeraConfig.from_json_file(path)
    assert str(path) in str(error.value)
