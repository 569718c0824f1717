"""PEFT parity: the same user code, run once on PEFT and once on veralab, gives the same observable results.

Each test runs one scenario (a few lines of user code) through `PEFT` and through `VERALAB`, which differ only
in what a user's imports differ in, and compares what the user can see: outputs, `requires_grad` of every
parameter, dtypes, files written, exception types and message prefixes. The matrix: an MLP (an
`nn.Sequential` of named `nn.Linear`s), Llama, GPT-2 (`Conv1D`) and BERT built from configs, with and without
`modules_to_save`, with one and two adapters. PEFT's VeRA adapts `nn.Linear` and `Conv1D` only: a model of
`nn.Embedding`, `nn.Conv1d` and `nn.Conv2d` layers runs each scenario on veralab alone, against what PEFT does
for the layers it adapts (each test's own assertions). Where veralab deliberately differs
(docs/coming-from-peft.md), the test pins veralab's side.
"""

from __future__ import annotations

import copy
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
import yaml
from helpers import assert_fp32_close, output_tensor, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from torch import nn

import veralab
import veralab.fast

# Both libraries warn about fan_in_fan_out, save_projection=False and bias modes; no test here is about them.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------------------- the two libraries


@dataclass(frozen=True)
class Library:
    """What a user's code imports from one library; `prefix` is what its parameter names start with."""

    name: str
    VeraConfig: type
    get_model: Callable
    from_pretrained: Callable
    get_state_dict: Callable
    set_state_dict: Callable
    prefix: str

    def set_adapters(self, model, names: list[str]) -> None:
        """Activate several adapters at once: PeftModel.set_adapter takes one name, its tuner takes a list."""
        if self.name == "peft":
            model.base_model.set_adapter(names)
        else:
            model.set_adapter(names)


PEFT = Library(
    "peft",
    peft.VeraConfig,
    peft.get_peft_model,
    peft.PeftModel.from_pretrained,
    peft.get_peft_model_state_dict,
    peft.set_peft_model_state_dict,
    prefix="base_model.",
)
VERALAB = Library(
    "veralab",
    veralab.VeraConfig,
    veralab.fast.get_model,
    veralab.fast.VeraModel.from_pretrained,
    veralab.fast.get_peft_model_state_dict,
    veralab.fast.set_peft_model_state_dict,
    prefix="",
)


# ----------------------------------------------------------------------------------------- the model matrix


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            lin0=nn.Linear(12, 20),
            act0=nn.ReLU(),
            lin1=nn.Linear(20, 16),
            act1=nn.ReLU(),
            head=nn.Linear(16, 3),
        )
    )


