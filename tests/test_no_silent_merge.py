"""No silent merge, ever: for every kind of base layer veralab adapts, a merge either changes the stored
weight by the adapter's delta or raises.

The kinds come from `veralab.fast.backends.layer_kinds()`: the plain ones and every backend's, so a kind joins
this check by being registered there, not by editing this file. "By the delta" is checked on the weight read
back after merging (dequantized), within the layer's own bound for one requantization; the delta is made
larger than that bound somewhere, so that a merge that wrote nothing could not pass.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from veralab import VeraConfig
from veralab.fast import get_model
from veralab.fast.backends import PLAIN_LAYER_TYPES, layer_kinds
from veralab.fast.backends.kinds import PLAIN_LAYER_KINDS
from veralab.fast.errors import MergeNotSupportedError, MergeNotWrittenError
from veralab.fast.layer import VeraLinear

KINDS = layer_kinds()


def test_every_plain_layer_type_veralab_adapts_has_a_registered_kind():
    registered = {kind.layer_type for kind in PLAIN_LAYER_KINDS}
    assert set(PLAIN_LAYER_TYPES) <= registered, "register a LayerKind in veralab.fast.backends.kinds"


def stored_state(layer: VeraLinear) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in layer.base_layer.state_dict().items()}


@pytest.mark.fault(
    "model",
    "merging into any kind of base layer (plain, bitsandbytes, torchao, quanto, HQQ, GPTQ/AWQ)",
    "the weight read back holds the delta within one requantization, or the merge raises and nothing changes",
)
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            kind, id=kind.name, marks=pytest.mark.skipif(bool(kind.unavailable), reason=str(kind.unavailable))
        )
        for kind in KINDS
    ],
)
def test_a_merge_writes_the_delta_or_raises(kind):
    torch.manual_seed(0)
    base = kind.from_linear(nn.Linear(256, 48))
    model = get_model(nn.Sequential(base), VeraConfig(r=8, target_modules=["0"], init_weights=False))
    layer = model.model[0]
    with torch.no_grad():
        layer.vera_lambda_b["default"].mul_(30)  # a delta well above any scheme's rounding
    before = layer.get_base_weight().float().clone() if layer.supports_merge else None
    state = stored_state(layer)
    delta = layer.delta_weight("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the requantization warning
        try:
            model.merge_adapter()
        except MergeNotSupportedError:
            assert not layer.supports_merge and not layer.merged
            for name, tensor in stored_state(layer).items():
                assert torch.equal(tensor, state[name]), name
            return
    assert layer.supports_merge and layer.merged
    target = before + delta
    bound = layer.requantization_bound(target)
    assert ((target - before).abs() > bound).any()  # a merge that wrote nothing would fail below
    excess = (layer.get_base_weight().float() - target).abs() - bound
    assert excess.max() <= 0, f"{kind.name}: merged weight off W + ΔW by {excess.max():.3g} beyond the bound"


class IgnoresWrites(nn.Linear):
    """A linear layer whose `weight` is rebuilt from a frozen copy on every access: writes to it are lost, as
    with a quantized weight that ignores in-place updates."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features)
        del self.weight
        self.register_buffer("frozen", linear.weight.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.frozen.clone()


@pytest.mark.fault(
    "model",
    "merging into a layer that silently ignores writes to its weight",
    "MergeNotWrittenError naming the layer type; the adapter is not marked merged",
)
def test_a_base_that_ignores_the_write_raises_instead_of_losing_the_adapter():
    model = get_model(
        nn.Sequential(IgnoresWrites(nn.Linear(16, 8))),
        VeraConfig(r=4, target_modules=["0"], init_weights=False),
    )
    with pytest.raises(MergeNotWrittenError, match="IgnoresWrites base layer kept its old weight"):
        model.merge_adapter()
    assert model.merged_adapters == []


@pytest.mark.fault(
    "model",
    "a merge or unmerge interrupted (KeyboardInterrupt) after one layer of any kind was written",
    "every layer's stored weight is put back bit for bit (requantized ones included); nothing is merged",
)
@pytest.mark.parametrize("operation", ["merge", "unmerge"])
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            kind, id=kind.name, marks=pytest.mark.skipif(bool(kind.unavailable), reason=str(kind.unavailable))
        )
        for kind in KINDS
    ],
)
def test_an_interrupted_merge_puts_every_weight_back(kind, operation, monkeypatch):
    torch.manual_seed(0)
    bases = nn.ModuleDict({name: kind.from_linear(nn.Linear(256, 48)) for name in ("a", "b")})
    model = get_model(bases, VeraConfig(r=8, target_modules=["a", "b"], init_weights=False))
    layers = [layer for _, layer in model.vera_layers()]
    if not layers[0].supports_merge:
        pytest.skip(
            f"{kind.name} refuses merging before anything changes (test_a_merge_writes_the_delta_or_raises)"
        )
    warnings.simplefilter("ignore", UserWarning)  # the requantization warning (pytest restores the filters)
    if operation == "unmerge":
        model.merge_adapter()
    before = [layer.get_base_weight().float().clone() for layer in layers]
    merged_before = [list(layer.merged_adapters) for layer in layers]
    real = type(layers[1]).set_base_weight

    def interrupted_on_the_second_layer(self, weight):
        if self is layers[1]:
            raise KeyboardInterrupt
        real(self, weight)

    monkeypatch.setattr(type(layers[1]), "set_base_weight", interrupted_on_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        model.merge_adapter() if operation == "merge" else model.unmerge_adapter()
    for layer, weight, merged in zip(layers, before, merged_before, strict=True):
        assert torch.equal(layer.get_base_weight().float(), weight)
        assert layer.merged_adapters == merged
    monkeypatch.undo()
    model.unmerge_adapter() if operation == "unmerge" else model.merge_adapter()  # still works afterwards
