"""VeRA layers over `torch.nn.Linear` and transformers' GPT-2 `Conv1D`.

`VeraLinear` wraps a frozen base layer and holds, per adapter, the trained vectors `vera_lambda_d[name]`
(r) and `vera_lambda_b[name]` (out) in `nn.ParameterDict`s, as PEFT does, so state-dict keys match PEFT's.
The shared projections are referenced through one `SharedProjections` object per model.

Everything that touches the base weight goes through two methods, `get_base_weight` and
`set_base_weight`; the bitsandbytes layers (`veralab.fast.bnb`) override only those two (and the base
forward's quirks), so merge, unmerge and safe merge are written once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from veralab.config import VeraConfig
from veralab.fast.functional import adapter_delta, mixed_adapter_delta
from veralab.fast.projections import SharedProjections
from veralab.targets import weight_shape

# A row of a mixed batch that uses no adapter at all (the base model) is tagged with this name.
BASE_ROW = "__base__"


@dataclass
class RowAdapters:
    """Which adapter each row of a mixed batch uses: the distinct names and a (batch,) index into them."""

    names: list[str]
    index: torch.Tensor


class VeraLinear(nn.Module):
    """VeRA over a frozen linear-like layer (`nn.Linear`, or `Conv1D` with `fan_in_fan_out=True`).

    Forward: `base(x) + Σ_active λ_b ⊙ ((λ_d ⊙ (dropout(x) A_s^T)) B_s^T)`, computed in the dtype of `x`
    and returned in the dtype of `x`.

    Args:
        base_layer: the layer to adapt; it stays frozen.
        projections: the model's shared `vera_A` / `vera_B`.
        fan_in_fan_out: the base weight is stored as (in, out), as in `Conv1D`.
    """

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module, projections: SharedProjections, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = weight_shape(base_layer)
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Plain attributes, not submodules: shared by every layer, and not part of any layer's state dict.
        self._projections = projections
        self._row_adapters: RowAdapters | None = None

    # ------------------------------------------------------------------ adapters

    def update_layer(self, adapter_name: str, config: VeraConfig, low_cpu_mem_usage: bool = False) -> None:
        """Create the lambdas of `adapter_name` (λ_b = 0, λ_d = d_initial unless init_weights=False)."""
        r = config.r
        device = torch.device("meta") if low_cpu_mem_usage else self._base_device()
        if config.init_weights:
            lambda_d = torch.full((r,), float(config.d_initial), device=device)
            lambda_b = torch.zeros(self.out_features, device=device)
        else:
            lambda_d = torch.randn(r).to(device)
            lambda_b = torch.randn(self.out_features).to(device)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r

    def delete_adapter(self, adapter_name: str) -> None:
        for container in (self.vera_lambda_d, self.vera_lambda_b, self.vera_dropout):
            del container[adapter_name]
        del self.r[adapter_name]
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Make `adapter_names` active; only their lambdas require grad."""
        self.active_adapters = [name for name in adapter_names if name in self.vera_lambda_d]
        for name in self.vera_lambda_d:
            trainable = name in self.active_adapters
            self.vera_lambda_d[name].requires_grad_(trainable)
            self.vera_lambda_b[name].requires_grad_(trainable)

    def _base_device(self) -> torch.device:
        return self.base_layer.weight.device

    # ------------------------------------------------------------------ the base weight seam

    def get_base_weight(self) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor (a view for nn.Linear / Conv1D)."""
        weight = self.base_layer.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Write a dense (out, in) weight back into the base layer."""
        self.get_base_weight().copy_(weight)

    # ------------------------------------------------------------------ merge

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = (λ_b B_s)(λ_d A_s) of one adapter, (out, in), in float32 on the base weight's device.

        float32 whatever the base dtype: the delta is small next to W and would lose its low bits if
        built in bf16/fp16 before the single rounding of the merge.
        """
        lambda_d = self.vera_lambda_d[adapter_name].detach().float()
        lambda_b = self.vera_lambda_b[adapter_name].detach().float()
        A_s, B_s = self._projections.sliced(self.in_features, self.out_features, torch.float32, lambda_d.device)
        delta = (lambda_b[:, None] * B_s) @ (lambda_d[:, None] * A_s)  # (out, r) @ (r, in)
        return delta.to(self._base_device())

    def merged_weight(self, adapter_names: list[str], sign: float = 1.0) -> torch.Tensor:
        """The dense (out, in) weight after adding (sign=1) or subtracting (sign=-1) the adapters' ΔW.

        Computed in float32 and rounded once to the base dtype.
        """
        weight = self.get_base_weight()
        total = weight.float()
        for name in adapter_names:
            total = total + sign * self.delta_weight(name)
        return total.to(weight.dtype)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapters (default: the active ones) into the base weight.

        Args:
            adapter_names: adapters to merge; already merged ones are skipped.
            safe_merge: refuse (ValueError) a result with NaN/inf, leaving the weight untouched.
        """
        names = [n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters]
        if not names:
            return
        merged = self.merged_weight(names)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"merging adapter(s) {names} gives NaN/inf weights in a ({self.out_features} x {self.in_features}) "
                "layer; the weight was left untouched. Check the adapter's lambdas for NaN/inf."
            )
        self.set_base_weight(merged)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW (in float32, one rounding)."""
        if not self.merged_adapters:
            return
        self.set_base_weight(self.merged_weight(list(reversed(self.merged_adapters)), sign=-1.0))
        self.merged_adapters = []

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ forward

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def adapter_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the adapter term is computed in: the input's (quantized layers use the lambdas')."""
        return x.dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_forward(x, *args, **kwargs)
        if self.disable_adapters:
            return result.to(x.dtype)
        x_adapter = x.to(self.adapter_dtype(x))
        if self._row_adapters is not None:
            delta = self._mixed_batch_delta(x_adapter)
            return (result + delta.to(result.dtype)).to(x.dtype)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            A_s, B_s = self._projections.sliced(self.in_features, self.out_features, x_adapter.dtype, x.device)
            delta = adapter_delta(
                self.vera_dropout[name](x_adapter),
                A_s,
                B_s,
                self.vera_lambda_d[name].to(x_adapter.dtype),
                self.vera_lambda_b[name].to(x_adapter.dtype),
            )
            result = result + delta.to(result.dtype)
        return result.to(x.dtype)

    def _mixed_batch_delta(self, x: torch.Tensor) -> torch.Tensor:
        """One adapter per row: gather each row's lambdas (zeros where a row uses none here)."""
        rows = self._row_adapters
        if rows.index.shape[0] != x.shape[0]:
            raise ValueError(
                f"adapter_names has {rows.index.shape[0]} entries but the batch has {x.shape[0]} rows; "
                "give exactly one adapter name per row"
            )
        r = self._projections.r
        lambda_d_table = torch.stack(
            [self._lambda_or_zeros(self.vera_lambda_d, name, r, x) for name in rows.names]
        )  # (adapters, r)
        lambda_b_table = torch.stack(
            [self._lambda_or_zeros(self.vera_lambda_b, name, self.out_features, x) for name in rows.names]
        )  # (adapters, out)
        index = rows.index.to(x.device)
        A_s, B_s = self._projections.sliced(self.in_features, self.out_features, x.dtype, x.device)
        return mixed_adapter_delta(
            self._dropout_rows(x, rows), A_s, B_s, lambda_d_table[index], lambda_b_table[index]
        )

    @staticmethod
    def _lambda_or_zeros(table: nn.ParameterDict, name: str, size: int, x: torch.Tensor) -> torch.Tensor:
        if name in table:
            return table[name].to(x.dtype)
        return torch.zeros(size, dtype=x.dtype, device=x.device)

    def _dropout_rows(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Dropout with each row's own adapter probability (identity in eval or when every p is 0)."""
        probabilities = [
            self.vera_dropout[name].p if name in self.vera_dropout and isinstance(self.vera_dropout[name], nn.Dropout)
            else 0.0
            for name in rows.names
        ]
        if not self.training or not any(probabilities):
            return x
        keep = 1.0 - torch.tensor(probabilities, dtype=x.dtype, device=x.device)[rows.index.to(x.device)]  # (batch,)
        keep = keep.view(-1, *([1] * (x.dim() - 1)))
        mask = torch.bernoulli(keep.expand_as(x))
        return x * mask / keep

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"


def is_fan_in_fan_out(base_layer: nn.Module) -> bool:
    """Whether the base layer stores its weight as (in, out), as transformers' Conv1D does."""
    return isinstance(base_layer, Conv1D)


def warn_fan_in_fan_out_mismatch(config_value: bool, mismatched: list[str]) -> None:
    """Say which layers do not have the layout `fan_in_fan_out` claims (the config itself is not changed)."""
    if mismatched:
        warnings.warn(
            f"fan_in_fan_out={config_value} does not fit {len(mismatched)} target layer(s) (e.g. {mismatched[0]}); "
            f"using fan_in_fan_out={not config_value} for them, as their type requires. Your VeraConfig is not "
            "modified.",
            UserWarning,
            stacklevel=4,
        )