class TokenGrid(nn.Module):
    """Token ids through an embedding, a 1-d convolution along the sequence, a 2-d convolution over the
    sequence folded into a 4 x 4 grid, and a linear head: every layer type veralab adapts beyond PEFT's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(40, 12)
        self.mix = nn.Conv1d(12, 12, 3, padding=1)
        self.grid = nn.Conv2d(12, 10, 2)
        self.head = nn.Linear(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        sequence = self.mix(self.tokens(ids).transpose(1, 2))  # (N, 12, 16)
        return self.head(self.grid(sequence.unflatten(2, (4, 4))).mean((2, 3)))


@dataclass(frozen=True)
class Family:
    """A tiny base model, the targets of the two adapters (the second within the first one's layer sizes), the
    module the adapters may train in full, an input, and whether PEFT's VeRA can adapt the targets."""

    build: Callable[[], nn.Module]
    targets: list[str]
    other_targets: list[str]
    module_to_save: str
    inputs: Callable[[], torch.Tensor]
    fan_in_fan_out: bool = False
    name_or_path: str | None = None
    peft: bool = True


FAMILIES = {
    "mlp": Family(tiny_mlp, ["lin0", "lin1"], ["lin1"], "head", lambda: torch.randn(3, 12, generator=GEN())),
    "llama": Family(
        tiny_llama, ["q_proj", "v_proj"], ["v_proj"], "lm_head", token_batch, name_or_path="org/llama"
    ),
    "gpt2": Family(tiny_gpt2, ["c_attn", "c_fc"], ["c_attn"], "ln_f", token_batch, fan_in_fan_out=True),
    "bert": Family(
        tiny_bert, ["query", "value"], ["value"], "classifier", token_batch, name_or_path="org/bert"
    ),
    "embedding-conv": Family(
        TokenGrid,
        ["tokens", "mix", "grid"],
        ["mix"],
        "head",
        lambda: torch.randint(0, 40, (3, 16), generator=GEN()),
        peft=False,
    ),
}


def GEN() -> torch.Generator:
    return torch.Generator().manual_seed(7)


_BASES: dict[str, nn.Module] = {}


@dataclass(frozen=True)
class Case:
    family: str
    modules_to_save: bool
    adapters: tuple[str, ...]

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    def base(self) -> nn.Module:
        """A fresh copy of the family's base model (built once per family)."""
        if self.family not in _BASES:
            model = self.spec.build()
            if self.spec.name_or_path is not None:
                model.config._name_or_path = self.spec.name_or_path
                model.name_or_path = self.spec.name_or_path
            _BASES[self.family] = model
        return copy.deepcopy(_BASES[self.family])

    def config(self, lib: Library, adapter: str = "default", **overrides):
        kwargs = {
            "r": 4,
            "target_modules": self.spec.targets if adapter == "default" else self.spec.other_targets,
            "fan_in_fan_out": self.spec.fan_in_fan_out,
            "modules_to_save": [self.spec.module_to_save] if self.modules_to_save else None,
        }
        return lib.VeraConfig(**{**kwargs, **overrides})

    def adapted(self, lib: Library, **kwargs):
        """The user's model: every adapter of the case added (the first one active), trainables set."""
        model = lib.get_model(self.base(), self.config(lib), **kwargs)
        for name in self.adapters[1:]:
            model.add_adapter(name, self.config(lib, name), **kwargs)
        fill_trainables(lib, model)
        return model


def case_id(case: Case) -> str:
    return f"{case.family}-{'msave' if case.modules_to_save else 'plain'}-{len(case.adapters)}"


CASES = [
    Case(family, modules_to_save, adapters)
    for family in FAMILIES
    for modules_to_save in (False, True)
    for adapters in (("default",), ("default", "other"))
]
TWO_ADAPTER_CASES = [case for case in CASES if len(case.adapters) == 2]
matrix = pytest.mark.parametrize("case", CASES, ids=case_id)


# ----------------------------------------------------------------------------------------- what users see


def normalized(lib: Library, name: str) -> str:
    return name.removeprefix(lib.prefix)


def fill_trainables(lib: Library, model: nn.Module) -> None:
    """Non-zero lambdas and perturbed modules_to_save copies, the same value for the same name in both."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = normalized(lib, name)
            if "vera_lambda_" in key or ".modules_to_save." in key:
                generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def requires_grad(lib: Library, model: nn.Module) -> dict[str, bool]:
    return {normalized(lib, n): p.requires_grad for n, p in model.named_parameters()}


def dtypes(lib: Library, model: nn.Module) -> dict[str, torch.dtype]:
    return {normalized(lib, n): p.dtype for n, p in model.named_parameters()}


def output(case: Case, model: nn.Module) -> torch.Tensor:
    """The model's output in eval mode (the base models have dropout), its mode kept."""
    training = model.training
    model.eval()
    with torch.no_grad():
        result = output_tensor(model(case.spec.inputs()))
    model.train(training)
    return result


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@dataclass
class Seen:
    """What a scenario observed, step by step; compared between the two libraries."""

    steps: dict[str, object] = field(default_factory=dict)

    def __setitem__(self, step: str, value: object) -> None:
        self.steps[step] = value


def assert_same(ours: Seen, theirs: Seen) -> None:
    assert ours.steps.keys() == theirs.steps.keys()
    for step, expected in theirs.steps.items():
        got = ours.steps[step]
        if isinstance(expected, torch.Tensor):
            assert_fp32_close(got, expected)
        else:
            assert got == expected, step


def run_both(scenario: Callable[[Library, Seen], None], peft_too: bool = True) -> tuple[Seen, Seen | None]:
    """The scenario on veralab and (unless not `peft_too`) on PEFT; asserts they saw the same; returns
    (veralab's, PEFT's or None)."""
    ours = Seen()
    scenario(VERALAB, ours)
    if not peft_too:
        return ours, None
    theirs = Seen()
    scenario(PEFT, theirs)
    assert_same(ours, theirs)
    return ours, theirs


def raised(code: Callable[[], object]) -> tuple[type, str]:
    """(exception type, message) of what `code` raises."""
    try:
        code()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    raise AssertionError("expected an exception")


# ----------------------------------------------------------------------------------------- disabling adapters


@matrix
def test_nested_disable_adapter_restores_the_state_each_block_found(case):
    def scenario(lib, seen):
        model = case.adapted(lib)
        seen["output"], seen["requires_grad"] = output(case, model), requires_grad(lib, model)
        with model.disable_adapter():
            seen["outer.output"], seen["outer.requires_grad"] = output(case, model), requires_grad(lib, model)
            with model.disable_adapter():
                seen["inner.output"] = output(case, model)
                seen["inner.enabled"] = model.has_active_enabled_adapter
            # Leaving the inner block re-enables nothing: the outer block still runs the base model.
            seen["outer again.output"] = output(case, model)
            seen["outer again.requires_grad"] = requires_grad(lib, model)
            seen["outer again.enabled"] = model.has_active_enabled_adapter
        seen["after.output"], seen["after.requires_grad"] = output(case, model), requires_grad(lib, model)
        seen["after.enabled"] = model.has_active_enabled_adapter

    ours, _ = run_both(scenario, case.spec.peft)
    base_output = output(case, case.base())
    assert not torch.allclose(ours.steps["output"], base_output)  # the adapters do change the output
    for step in ("outer", "inner", "outer again"):
        assert_fp32_close(ours.steps[f"{step}.output"], base_output)
    assert not any(ours.steps["outer again.requires_grad"].values())
    assert [ours.steps[f"{step}.enabled"] for step in ("inner", "outer again", "after")] == [
        False,
        False,
        True,
    ]
    assert torch.equal(ours.steps["after.output"], ours.steps["output"])
    assert ours.steps["after.requires_grad"] == ours.steps["requires_grad"]


@matrix
def test_adapter_parameters_are_frozen_inside_disable_adapter_and_get_their_flags_back(case):
    def scenario(lib, seen):
        model = case.adapted(lib)
        trainable = sorted(n for n, flag in requires_grad(lib, model).items() if flag)
        seen["trainable"] = trainable
        with model.disable_adapter():
            # What an optimizer built here would train: nothing.
            seen["inside"] = sorted(n for n, flag in requires_grad(lib, model).items() if flag)
        seen["after"] = sorted(n for n, flag in requires_grad(lib, model).items() if flag)

    ours, _ = run_both(scenario, case.spec.peft)
    assert ours.steps["trainable"] and ours.steps["inside"] == []
    assert ours.steps["after"] == ours.steps["trainable"]
    # PEFT makes the active adapter trainable on leaving the block, whatever it was before (see
    # docs/coming-from-peft.md); veralab gives every parameter back exactly what it had.
    model = case.adapted(VERALAB)
    model.set_requires_grad("default", False)
    model.set_requires_grad(list(case.adapters[1:]), True)
    before = requires_grad(VERALAB, model)
    with model.disable_adapter():
        assert not any(requires_grad(VERALAB, model).values())
    assert requires_grad(VERALAB, model) == before


@matrix
def test_disable_and_enable_adapter_layers(case):
    def scenario(lib, seen):
        model = case.adapted(lib)
        seen["output"], seen["requires_grad"] = output(case, model), requires_grad(lib, model)
        model.disable_adapter_layers()
        seen["disabled.output"], seen["disabled.requires_grad"] = (
            output(case, model),
            requires_grad(lib, model),
        )
        seen["disabled.enabled"] = model.has_active_enabled_adapter  # a disable_adapter() flag only
        model.disable_adapter_layers()
        model.enable_adapter_layers()
        seen["enabled.output"], seen["enabled.requires_grad"] = output(case, model), requires_grad(lib, model)

    ours, _ = run_both(scenario, case.spec.peft)
    assert_fp32_close(ours.steps["disabled.output"], output(case, case.base()))
    assert not any(ours.steps["disabled.requires_grad"].values()) and ours.steps["disabled.enabled"]
    assert torch.equal(ours.steps["enabled.output"], ours.steps["output"])
    assert ours.steps["enabled.requires_grad"] == ours.steps["requires_grad"]


@matrix
def test_has_active_enabled_adapter(case):
    def scenario(lib, seen):
        model = case.adapted(lib)
        seen["plain"] = model.has_active_enabled_adapter
        with model.disable_adapter():
            seen["in disable_adapter"] = model.has_active_enabled_adapter
        model.disable_adapter_layers()
        seen["after disable_adapter_layers"] = model.has_active_enabled_adapter
        with model.disable_adapter():
            seen["in disable_adapter, layers disabled"] = model.has_active_enabled_adapter
        model.enable_adapter_layers()
        seen["after enable_adapter_layers"] = model.has_active_enabled_adapter

    ours, _ = run_both(scenario, case.spec.peft)
    assert list(ours.steps.values()) == [True, False, True, False, True]  # what PEFT answers


# ----------------------------------------------------------------------------------------- choosing adapters


@pytest.mark.parametrize("case", TWO_ADAPTER_CASES, ids=case_id)
def test_two_active_adapters_with_copies_of_one_module_to_save_are_refused(case):
    def scenario(lib, seen):
        model = case.adapted(lib)
        before = output(case, model)
        if case.modules_to_save:
            kind, message = raised(lambda: lib.set_adapters(model, ["default", "other"]))
            seen["error"] = (kind, message.startswith("Only one adapter can be set at a time for"))
            seen["unchanged"] = torch.equal(output(case, model), before)
        else:
            lib.set_adapters(model, ["default", "other"])
            seen["output"] = output(case, model)
        seen["active"] = list(model.active_adapters)
        seen["requires_grad"] = requires_grad(lib, model)

    ours, _ = run_both(scenario, case.spec.peft)
    if case.modules_to_save:
        assert ours.steps["error"] == (ValueError, True) and ours.steps["unchanged"]


@matrix
def test_set_requires_grad(case):
    def scenario(lib, seen):
        model = case.adapted(lib)
        model.set_requires_grad("default", requires_grad=False)
        seen["default frozen"] = requires_grad(lib, model)
        model.set_requires_grad(list(case.adapters))
        seen["all trainable"] = requires_grad(lib, model)
        model.add_adapter("extra", case.config(lib, "other"))  # the others keep their requires_grad
        seen["after add_adapter"] = requires_grad(lib, model)

    ours, _ = run_both(scenario, case.spec.peft)
    assert not any(flag for name, flag in ours.steps["default frozen"].items() if name.endswith(".default"))
    adapter_params = [
        n for n in ours.steps["all trainable"] if n.endswith(tuple(f".{a}" for a in case.adapters))
    ]
    assert adapter_params and all(ours.steps["all trainable"][n] for n in adapter_params)
    after = ours.steps["after add_adapter"]
    assert not any(flag for name, flag in after.items() if ".extra" in name)
    assert {n: f for n, f in after.items() if ".extra" not in n} == ours.steps["all trainable"]
    # set_adapter decides again: only the adapter it activates trains. (PEFT 0.21 freezes the inactive
    # adapters' lambdas but only the previously active adapter's modules_to_save copy, so a copy made
    # trainable by set_requires_grad would keep training; docs/coming-from-peft.md.)
    model = case.adapted(VERALAB)
    model.set_requires_grad(list(case.adapters))
    model.add_adapter("extra", case.config(VERALAB, "other"))
    model.set_adapter("extra")
    trainable = [name for name, flag in requires_grad(VERALAB, model).items() if flag]
    assert trainable and all(".extra" in name for name in trainable)


def test_set_requires_grad_refuses_an_unknown_adapter():
    # PEFT ignores names it does not know; veralab names the mistake (docs/coming-from-peft.md).
    model = CASES[0].adapted(VERALAB)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model.set_requires_grad(["default", "nope"])


# ----------------------------------------------------------------------------------------- loading


def saved(case: Case, lib: Library, directory: Path) -> Path:
    """Save the case's adapters (trained values) with `lib`; return the directory."""
    case.adapted(lib).save_pretrained(directory)
    return directory


def subdirectory(directory: Path, adapter: str) -> Path:
    return directory if adapter == "default" else directory / adapter


@matrix
def test_load_adapter_is_trainable_right_after_loading(case, tmp_path):
    def scenario(lib, seen):
        directory = saved(case, lib, tmp_path / lib.name)
        model = lib.from_pretrained(case.base(), directory)  # frozen, eval mode
        model.load_adapter(subdirectory(directory, case.adapters[-1]), "loaded", is_trainable=True)
        seen["active"] = list(model.active_adapters)
        seen["training"] = model.training
        seen["requires_grad"] = requires_grad(lib, model)
        model.set_adapter("loaded")
        seen["output"], seen["after set_adapter"] = output(case, model), requires_grad(lib, model)

    ours, _ = run_both(scenario, case.spec.peft)
    loaded = [name for name, flag in ours.steps["requires_grad"].items() if flag]
    assert loaded and all(".loaded" in name for name in loaded)
    assert (
        ours.steps["active"] == ["default"] and ours.steps["after set_adapter"] == ours.steps["requires_grad"]
    )


@matrix
def test_from_pretrained_with_a_given_config(case, tmp_path):
    def scenario(lib, seen):
        directory = saved(case, lib, tmp_path / lib.name)
        (directory / "adapter_config.json").unlink()  # the caller's config replaces the file's
        model = lib.from_pretrained(case.base(), directory, config=case.config(lib), is_trainable=True)
        for name in case.adapters[1:]:
            model.load_adapter(directory / name, name)
        seen["training"] = model.training
        seen["requires_grad"] = requires_grad(lib, model)
        for name in case.adapters:
            model.set_adapter(name)
            seen[f"{name}.output"] = output(case, model)
        kind, message = raised(lambda: lib.from_pretrained(case.base(), directory, config={"r": 4}))
        seen["error"] = (kind, message.startswith("The input config must be a PeftConfig, got"))

    ours, _ = run_both(scenario, case.spec.peft)
    assert ours.steps["error"] == (ValueError, True)
    for name in case.adapters:
        reference = case.adapted(VERALAB)
        reference.set_adapter(name)
        assert_fp32_close(ours.steps[f"{name}.output"], output(case, reference))


AUTOCAST_RUNS = [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float64, True)]


