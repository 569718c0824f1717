"""VeRA layers: the adapter bookkeeping every layer type shares, and the layer over linear bases.

`VeraLayer` wraps a frozen base layer and holds, per adapter, the trained vectors `vera_lambda_d[name]`
(r) and `vera_lambda_b[name]` (out) in `nn.ParameterDict`s, as PEFT does, so state-dict keys match PEFT's.
Each adapter reads its pair of projections through the `SharedProjections` object of its group, which every
layer of the model references (adapters of one group share it; a forward computes each group present on its
own and adds the terms). Every layer type
sees its base weight as a dense (out, in) matrix through two methods, `get_base_weight` and
`set_base_weight`, so merge, unmerge and safe merge are written once; the layer types differ in their
forward:

- `VeraLinear` (here): `torch.nn.Linear` and transformers' GPT-2 `Conv1D`; the quantized linear layers of
  `veralab.fast.backends` subclass it and override the weight seam (their base is no plain dense matmul,
  `base_is_plain_dense`, so the plan of every forward, `veralab.fast.dispatch`, keeps them in activation
  space over `base_forward`);
- `VeraEmbedding` (`veralab.fast.embedding`): `torch.nn.Embedding`, as a map from one-hot inputs;
- `VeraConv` (`veralab.fast.conv`): `torch.nn.Conv1d/2d/3d` with groups=1, the kernel as a matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from veralab.config import VeraConfig
from veralab.fast.dispatch import AdapterFacts, ForwardPlan, lambdas_train, plan_forward
from veralab.fast.functional import (
    activation_space_vera,
    mixed_batch_vera,
    scaled_projection,
    weight_space_vera,
)
from veralab.fast.projections import DerivedCache, SharedProjections
from veralab.fast.rows import RowAdapters
from veralab.targets import weight_shape


class LambdaForms:
    """What a layer builds from its lambdas, kept across forwards while none of them trains.

    Two forms: the scaled projection `S = B_s ⊙ (Λ_b^T Λ_d)` of the adapters a forward computes together, and
    a mixed batch's tables of lambdas. While the lambdas train (grad enabled and one of them requires grad)
    they change every step, and a form is cheaper to rebuild than to keep: it is built for the call and not
    held. Otherwise (inference) one value serves forward after forward, rebuilt when one of the tensors it was
    built from is replaced or written in place (an optimizer step, load_state_dict), or when its key (dtype,
    device, adapter names) changes.
    """

    def __init__(self) -> None:
        # One cache per set of adapters computed together (per projection group, per dropout split).
        self._scaled_projection: dict[tuple[str, ...], DerivedCache] = {}
        self._row_tables: dict[tuple[str, ...], DerivedCache] = {}

    def scaled_projection(
        self,
        names: tuple[str, ...],
        B_s: torch.Tensor,
        lambda_d: torch.Tensor,
        lambda_b: torch.Tensor,
        parameters: list[nn.Parameter],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """`scaled_projection(B_s, lambda_d, lambda_b)` in `dtype`.

        Args:
            names: the adapters computed together (they share one pair of projections).
            B_s: the layer's slice of their vera_B, (out, r), in the dtype S is formed in.
            lambda_d: the adapters' λ_d stacked, (K, r).
            lambda_b: the adapters' λ_b stacked, (K, out).
            parameters: the λ_d and λ_b parameters the stacks were made from.
            dtype: the dtype S is returned in.
        """

        def build() -> torch.Tensor:
            return scaled_projection(B_s, lambda_d, lambda_b).to(dtype)

        cache = self._scaled_projection.setdefault(names, DerivedCache())
        return self._kept(cache, [B_s, *parameters], dtype, build)

    def row_tables(
        self,
        names: list[str],
        group: tuple[str, ...],
        lambdas_d: nn.ParameterDict,
        lambdas_b: nn.ParameterDict,
        r: int,
        out_features: int,
        x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A mixed batch's lambda tables for one projection group: (len(names), r) λ_d and (len(names), out)
        λ_b, in x's dtype/device.

        A name outside `group` (the base model's rows, an adapter of another group, or one only other
        layers have) gets zeros.

        Args:
            names: the batch's distinct adapter names, in the order of its row index.
            group: the layer's adapters that read the pair these tables go with.
            lambdas_d: the layer's λ_d parameters by adapter name.
            lambdas_b: the layer's λ_b parameters by adapter name.
            r: the projections' rank.
            out_features: the layer's output size.
            x: the adapter's input.
        """
        present = [name for name in names if name in group]

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.stack([self._lambda_or_zeros(lambdas_d, name, present, r, x) for name in names]),
                torch.stack(
                    [self._lambda_or_zeros(lambdas_b, name, present, out_features, x) for name in names]
                ),
            )

        sources = [*(lambdas_d[name] for name in present), *(lambdas_b[name] for name in present)]
        cache = self._row_tables.setdefault(group, DerivedCache())
        return self._kept(cache, sources, (tuple(names), x.dtype, x.device), build)

    @staticmethod
    def _kept(cache: DerivedCache, sources: list[torch.Tensor], key: object, build: Callable[[], object]):
        """`build()`, kept in `cache` for the next call unless this call trains one of `sources`."""
        if lambdas_train(sources):
            return build()
        return cache.get(sources, key=key, build=build)

    @staticmethod
    def _lambda_or_zeros(
        table: nn.ParameterDict, name: str, present: list[str], size: int, x: torch.Tensor
    ) -> torch.Tensor:
        if name in present:
            return table[name].to(x.dtype)
        return torch.zeros(size, dtype=x.dtype, device=x.device)


