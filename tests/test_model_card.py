"""The model card save_pretrained writes (veralab.fast.model_card): veralab's own card is rewritten on every
save; a README.md the user wrote only gains the front-matter keys it lacks, its text untouched."""

import warnings

import pytest
import yaml
from helpers import tiny_llama

from veralab import VeraConfig
from veralab.fast import get_model
from veralab.fast.model_card import MARKER, add_missing_front_matter

KEYS = {"library_name": "peft", "base_model": "org/model", "tags": ["vera", "veralab"]}


def front(text: str) -> dict:
    return yaml.safe_load(text.replace("\r\n", "\n").split("---\n")[1])


def test_a_readme_without_front_matter_gets_one_on_top():
    text = "# Notes\n\nMine.\n"
    completed = add_missing_front_matter(text, KEYS)
    assert completed.endswith(text) and front(completed) == KEYS


@pytest.mark.parametrize(
    "matter",
    [
        "license: mit\nlibrary_name: transformers\ntags:\n- mine\n",
        "# a comment\n'library_name': transformers\n\"tags\": [mine]\nlicense: mit\n",
    ],
    ids=["plain keys", "quoted keys and a flow list"],
)
def test_keys_the_user_set_are_kept_and_only_missing_ones_added(matter):
    text = f"---\n{matter}---\n# Mine\n"
    completed = add_missing_front_matter(text, KEYS)
    assert completed.startswith(f"---\n{matter}") and completed.endswith("---\n# Mine\n")
    data = front(completed)
    assert data["library_name"] == "transformers" and data["tags"] == ["mine"] and data["license"] == "mit"
    assert data["base_model"] == "org/model"
    assert add_missing_front_matter(completed, KEYS) == completed  # nothing left to add


def test_windows_line_endings_are_kept():
    text = "---\r\nlicense: mit\r\n---\r\nText\r\n"
    completed = add_missing_front_matter(text, KEYS)
    assert "\n" not in completed.replace("\r\n", "") and front(completed)["library_name"] == "peft"


@pytest.mark.parametrize(
    "text",
    ["---\n{license: mit}\n---\nText\n", "---\nlicense: mit\nno closing line\n"],
    ids=["flow", "unclosed"],
)
def test_front_matter_that_cannot_be_extended_line_by_line_is_left_alone(text):
    assert add_missing_front_matter(text, KEYS) is None


def test_names_that_need_quoting_are_quoted():
    name = 'C:\\models\\tiny: "v2" #1'
    completed = add_missing_front_matter("Text\n", {**KEYS, "base_model": name})
    assert front(completed)["base_model"] == name


def adapted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tiny_llama()
        base.config._name_or_path = "org/tiny-llama"
        model = get_model(base, VeraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.add_adapter("other", VeraConfig(r=4, target_modules=["q_proj"]))
    return model


def test_veralab_card_describes_the_adapters_on_disk(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    data = front(card)
    assert data["library_name"] == "peft" and data["base_model"] == "org/tiny-llama"
    assert data["pipeline_tag"] == "text-generation"
    assert {"vera", "veralab", "transformers", "base_model:adapter:org/tiny-llama"} <= set(data["tags"])
    assert MARKER in card and "| default | `./` | q_proj | 4 | 72 |" in card and "other" not in card
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "| other | `other/` |" in card and 'adapter_name="other"' in card


def test_not_the_main_process_writes_no_card(tmp_path):
    adapted().save_pretrained(tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out" / "README.md").exists()


@pytest.mark.fault(
    "file",
    "a README.md in the save directory that is not UTF-8 text",
    "left as it is, with a UserWarning; the adapter is saved",
)
def test_a_readme_that_is_not_text_is_left_alone(tmp_path):
    (tmp_path / "README.md").write_bytes(b"\xff\xfe binary")
    with pytest.warns(UserWarning, match="could not be read as UTF-8"):
        adapted().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_bytes() == b"\xff\xfe binary"
    assert (tmp_path / "adapter_model.safetensors").is_file()