@matrix
def test_autocast_adapter_dtype(case, tmp_path):
    for dtype, autocast in AUTOCAST_RUNS:

        def scenario(lib, seen, dtype=dtype, autocast=autocast):
            model = lib.get_model(case.base().to(dtype), case.config(lib), autocast_adapter_dtype=autocast)
            for name in case.adapters[1:]:
                model.add_adapter(name, case.config(lib, name), autocast_adapter_dtype=autocast)
            seen["created"] = dtypes(lib, model)
            directory = tmp_path / f"{lib.name}-{dtype}-{autocast}"
            model.save_pretrained(directory)
            loaded = lib.from_pretrained(case.base().to(dtype), directory, autocast_adapter_dtype=autocast)
            loaded.load_adapter(
                subdirectory(directory, case.adapters[-1]), "loaded", autocast_adapter_dtype=autocast
            )
            seen["loaded"] = dtypes(lib, loaded)

        ours, _ = run_both(scenario, case.spec.peft)
        lambdas = {d for n, d in ours.steps["loaded"].items() if "vera_lambda_" in n}
        assert lambdas == {torch.float32 if autocast and dtype == torch.bfloat16 else dtype}


# ----------------------------------------------------------------------------------------- files


USER_README = """---
license: mit
tags:
- mine
# the user's comment
---
# My adapter

Notes the user wrote.
"""


