"""The model card save_pretrained writes (veralab.fast.model_card): veralab's own card is rewritten on every
save; a README.md the user wrote is never changed."""

import warnings

import pytest
import yaml
from helpers import tiny_llama

from veralab import VeraConfig
from veralab.fast import get_model
from veralab.fast.model_card import MARKER, render_front_matter


def front(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def test_names_that_need_quoting_are_quoted():
    name = 'C:\\models\\tiny: "v2" #1'
    keys = {"library_name": "peft", "base_model": name, "tags": ["vera", "base_model:adapter:org/x"]}
    assert front(render_front_matter(keys, "\n")) == keys


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
    "a README.md in the save directory without veralab's marker (the user's: text, binary, or veralab's card "
    "with the marker line deleted)",
    "left byte for byte as it is; the adapter is saved",
)
@pytest.mark.parametrize(
    "readme",
    [b"---\nlicense: mit\n---\n# Mine\n", b"\xff\xfe binary", b"edited card, marker line deleted\n"],
    ids=["text", "binary", "edited"],
)
def test_a_readme_the_user_wrote_is_left_alone(tmp_path, readme):
    (tmp_path / "README.md").write_bytes(readme)
    adapted().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_bytes() == readme
    assert (tmp_path / "adapter_model.safetensors").is_file()
