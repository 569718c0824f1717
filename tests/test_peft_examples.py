"""PEFT VeRA usage as PEFT users write it (one model, several adapters, layer-specific targets, training with
`transformers.Trainer` then saving and reloading, a memory-efficient config), with `get_peft_model` replaced
by `veralab.fast.get_model` and nothing else changed but the imports and the hub model (a tiny OPT built from
a config, so that no hub is needed)."""

import warnings

import torch
from helpers import tiny_opt, token_batch
from torch.utils.data import Dataset

from veralab import VeraConfig
from veralab.fast import VeraModel
from veralab.fast import get_model as get_peft_model


def test_basic_vera_model_creation(capsys):
    base_model = tiny_opt()
    config = VeraConfig(r=128, target_modules=["q_proj", "v_proj"], vera_dropout=0.1)
    model = get_peft_model(base_model, config)
    model.print_trainable_parameters()
    assert "trainable params: 608 || all params:" in capsys.readouterr().out  # 2 layers x 2 x (128 + 24)


def test_multiple_adapter_configuration():
    base_model = tiny_opt()
    config1 = VeraConfig(r=256, target_modules=["q_proj", "v_proj"], projection_prng_key=42)
    model = get_peft_model(base_model, config1, adapter_name="task1")
    config2 = VeraConfig(r=256, target_modules=["q_proj", "v_proj"], projection_prng_key=42, vera_dropout=0.2)
    model.add_adapter("task2", config2)
    model.set_adapter("task1")
    assert model.active_adapter == "task1"
    model.set_adapter("task2")
    assert model.active_adapter == "task2"
    assert model.vera_A.shape == (256, 24)


def test_layer_specific_adaptation():
    base_model = tiny_opt()
    config = VeraConfig(
        r=512,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        layers_to_transform=[0],
        layers_pattern="layers",
        vera_dropout=0.1,
        d_initial=0.05,
        save_projection=True,
    )
    model = get_peft_model(base_model, config)
    assert {name.split(".layers.")[1][0] for name, _ in model.vera_layers()} == {"0"}


def test_training_and_saving(tmp_path):
    # The one import that changes besides get_model: checkpoints of a VeraModel hold only the adapter.
    from transformers import TrainingArguments

    from veralab.fast import VeraTrainer as Trainer

    class TrainDataset(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            row = token_batch(batch=8, seq=6)[i]
            return {"input_ids": row, "labels": row}

    base_model = tiny_opt()
    config = VeraConfig(r=256, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base_model, config)
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "vera_model"),
        per_device_train_batch_size=4,
        num_train_epochs=3,
        save_strategy="epoch",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=TrainDataset())
    trainer.train()
    model.save_pretrained(str(tmp_path / "vera_adapter"))
    # `PeftModel.from_pretrained(base_model, path)` in PEFT; veralab's class method is the same call.
    loaded_model = VeraModel.from_pretrained(tiny_opt(), str(tmp_path / "vera_adapter"))
    ids = token_batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded_model(ids).logits, model(ids).logits)


def test_memory_efficient_and_custom_initialisation(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the save_projection=False warning is the point of this config
        config = VeraConfig(
            r=256,
            target_modules=["q_proj", "v_proj"],
            save_projection=False,
            projection_prng_key=12345,
            vera_dropout=0.0,
            d_initial=0.1,
        )
    model = get_peft_model(tiny_opt(), config)
    model.save_pretrained(str(tmp_path))
    lambdas_bytes = 2 * 2 * (256 + 24) * 4
    projection_bytes = (model.vera_A.numel() + model.vera_B.numel()) * 4
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < lambdas_bytes + projection_bytes // 2
    again = VeraModel.from_pretrained(tiny_opt(), str(tmp_path))
    assert torch.equal(again.vera_A, model.vera_A)