def front_matter(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@matrix
def test_save_pretrained_writes_a_model_card(case, tmp_path):
    def scenario(lib, seen):
        model = case.adapted(lib)
        directory = tmp_path / lib.name
        model.save_pretrained(directory)
        seen["files"] = files(directory)
        card = front_matter(directory / "README.md")
        seen["library_name"], seen["base_model"] = card["library_name"], card.get("base_model") or None
        user = tmp_path / f"{lib.name}-user"
        user.mkdir()
        (user / "README.md").write_text(USER_README, encoding="utf-8")
        model.save_pretrained(user)
        seen["files beside the user's README"] = files(user)

    ours, _ = run_both(scenario, case.spec.peft)
    assert ours.steps["library_name"] == "peft" and ours.steps["base_model"] == case.spec.name_or_path
    # The README the user wrote is kept byte for byte (PEFT replaces its tags and appends its own text).
    assert (tmp_path / "veralab-user" / "README.md").read_text(encoding="utf-8") == USER_README
    card = (tmp_path / "veralab" / "README.md").read_text(encoding="utf-8")
    assert "VeraModel.from_pretrained" in card
    # How to load it with PEFT, or, for layers PEFT's VeRA cannot adapt, the LoRA export PEFT can load.
    assert ("PeftModel.from_pretrained" in card) is case.spec.peft
    assert ("cannot load this adapter" in card and "save_as_lora" in card) is not case.spec.peft
    # veralab's own card is rewritten, not piled up.
    case.adapted(VERALAB).save_pretrained(tmp_path / "veralab")
    assert (tmp_path / "veralab" / "README.md").read_text(encoding="utf-8") == card


# ----------------------------------------------------------------------------------------- state dicts


@matrix
def test_state_dict_functions(case):
    def scenario(lib, seen):
        model = case.adapted(lib)
        states = {name: lib.get_state_dict(model, adapter_name=name) for name in case.adapters}
        for name, state in states.items():
            seen[f"{name}.keys"] = sorted(state)
            for key, tensor in state.items():
                # A later adapter whose targets need a smaller pair reads its own in veralab (the one it
                # would read alone, docs/coming-from-peft.md) and PEFT's reads the first adapter's.
                if name == "default" or key not in ("base_model.vera_A", "base_model.vera_B"):
                    seen[f"{name}.{key}"] = tensor
        fresh = lib.get_model(case.base(), case.config(lib))
        for name in case.adapters[1:]:
            fresh.add_adapter(name, case.config(lib, name))
        for name, state in states.items():
            result = lib.set_state_dict(fresh, state, adapter_name=name)
            seen[f"{name}.unexpected"] = result.unexpected_keys
        for name in case.adapters:
            model.set_adapter(name)
            fresh.set_adapter(name)
            seen[f"{name}.output"] = output(case, fresh)
            seen[f"{name}.same as the source"] = torch.equal(output(case, fresh), output(case, model))
        key = next(k for k in states["default"] if k.endswith("vera_lambda_b"))
        wrong = {**states["default"], key: torch.zeros(states["default"][key].shape[0] + 1)}
        kind, message = raised(lambda: lib.set_state_dict(fresh, wrong, adapter_name="default"))
        seen["wrong shape"] = (kind, message.startswith("Error(s) in loading state_dict for"))
        seen["unknown adapter"] = raised(lambda: lib.get_state_dict(model, adapter_name="nope"))[0]

    ours, _ = run_both(scenario, case.spec.peft)
    assert all(ours.steps[f"{name}.same as the source"] for name in case.adapters)
    assert ours.steps["wrong shape"] == (RuntimeError, True) and ours.steps["unknown adapter"] is KeyError


# ----------------------------------------------------------------------------------------- errors


def two_llama_adapters(lib: Library):
    config = {"r": 4, "target_modules": ["v_proj"]}
    model = lib.get_model(Case("llama", False, ()).base(), lib.VeraConfig(**config))
    model.add_adapter("other", lib.VeraConfig(**config))
    return model


def merged_other(lib: Library, model, directory: Path) -> None:
    model.merge_adapter(["other"])
    model.delete_adapter("other")


ERRORS = {
    # case: (the user's call, the exception, the start of PEFT's message)
    "set an unknown adapter": (lambda lib, m, d: m.set_adapter("nope"), ValueError, "Adapter nope not found"),
    "delete an unknown adapter": (
        lambda lib, m, d: m.delete_adapter("nope"),
        ValueError,
        "Adapter nope does not exist",
    ),
    "delete a merged adapter": (
        merged_other,
        ValueError,
        "Cannot delete adapter(s) ['other'] while they are merged",
    ),
    "add a name that exists": (
        lambda lib, m, d: m.add_adapter("other", lib.VeraConfig(r=4, target_modules=["v_proj"])),
        ValueError,
        "Adapter with name 'other' already exists",
    ),
    "save unknown selected_adapters": (
        lambda lib, m, d: m.save_pretrained(d, selected_adapters=["nope"]),
        ValueError,
        "You passed an invalid `selected_adapters` arguments, current supported adapter names are "
        "['default', 'other'] - got ['nope']",
    ),
    "save into a file": (
        lambda lib, m, d: m.save_pretrained(d / "file.txt"),
        ValueError,
        "Provided path (",
    ),
    "load from a directory that does not exist": (
        lambda lib, m, d: lib.from_pretrained(Case("llama", False, ()).base(), d / "nope"),
        ValueError,
        "Can't find 'adapter_config.json' at '",
    ),
    "load an adapter without its config": (
        lambda lib, m, d: m.load_adapter(d, "loaded"),
        ValueError,
        "Can't find 'adapter_config.json' at '",
    ),
    "state dict of an unknown adapter": (
        lambda lib, m, d: lib.get_state_dict(m, adapter_name="nope"),
        KeyError,
        "'nope",
    ),
}


# PEFT refuses these beside a first adapter; veralab gives the adapter the pair its own config draws, the one
# it would read alone (a projection group of its own, docs/coming-from-peft.md). {case: (the adapter's config,
# PEFT's exception, the start of its message)}
OTHER_PAIRS = {
    "another projection_prng_key": (
        {"r": 4, "target_modules": ["v_proj"], "projection_prng_key": 1},
        ValueError,
        "Vera PRNG initialisation key must be the same for all adapters",
    ),
    "another save_projection": (
        {"r": 4, "target_modules": ["v_proj"], "save_projection": False},
        ValueError,
        "VeRA projection weights must be saved for all adapters or none",
    ),
    "a larger rank": (
        {"r": 8, "target_modules": ["v_proj"]},
        ValueError,
        "vera_A has a size of 4 but 8 or greater is required",
    ),
    "a larger layer": (  # v_proj is 32 -> 16, q_proj 32 -> 32
        {"r": 4, "target_modules": ["q_proj"]},
        ValueError,
        "vera_B has a size of 16 but 32 or greater is required",
    ),
}


@pytest.mark.parametrize("config, exception, prefix", OTHER_PAIRS.values(), ids=OTHER_PAIRS.keys())
def test_adapters_peft_refuses_beside_the_first_read_the_pair_they_would_read_alone(
    config, exception, prefix
):
    peft_model = two_llama_adapters(PEFT)
    kind, message = raised(lambda: peft_model.add_adapter("x", PEFT.VeraConfig(**config)))
    assert issubclass(kind, exception) and message.startswith(prefix), message
    model = two_llama_adapters(VERALAB)
    model.add_adapter("x", VERALAB.VeraConfig(**config))
    alone = VERALAB.get_model(Case("llama", False, ()).base(), VERALAB.VeraConfig(**config))
    pair = alone.projections_of("default")
    assert model.projections_of("x").holds((pair.vera_A, pair.vera_B))


@pytest.mark.parametrize("code, exception, prefix", ERRORS.values(), ids=ERRORS.keys())
def test_errors_peft_raises_keep_its_type_and_wording(code, exception, prefix, tmp_path):
    (tmp_path / "file.txt").write_text("not a directory")
    for lib in (PEFT, VERALAB):
        kind, message = raised(lambda lib=lib: code(lib, two_llama_adapters(lib), tmp_path))
        # A subclass is caught where user code catches PEFT's exception (AdapterLoadError is a ValueError).
        assert issubclass(kind, exception) and message.startswith(prefix), (lib.name, message)


def test_autocast_adapter_dtype_over_quantized_layers():
    """PEFT's rule over bitsandbytes layers: 8-bit ones have no float dtype (float32), 4-bit ones compute in
    their compute dtype (float32 with autocast, that dtype without)."""
    bnb = pytest.importorskip("bitsandbytes")

    def quantized() -> nn.Sequential:
        torch.manual_seed(0)
        int8 = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)
        int8.load_state_dict(nn.Linear(16, 8).state_dict())
        nf4 = bnb.nn.Linear4bit(8, 6, compute_dtype=torch.bfloat16, quant_type="nf4")
        nf4.load_state_dict(nn.Linear(8, 6).state_dict())
        return nn.Sequential(int8.to("cpu"), nf4.to("cpu"))

    for autocast in (True, False):

        def scenario(lib, seen, autocast=autocast):
            config = lib.VeraConfig(r=4, target_modules=["0", "1"])
            seen["dtypes"] = dtypes(lib, lib.get_model(quantized(), config, autocast_adapter_dtype=autocast))

        ours, _ = run_both(scenario)
        assert ours.steps["dtypes"]["model.1.vera_lambda_d.default"] == (
            torch.float32 if autocast else torch.bfloat16
        )