class VeraLayer(nn.Module):
    """What every VeRA layer shares: per-adapter lambdas and dropout, activation, merging, mixed batches.

    Subclasses give the base weight as a dense (out, in) matrix (`get_base_weight`, `set_base_weight`) and
    compute the adapters' terms in `adapted_forward` (and `mixed_batch_forward` for one adapter per row).

    Args:
        base_layer: the layer to adapt; it stays frozen.
        projections: the pair of projections adapters read unless `update_layer` is given another.
        in_features: the columns of the base weight seen as a matrix.
        out_features: its rows (λ_b has one entry per row).
    """

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")

    def __init__(
        self, base_layer: nn.Module, projections: SharedProjections, in_features: int, out_features: int
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Plain attributes, not submodules: shared by every layer, and not part of any layer's state dict.
        self._default_pair = projections
        self._pairs: dict[str, SharedProjections] = {}
        self.row_adapters: RowAdapters | None = None
        self._lambda_forms = LambdaForms()

    # ------------------------------------------------------------------ adapters

    def update_layer(
        self,
        adapter_name: str,
        config: VeraConfig,
        low_cpu_mem_usage: bool = False,
        projections: SharedProjections | None = None,
    ) -> None:
        """Create the lambdas of `adapter_name` (λ_b = 0, λ_d = d_initial unless init_weights=False).

        Args:
            adapter_name: the adapter's name.
            config: its config.
            low_cpu_mem_usage: create the lambdas on the meta device.
            projections: the pair it reads (default: the layer's); rank `config.r`, covering this layer.
        """
        pair = self._default_pair if projections is None else projections
        r = config.r
        if pair.r != r or not pair.fits(self.in_features, self.out_features):
            raise ValueError(
                f"adapter {adapter_name!r} (r={r}) cannot read projections vera_A ({pair.r} x {pair.max_in}) "
                f"/ vera_B ({pair.max_out} x {pair.r}) in a ({self.out_features} x {self.in_features}) "
                "layer: the rank must match and the pair must cover the layer"
            )
        device = torch.device("meta") if low_cpu_mem_usage else self._base_device()
        if config.init_weights:
            lambda_d = torch.full((r,), float(config.d_initial), device=device)
            lambda_b = torch.zeros(self.out_features, device=device)
        else:
            lambda_d = torch.randn(r).to(device)
            lambda_b = torch.randn(self.out_features).to(device)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_dropout[adapter_name] = (
            nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        )
        self.r[adapter_name] = r
        self._pairs[adapter_name] = pair

    def projections_of(self, adapter_name: str) -> SharedProjections:
        """The pair of projections adapter `adapter_name` reads."""
        return self._pairs[adapter_name]

    def grouped(self, names: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
        """`names` split by the pair each reads, in order of first appearance (one group when they share)."""
        groups: dict[SharedProjections, list[str]] = {}
        for name in names:
            groups.setdefault(self._pairs[name], []).append(name)
        return [tuple(group) for group in groups.values()]

    def delete_adapter(self, adapter_name: str) -> None:
        for container in (self.vera_lambda_d, self.vera_lambda_b, self.vera_dropout):
            del container[adapter_name]
        del self.r[adapter_name]
        del self._pairs[adapter_name]
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
        """The base weight as a dense (out, in) tensor (a view of the layer's own weight where it can be)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to read its base weight")

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Write a dense (out, in) weight back into the base layer."""
        self.get_base_weight().copy_(weight)

    # ------------------------------------------------------------------ merge

    def lora_factors(self, adapter_name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter as two factors, (λ_d ⊙ A_s) (r, in) and (λ_b ⊙ B_s) (out, r), float32, on `device`.

        Their product is ΔW; they are LoRA's A and B for the same function (with LoRA's scaling 1).
        """
        lambda_d = self.vera_lambda_d[adapter_name].detach().to(device, torch.float32)
        lambda_b = self.vera_lambda_b[adapter_name].detach().to(device, torch.float32)
        pair = self._pairs[adapter_name]
        A_s, B_s = pair.sliced(self.in_features, self.out_features, torch.float32, device)
        return lambda_d[:, None] * A_s, lambda_b[:, None] * B_s  # (r, in), (out, r)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = (λ_b B_s)(λ_d A_s) of one adapter, (out, in), in float32 on the base weight's device.

        float32 whatever the base dtype: the delta is small next to W and would lose its low bits if
        built in bf16/fp16 before the single rounding of the merge.
        """
        scaled_A, scaled_B = self.lora_factors(adapter_name, self.vera_lambda_d[adapter_name].device)
        return (scaled_B @ scaled_A).to(self._base_device())  # (out, r) @ (r, in)

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
                f"merging adapter(s) {names} gives NaN/inf weights in a ({self.out_features} x "
                f"{self.in_features}) layer; the weight was left untouched. Check the adapter's lambdas for "
                "NaN/inf."
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

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as stored: models read it through the adapted layer (ViT reads its
        patch embedding's dtype, T5 its `wo.weight`), as PEFT's adapter layers allow."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None where it has none)."""
        return getattr(self.base_layer, "bias", None)

    # ------------------------------------------------------------------ forward

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def adapter_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the adapter term is computed in: the input's (quantized layers use the lambdas')."""
        return x.dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`base(x)` plus every active, unmerged adapter's term (one adapter per row in a mixed batch)."""
        if self.disable_adapters:
            return self.output(self.base_forward(x, *args, **kwargs), x)
        if self.row_adapters is not None:
            return self.output(self.mixed_batch_forward(x, *args, **kwargs), x)
        return self.output(self.adapted_forward(x, *args, **kwargs), x)

    def output(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output in the input's dtype (the base may compute in another, e.g. 4-bit layers)."""
        return result.to(x.dtype)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`base(x)` plus the terms of the active, unmerged adapters."""
        raise NotImplementedError

    def mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`base(x)` plus, for every row of the batch, the term of that row's adapter (`row_adapters`)."""
        raise NotImplementedError

    def plans(self, x: torch.Tensor, extra_arguments: bool = False) -> list[ForwardPlan]:
        """How `forward` computes the adapters' terms, one plan per pair of projections (layer types that
        choose between computation paths)."""
        raise NotImplementedError(f"{type(self).__name__} computes its adapters' terms one way only")

    def plan(self, x: torch.Tensor, extra_arguments: bool = False) -> ForwardPlan:
        """The first of `plans`: the whole plan when the active adapters share one pair of projections."""
        return self.plans(x, extra_arguments)[0]

    def _adapter_facts(self) -> list[list[AdapterFacts]]:
        """The active, unmerged adapters as the plan of a forward reads them, one list per pair of
        projections they read (a single empty list when there are none: the base layer still runs)."""
        unmerged = [name for name in self.active_adapters if name not in self.merged_adapters]
        return [
            [
                AdapterFacts(
                    name,
                    self._dropout_probability(name),
                    (self.vera_lambda_d[name], self.vera_lambda_b[name]),
                )
                for name in group
            ]
            for group in self.grouped(unmerged)
        ] or [[]]

    def _pair_r(self, adapters: list[AdapterFacts]) -> int:
        """The rank of the pair `adapters` read (any rank when there are none: nothing is computed)."""
        return self._pairs[adapters[0].name].r if adapters else self._default_pair.r

    def _dropout_probability(self, adapter_name: str) -> float:
        dropout = self.vera_dropout[adapter_name]
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def _stacked_lambdas(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, r) λ_d and (K, out) λ_b of the adapters `names`, differentiable back to each parameter."""
        return (
            torch.stack([self.vera_lambda_d[n] for n in names]),
            torch.stack([self.vera_lambda_b[n] for n in names]),
        )

    def _lambda_parameters(self, names: list[str] | tuple[str, ...]) -> list[nn.Parameter]:
        """The λ_d and then the λ_b parameters of the adapters `names`."""
        return [*(self.vera_lambda_d[n] for n in names), *(self.vera_lambda_b[n] for n in names)]

    @staticmethod
    def _lambda_compute_dtype(lambda_d: torch.Tensor) -> torch.dtype:
        # S and the lambda gradients are formed in at least float32, whatever the activations' dtype.
        return torch.promote_types(lambda_d.dtype, torch.float32)

    def row_groups(self, batch_rows: int) -> list[tuple[str, ...]]:
        """The layer's adapters used by some row of the mixed batch, split by the pair they read: each group
        costs one pair of thin matmuls, whatever the number of its adapters.

        Args:
            batch_rows: the rows of the batch (checked against the number of adapter names).
        """
        rows = self.row_adapters
        if rows.index.shape[0] != batch_rows:
            raise ValueError(
                f"adapter_names has {rows.index.shape[0]} entries but the batch has {batch_rows} rows; give "
                "exactly one adapter name per row"
            )
        return self.grouped([name for name in rows.names if name in self._pairs])

    def _row_lambdas(self, x: torch.Tensor, group: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's (batch, r) λ_d and (batch, out) λ_b for the pair `group` reads, in x's dtype (zeros
        where a row uses no adapter of the group here)."""
        rows = self.row_adapters
        lambda_d_table, lambda_b_table = self._lambda_forms.row_tables(
            rows.names,
            group,
            self.vera_lambda_d,
            self.vera_lambda_b,
            r=self._pairs[group[0]].r,
            out_features=self.out_features,
            x=x,
        )
        index = rows.index.to(x.device)
        return lambda_d_table[index], lambda_b_table[index]

    def _row_keep_probabilities(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's (batch,) keep probability under its adapter's dropout; None when no dropout applies."""
        rows = self.row_adapters
        probabilities = [
            self._dropout_probability(name) if name in self.vera_dropout else 0.0 for name in rows.names
        ]
        if not self.training or not any(probabilities):
            return None
        return 1.0 - torch.tensor(probabilities, dtype=x.dtype, device=x.device)[rows.index.to(x.device)]

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"


class VeraLinear(VeraLayer):
    """VeRA over a frozen linear-like layer (`nn.Linear`, or `Conv1D` with `fan_in_fan_out=True`).

    Forward: `base(x) + Σ_active λ_b ⊙ ((λ_d ⊙ (dropout(x) A_s^T)) B_s^T)`, returned in the dtype of `x`,
    computed exactly on one of two paths (`veralab.fast.functional`), chosen call by call by `plan`
    (`veralab.fast.dispatch`): in weight space as one matmul with `W + ΔW` (float32/float64 plain dense bases,
    no dropout, enough tokens), otherwise in activation space over `base_forward`. Either way only
    `h = x A_s^T` is kept for the backward, once for all the layers reading the same x.

    Args:
        base_layer: the layer to adapt; it stays frozen.
        projections: the pair of projections adapters read unless `update_layer` is given another.
        fan_in_fan_out: the base weight is stored as (in, out), as in `Conv1D`.
    """

    def __init__(
        self, base_layer: nn.Module, projections: SharedProjections, fan_in_fan_out: bool = False
    ) -> None:
        out_features, in_features = weight_shape(base_layer)
        super().__init__(base_layer, projections, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out

    def get_base_weight(self) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor (a view for nn.Linear / Conv1D)."""
        weight = self.base_layer.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def base_is_plain_dense(self) -> bool:
        """Whether the base layer computes exactly `x W^T + b` with the dense W of `get_base_weight()`.

        Only then may one matmul with `W + ΔW` replace the base layer's call (weight space): an `nn.Linear` or
        `Conv1D` with its own forward and no forward hooks (which must still run). Layers over quantized bases
        return False: their weight is not a dense matrix a matmul can take.
        """
        base = self.base_layer
        return type(base).forward in (nn.Linear.forward, Conv1D.forward) and not (
            base._forward_hooks or base._forward_pre_hooks
        )

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`base(x)` plus the active adapters' terms, computed as `plans` decides."""
        result = None
        for plan in self.plans(x, extra_arguments=bool(args or kwargs)):
            result = self._run(plan, x, result, *args, **kwargs)
        return result

    def plans(self, x: torch.Tensor, extra_arguments: bool = False) -> list[ForwardPlan]:
        """How `forward` computes the active, unmerged adapters' terms for input `x` (see `plan_forward`):
        one plan per pair of projections they read. Only the first may fold its adapters into the weight
        (replacing the base call); the others add their terms in activation space.

        Args:
            x: the input, (..., in).
            extra_arguments: the base layer is called with more than x (only its own forward can honor them).
        """
        return [
            plan_forward(
                x,
                adapters,
                in_features=self.in_features,
                out_features=self.out_features,
                r=self._pair_r(adapters),
                base_weight=self.base_layer.weight,
                base_is_plain_dense=self.base_is_plain_dense() and index == 0,
                training=self.training,
                extra_arguments=extra_arguments,
            )
            for index, adapters in enumerate(self._adapter_facts())
        ]

    def _run(
        self, plan: ForwardPlan, x: torch.Tensor, result: torch.Tensor | None, *args, **kwargs
    ) -> torch.Tensor:
        """Carry `plan` out: the base call (or the weight-space matmul replacing it) unless `result` holds
        it already, then the terms added."""
        if plan.weight_space:
            result = self._weight_space_forward(x, plan.weight_space, with_h=plan.lambdas_train)
        elif result is None:
            result = self.base_forward(x, *args, **kwargs)
        if plan.activation_space:
            result = self._activation_space_forward(result, x, plan.activation_space)
        for name in plan.own_dropout:
            dropped = self.vera_dropout[name](x.to(self.adapter_dtype(x)))
            result = self._activation_space_forward(result, dropped, (name,))
        return result

    def _weight_space_forward(self, x: torch.Tensor, names: tuple[str, ...], with_h: bool) -> torch.Tensor:
        weight = self.get_base_weight()
        pair = self._pairs[names[0]]
        A_s = pair.sliced_A(self.in_features, weight.dtype, weight.device)
        B_s = pair.sliced_B(self.out_features, weight.dtype, weight.device)
        lambda_d, lambda_b = self._stacked_lambdas(names)
        h = pair.hidden(x, A_s) if with_h else None  # only the lambda gradients read h
        parameters = self._lambda_parameters(names)
        S = self._lambda_forms.scaled_projection(names, B_s, lambda_d, lambda_b, parameters, weight.dtype)
        return weight_space_vera(x, h, S, weight, self.base_layer.bias, A_s, B_s, lambda_d, lambda_b)

    def _activation_space_forward(
        self, base_output: torch.Tensor, x: torch.Tensor, names: tuple[str, ...]
    ) -> torch.Tensor:
        dtype = self.adapter_dtype(x)
        pair = self._pairs[names[0]]
        lambda_d, lambda_b = self._stacked_lambdas(names)
        A_s = pair.sliced_A(self.in_features, dtype, x.device)
        B_s = pair.sliced_B(self.out_features, self._lambda_compute_dtype(lambda_d), x.device)
        h = pair.hidden(x, A_s)
        parameters = self._lambda_parameters(names)
        S = self._lambda_forms.scaled_projection(names, B_s, lambda_d, lambda_b, parameters, dtype)
        return activation_space_vera(base_output, x, h, S, A_s, B_s, lambda_d, lambda_b)

    def mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One adapter per row: gather each row's lambdas (zeros where a row uses none here), one pair of
        thin matmuls per group of projections the batch uses."""
        result = self.base_forward(x, *args, **kwargs)
        groups = self.row_groups(x.shape[0])
        x_adapter = x.to(self.adapter_dtype(x))
        keep = self._row_keep_probabilities(x_adapter)
        if keep is not None:  # dropout with each row's own adapter probability
            keep = keep.view(-1, *([1] * (x.dim() - 1)))  # (batch, 1, ..., 1)
            x_adapter = x_adapter * torch.bernoulli(keep.expand_as(x_adapter)) / keep
        for group in groups:
            pair = self._pairs[group[0]]
            lambda_d_rows, lambda_b_rows = self._row_lambdas(x_adapter, group)
            A_s, B_s = pair.sliced(self.in_features, self.out_features, x_adapter.dtype, x.device)
            if torch.is_grad_enabled() and x_adapter.requires_grad:
                h = F.linear(x_adapter, A_s)  # the input gradient flows through this h
            else:
                h = pair.hidden(x_adapter, A_s)
            result = mixed_batch_vera(result, h, B_s, lambda_d_rows, lambda_b_rows)
        return result


def is_fan_in_fan_out(base_layer: nn.Module) -> bool:
    """Whether the base layer stores its weight as (in, out), as transformers' Conv1D does."""
    return isinstance(base_layer, Conv1D)


def warn_fan_in_fan_out_mismatch(config_value: bool, mismatched: list[str]) -> None:
    """Say which layers do not have the layout `fan_in_fan_out` claims (the config itself is not changed)."""
    if mismatched:
        warnings.warn(
            f"fan_in_fan_out={config_value} does not fit {len(mismatched)} target layer(s) (e.g. "
            f"{mismatched[0]}); using fan_in_fan_out={not config_value} for them, as their type requires. "
            "Your VeraConfig is not modified.",
            UserWarning,
            stacklevel=4,
        )
