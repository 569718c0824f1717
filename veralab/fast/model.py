"""VeraModel: find the targets, draw each adapter's projections, inject VeRA layers, manage adapters.

`get_model(model, config)` is the one-line replacement for PEFT's `get_peft_model(model, config)` with a
VeRA config: the same parameter names, the same projections for the same key, the same methods.

Projection groups: every adapter reads exactly the pair it would get as the model's only adapter,
`init_projections(r, max_in, max_out, projection_prng_key)` over its own targets. Adapters whose (key, r,
max_in, max_out) agree share one pair, held once; an adapter of another rank, key or size gets its own. The
first group's pair is the model's `vera_A` / `vera_B` buffers (PEFT's names), any other group's
`vera_A_<i>` / `vera_B_<i>`.

Adapter files (`veralab.fast.saving`, `loading`, `lora_export`) work through the model's public seam:
`plan_adapter` (what an adapter's config selects, checked before anything changes), `merged_adapters`,
`projections_of` / `projection_groups` / `set_projections`, `vera_layers` and the state dict.

Every operation that changes the model is all or nothing: everything that can be checked is checked first
(`plan_adapter`), and if the change still fails midway, KeyboardInterrupt included, the model is restored
exactly (`veralab.fast.rollback`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from veralab.config import VeraConfig
from veralab.fast import loading, lora_export, saving
from veralab.fast.backends import layer_geometry, prepare_model, vera_layer_class
from veralab.fast.layer import VeraLayer, is_fan_in_fan_out, warn_fan_in_fan_out_mismatch
from veralab.fast.layout import check_adapter_name
from veralab.fast.modules_to_save import ModulesToSaveWrapper
from veralab.fast.projections import SharedProjections, find_max_dims, init_projections
from veralab.fast.rollback import ModelSnapshot, all_or_nothing
from veralab.fast.rows import RowAdapters
from veralab.targets import Target, modules_to_save_names, select_modules_to_save, select_targets


@dataclass
class AdapterPlan:
    """An adapter as it would be added to (or is in) a model: everything its config selects, checked.

    Args:
        name: the adapter's name.
        config: a copy of its config; for task_type="SEQ_CLS" without modules_to_save, the classification
            heads are filled in, as they will be recorded.
        targets: the layers it adapts (the frozen base layers, whether or not already wrapped).
        modules_to_save: {name: module} of the modules it trains in full (possibly already wrapped).
        projection_shapes: the shapes of the vera_A (r, max_in) and vera_B (max_out, r) it reads.
        own_projection_shapes: the shapes its config draws over its own targets (what PEFT draws for it
            when it loads the adapter without saved projections); they differ from `projection_shapes` only
            for an adapter loaded with larger projections.
    """

    name: str
    config: VeraConfig
    targets: list[Target]
    modules_to_save: dict[str, nn.Module]
    projection_shapes: tuple[tuple[int, int], tuple[int, int]]
    own_projection_shapes: tuple[tuple[int, int], tuple[int, int]]


def get_model(
    model: nn.Module, config: VeraConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> VeraModel:
    """Adapt `model` with VeRA: the drop-in for `peft.get_peft_model(model, vera_config)`.

    Args:
        model: a transformers model (or any nn.Module with nn.Linear / Conv1D layers).
        config: the adapter's `VeraConfig`; it is copied, never modified.
        adapter_name: the first adapter's name.
        low_cpu_mem_usage: create the lambdas on the meta device (to be filled by loading an adapter).

    Everything is checked before `model` changes, and if adapting still fails midway (KeyboardInterrupt
    included) `model` is restored exactly: modules, parameters, requires_grad, buffers and training mode.
    """
    return VeraModel(model, config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)


class VeraModel(nn.Module):
    """A model adapted with VeRA; adapters with the same projections share one pair `vera_A`, `vera_B`.

    Attribute access falls through to the wrapped model, so `model.config`, `model.generate`, ... work.

    Args:
        model: the model to adapt; its own parameters are frozen.
        config: the first adapter's config.
        adapter_name: the first adapter's name.
        low_cpu_mem_usage: create the lambdas on the meta device.
    """

    prefix = "vera_lambda_"

    def __init__(
        self,
        model: nn.Module,
        config: VeraConfig,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, VeraConfig] = {}
        # adapter name -> the pair of projections it reads; adapters of one group share one object.
        self._pairs: dict[str, SharedProjections] = {}
        self._active_adapters: list[str] = []
        self._adapters_disabled = False
        # Tools such as transformers.Trainer read forward's signature to know which inputs the model takes:
        # expose the wrapped model's (our forward adds only `adapter_names`).
        self.forward = functools.update_wrapper(functools.partial(VeraModel.forward, self), model.forward)
        plan = self.plan_adapter(adapter_name, config)
        with all_or_nothing(model):
            self.model.requires_grad_(False)
            prepare_model(self.model)
            self._add_planned(plan, low_cpu_mem_usage, projections=None)
            self.set_adapter(adapter_name)

    # ------------------------------------------------------------------ passthrough to the wrapped model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not set yet (during __init__)
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model, with VeRA layers in it."""
        return self.model

    # ------------------------------------------------------------------ projection groups

    @property
    def projections(self) -> SharedProjections | None:
        """The first group's pair (every adapter's, when all adapters share one); None before any adapter."""
        return next(iter(self._pairs.values()), None)

    def projections_of(self, adapter_name: str) -> SharedProjections:
        """The pair of projections adapter `adapter_name` reads."""
        if adapter_name not in self._pairs:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        return self._pairs[adapter_name]

    def projection_groups(self) -> list[tuple[SharedProjections, list[str]]]:
        """Each distinct pair of projections with the adapters reading it, in the order pairs were made."""
        groups: dict[SharedProjections, list[str]] = {}
        for name, pair in self._pairs.items():
            groups.setdefault(pair, []).append(name)
        return list(groups.items())

    def projection_buffer_names(self, adapter_name: str) -> tuple[str, str]:
        """The model's buffer names of `adapter_name`'s vera_A and vera_B (`vera_A`/`vera_B` for the first
        group, `vera_A_<i>`/`vera_B_<i>` for the i-th other)."""
        pairs = [pair for pair, _ in self.projection_groups()]
        return _buffer_names(pairs.index(self.projections_of(adapter_name)))

    def _apply(self, fn, recurse=True):
        # .to() / .half() / ... replace the buffers: point every pair at its new tensors.
        super()._apply(fn, recurse)
        for index, (pair, _) in enumerate(self.projection_groups()):
            name_A, name_B = _buffer_names(index)
            pair.replace(self._buffers[name_A], self._buffers[name_B])
        return self

    def set_projections(
        self, vera_A: torch.Tensor, vera_B: torch.Tensor, adapter_name: str | None = None
    ) -> None:
        """Replace a pair in place for every layer reading it (same rank; large enough for their layers).

        Args:
            vera_A: the new (r, max_in) projection.
            vera_B: the new (max_out, r) projection.
            adapter_name: an adapter of the group whose pair is replaced (default: the first group).
        """
        pair = self.projections if adapter_name is None else self.projections_of(adapter_name)
        device, dtype = pair.vera_A.device, pair.vera_A.dtype
        pair.replace(vera_A.to(device, dtype), vera_B.to(device, dtype))
        self._register_projection_buffers()

    def _pair_for(
        self,
        config: VeraConfig,
        shapes: tuple[tuple[int, int], tuple[int, int]],
        targets: list[Target],
        tensors: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> SharedProjections:
        """The pair an adapter reads: an existing one holding the same projections, or a new one (on the
        device and in the dtype of the model's other pairs, else float32 beside its targets).

        Args:
            config: the adapter's config (its key and rank).
            shapes: its vera_A and vera_B shapes.
            targets: its target layers.
            tensors: the pair it must read (from a file); None to draw it from the key.
        """
        if tensors is None:
            (r, max_in), (max_out, _) = shapes
            tensors = init_projections(r, max_in, max_out, config.projection_prng_key)
        for pair in self._pairs.values():
            if pair.holds(tensors):
                return pair
        if self.projections is not None:
            device, dtype = self.projections.vera_A.device, self.projections.vera_A.dtype
        else:
            device, dtype = self._target_device(targets), torch.float32
        vera_A, vera_B = (t.detach().to(device=device, dtype=dtype) for t in tensors)
        return SharedProjections(vera_A, vera_B, config.projection_prng_key)

    def _register_projection_buffers(self) -> None:
        """Register every group's pair as buffers, `vera_A`/`vera_B` first, dropping freed groups' buffers."""
        for name in [n for n in self._buffers if n.startswith(("vera_A", "vera_B"))]:
            del self._buffers[name]
        for index, (pair, names) in enumerate(self.projection_groups()):
            # In the state dict when an adapter reading them saves them (save_projection).
            persistent = any(
                self.peft_config[name].save_projection for name in names if name in self.peft_config
            )
            name_A, name_B = _buffer_names(index)
            self.register_buffer(name_A, pair.vera_A, persistent=persistent)
            self.register_buffer(name_B, pair.vera_B, persistent=persistent)

    @staticmethod
    def _target_device(targets: list[Target]) -> torch.device | None:
        weight = getattr(targets[0].module, "weight", None)
        if weight is None or weight.device.type == "meta":
            return None
        return weight.device

    # ------------------------------------------------------------------ adding adapters

    def add_adapter(
        self,
        adapter_name: str,
        config: VeraConfig,
        low_cpu_mem_usage: bool = False,
        projections: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Add an adapter (inactive unless it is the first; use `set_adapter`).

        It reads the pair its config draws over its own targets (shared with any adapter that has the same
        one), or the given `projections`. Everything is checked before anything changes (`plan_adapter`): a
        bad name, projections that do not fit, or targets that match nothing leave the model exactly as it
        was; so does a failure midway (KeyboardInterrupt included).

        Args:
            adapter_name: the new adapter's name.
            config: its config (copied, never modified).
            low_cpu_mem_usage: create the lambdas on the meta device (to be filled by loading an adapter).
            projections: the (vera_A, vera_B) it was trained with (from a file), at least as large as its
                targets need; default: drawn from `config.projection_prng_key` over its targets.
        """
        shapes = None if projections is None else tuple(tuple(t.shape) for t in projections)
        plan = self.plan_adapter(adapter_name, config, projection_shapes=shapes)
        with all_or_nothing(self, objects=tuple(pair for pair, _ in self.projection_groups())):
            self._add_planned(plan, low_cpu_mem_usage, projections)

    def _add_planned(
        self,
        plan: AdapterPlan,
        low_cpu_mem_usage: bool,
        projections: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        adapter_name, config = plan.name, plan.config
        pair = self._pair_for(config, plan.projection_shapes, plan.targets, projections)
        self._pairs[adapter_name] = pair
        warn_fan_in_fan_out_mismatch(
            config.fan_in_fan_out,
            [t.name for t in plan.targets if is_fan_in_fan_out(t.module) != config.fan_in_fan_out],
        )
        for target in plan.targets:
            self._inject(target, adapter_name, config, pair, low_cpu_mem_usage)
        for name, module in plan.modules_to_save.items():
            self._wrap_module_to_save(name, module, adapter_name)
        self.peft_config[adapter_name] = config
        self._register_projection_buffers()
        self._mark_trainable()

    @staticmethod
    def plan_adapter_on(
        model: nn.Module,
        adapter_name: str,
        config: VeraConfig,
        projection_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> AdapterPlan:
        """What an adapter named `adapter_name` with `config` selects in `model` (adapted or not), checked.

        Nothing changes and nothing is allocated. The checks that need no other adapter: the name, the
        config, the targets, modules_to_save and the projection shapes (`plan_adapter` adds the ones against
        the model's other adapters). Loading an adapter into a base model plans with it before building
        anything.

        Args:
            model: the (base) model.
            adapter_name: the adapter's name.
            config: its config (copied, never modified).
            projection_shapes: the shapes of the vera_A and vera_B it reads (from a file), checked against
                its rank and targets; default: the pair its key draws over its own targets.

        Raises:
            ValueError: an invalid name or config, targets or modules_to_save that select nothing or something
                VeRA cannot adapt, projection shapes that do not fit them.
        """
        check_adapter_name(adapter_name)
        config = copy.deepcopy(config)
        config.validate()
        targets = select_targets(model, config, geometry=layer_geometry)
        own = _own_projection_shapes(config, targets)
        if projection_shapes is not None:
            _check_projection_shapes(model, projection_shapes, own)
        modules_to_save = select_modules_to_save(model, config)
        if config.modules_to_save is None and config.task_type == "SEQ_CLS":
            config.modules_to_save = modules_to_save_names(model, config) or None
        shapes = own if projection_shapes is None else tuple(tuple(s) for s in projection_shapes)
        return AdapterPlan(adapter_name, config, targets, modules_to_save, shapes, own)

    def plan_adapter(
        self,
        adapter_name: str,
        config: VeraConfig,
        existing: bool = False,
        projection_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> AdapterPlan:
        """What adding adapter `adapter_name` with `config` selects, after checking that it can be added.

        Nothing changes; every error `add_adapter` would raise is raised here.

        Args:
            adapter_name: the adapter's name.
            config: its config (copied, never modified).
            existing: plan an adapter the model already has under this name (its layout on disk, or loading
                new weights into it) instead of a new one.
            projection_shapes: the shapes of the vera_A and vera_B it reads (from a file); default: an
                existing adapter's pair, or the pair its key draws over its own targets.

        Raises:
            ValueError: an invalid or taken name (see `veralab.fast.layout.check_adapter_name`), an invalid
                config, targets or modules_to_save that select nothing or something VeRA cannot adapt, or
                projection shapes that do not fit them.
        """
        if not existing:
            self._check_new_adapter_name(adapter_name)
        if projection_shapes is None and existing and adapter_name in self._pairs:
            pair = self._pairs[adapter_name]
            projection_shapes = ((pair.r, pair.max_in), (pair.max_out, pair.r))
        return self.plan_adapter_on(self.model, adapter_name, config, projection_shapes)

    def _check_new_adapter_name(self, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another name or delete_adapter() it "
                "first"
            )

    def _inject(
        self,
        target: Target,
        adapter_name: str,
        config: VeraConfig,
        pair: SharedProjections,
        low_cpu_mem_usage: bool,
    ) -> None:
        layer = self.model.get_submodule(target.name)
        if not isinstance(layer, VeraLayer):
            layer_cls = vera_layer_class(target.module)
            layer = layer_cls(target.module, pair, fan_in_fan_out=is_fan_in_fan_out(target.module))
            layer.train(target.module.training)
            self._replace_module(target.name, layer)
        layer.update_layer(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, projections=pair)
        layer.set_adapter(self._active_adapters)

    def _wrap_module_to_save(self, name: str, module: nn.Module, adapter_name: str) -> None:
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            self._replace_module(name, module)
        module.update(adapter_name)
        module.set_adapter(self._active_adapters)

    def _replace_module(self, name: str, new_module: nn.Module) -> None:
        parent_name, _, child_name = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child_name, new_module)

    # ------------------------------------------------------------------ choosing adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active at once)."""
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    def vera_layers(self) -> Iterator[tuple[str, VeraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, VeraLayer):
                yield name, module

    def _wrappers(self) -> Iterator[ModulesToSaveWrapper]:
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield module

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter (or several, whose terms add up); only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(
                f"unknown adapter(s) {unknown or names}; this model has {list(self.peft_config)}"
            )
        if self.merged_adapters and set(self.merged_adapters) != set(names):
            warnings.warn(
                "the model has merged adapters; unmerging before switching adapters",
                UserWarning,
                stacklevel=2,
            )
            self.unmerge_adapter()
        self._active_adapters = names
        for _, layer in self.vera_layers():
            layer.set_adapter(names)
        for wrapper in self._wrappers():
            wrapper.set_adapter(names)
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        """Only the active adapters' lambdas, their modules_to_save copies and the biases their mode asks for.

        Adapters whose config has `inference_mode=True` (loaded with `is_trainable=False`) stay frozen.
        """
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
                param.requires_grad_(False)
        frozen = [n for n in self._active_adapters if self.peft_config[n].inference_mode]
        for _, layer in self.vera_layers():
            layer.set_adapter(self._active_adapters)
            for name in frozen:
                if name in layer.r:
                    layer.vera_lambda_d[name].requires_grad_(False)
                    layer.vera_lambda_b[name].requires_grad_(False)
        for wrapper in self._wrappers():
            wrapper.set_adapter(self._active_adapters)
            for name in frozen:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(False)
        modes = {self.peft_config[n].bias for n in self._active_adapters if n not in frozen}
        if "all" in modes:
            for name, param in self.model.named_parameters():
                if (
                    name.endswith("bias")
                    and ".modules_to_save." not in name
                    and ".original_module." not in name
                ):
                    param.requires_grad_(True)
        elif "vera_only" in modes:
            for _, layer in self.vera_layers():
                bias = getattr(layer.base_layer, "bias", None)
                if bias is not None:
                    bias.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside the block; merged adapters are unmerged for it and merged back after."""
        merged = self.merged_adapters
        if merged:
            warnings.warn(
                "disable_adapter() on a merged model: unmerging for the block", UserWarning, stacklevel=3
            )
            self.unmerge_adapter()
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(False)
            if merged:
                self.merge_adapter(merged)

    def _set_disabled(self, disabled: bool) -> None:
        self._adapters_disabled = disabled
        for _, layer in self.vera_layers():
            layer.disable_adapters = disabled
        for wrapper in self._wrappers():
            wrapper.disable_adapters = disabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter's lambdas (and modules_to_save copies). The last adapter cannot be deleted."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError(
                f"{adapter_name!r} is the model's last adapter; use unload() (or merge_and_unload()) to get "
                "the base model back instead of deleting it"
            )
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the weights; unmerge_adapter() first")
        for _, layer in self.vera_layers():
            if adapter_name in layer.r:
                layer.delete_adapter(adapter_name)
        for wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        del self._pairs[adapter_name]
        self._register_projection_buffers()  # a pair no adapter reads any more is freed
        if adapter_name in self._active_adapters:
            remaining = [n for n in self._active_adapters if n != adapter_name] or [
                next(iter(self.peft_config))
            ]
            warnings.warn(
                f"deleted the active adapter {adapter_name!r}; active adapter is now {remaining}",
                UserWarning,
                stacklevel=2,
            )
            self.set_adapter(remaining)

    # ------------------------------------------------------------------ merging

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the base weights (in the order they were merged)."""
        merged: list[str] = []
        for _, layer in self.vera_layers():
            merged.extend(n for n in layer.merged_adapters if n not in merged)
        return merged

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights.

        All or nothing: if merging fails midway (KeyboardInterrupt included), every weight already merged is
        restored bit for bit from a host-memory copy kept until the merge completes.

        Args:
            adapter_names: which adapters to merge; adapters already merged are skipped with a warning.
            safe_merge: check every layer's merged weight for NaN/inf *before* changing any weight, and
                raise ValueError naming the layer if one is not finite; the model is then left untouched.
        """
        names = self._adapters_to_merge(adapter_names, safe_merge)
        with all_or_nothing(self) as snapshot:
            self._merge(names, snapshot)

    def _adapters_to_merge(self, adapter_names: list[str] | None, safe_merge: bool) -> list[str]:
        """The adapters a merge folds in, after every check (nothing changes here)."""
        names = list(adapter_names) if adapter_names is not None else list(self._active_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(
                f"adapter(s) {already} are already merged; not merging them again", UserWarning, stacklevel=3
            )
        names = [n for n in names if n not in already]
        if safe_merge:
            for layer_name, layer in self.vera_layers():
                present = [n for n in names if n in layer.r]
                if present and not torch.isfinite(layer.merged_weight(present)).all():
                    raise ValueError(
                        f"merging adapter(s) {present} into {layer_name} gives NaN/inf weights; nothing was "
                        "merged. The adapter's lambdas are probably broken (check them for NaN/inf)."
                    )
        return names

    def _merge(self, names: list[str], snapshot: ModelSnapshot) -> None:
        for _, layer in list(self.vera_layers()):
            present = [n for n in names if n in layer.r]
            if present:
                snapshot.keep_values(layer.base_layer.weight)
                layer.merge(present)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights (all or nothing, like `merge_adapter`)."""
        if not self.merged_adapters:
            warnings.warn("no adapter is merged; nothing to unmerge", UserWarning, stacklevel=2)
            return
        with all_or_nothing(self) as snapshot:
            self._unmerge(snapshot)

    def _unmerge(self, snapshot: ModelSnapshot) -> None:
        for _, layer in list(self.vera_layers()):
            if layer.merged_adapters:
                snapshot.keep_values(layer.base_layer.weight)
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the adapters into the weights and return the plain base model (no VeRA modules left).

        All or nothing, like `merge_adapter`: on a failure the model is as before the call.

        Args:
            progressbar: accepted for PEFT compatibility; merging is fast enough not to need one.
            safe_merge: see `merge_adapter`.
            adapter_names: adapters to merge (default: the active ones).
        """
        names = self._adapters_to_merge(adapter_names, safe_merge)
        with all_or_nothing(self) as snapshot:
            self._merge(names, snapshot)
            return self._unload(keep_trained_copies=True)

    def unload(self) -> nn.Module:
        """Remove every VeRA module without merging and return the base model as it was."""
        with all_or_nothing(self) as snapshot:
            self._unmerge(snapshot)
            return self._unload(keep_trained_copies=False)

    def _unload(self, keep_trained_copies: bool) -> nn.Module:
        for name, layer in list(self.vera_layers()):
            self._replace_module(name, layer.base_layer)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                self._replace_module(name, module.unwrapped(keep_trained_copies))
        return self.model

    # ------------------------------------------------------------------ parameters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters); 4-bit packed weights count two values per byte, as in
        PEFT."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            if type(param).__name__ == "Params4bit":
                count *= 2 * param.element_size()
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
            f"{100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ running the model

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Run the wrapped model. `adapter_names` (one name per batch row) applies a different adapter to each
        row; `"__base__"` marks a row that uses no adapter."""
        with self._mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        rows = self._rows_for(adapter_names)
        layers = [layer for _, layer in self.vera_layers()]
        wrappers = list(self._wrappers())
        for module in layers + wrappers:
            module.row_adapters = rows
        try:
            yield
        finally:
            for module in layers + wrappers:
                module.row_adapters = None

    def _rows_for(self, adapter_names: list[str]) -> RowAdapters:
        rows = RowAdapters.for_batch(adapter_names, self.peft_config)
        if self.merged_adapters:
            raise ValueError("a mixed-adapter batch needs unmerged weights; call unmerge_adapter() first")
        if self._adapters_disabled:
            raise ValueError("adapter_names cannot be used inside disable_adapter()")
        return rows

    # ------------------------------------------------------------------ saving and loading
    # (veralab.fast.saving, loading)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        allow_non_finite: bool = False,
    ) -> None:
        """Save adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` per adapter.

        The adapter "default" goes into `save_directory`, any other into `save_directory/<name>`, as in PEFT.
        Each adapter's directory is updated atomically (`veralab.atomic`): whatever happens during the
        save, a kill -9 included, it holds afterwards the complete previous adapter or the complete new one,
        and other files in it are left alone.

        Args:
            save_directory: where to save.
            selected_adapters: the adapters to save (default: all).
            is_main_process: only the main process writes (distributed training).
            safe_serialization: must be True: veralab writes safetensors only, never pickle.
            allow_non_finite: save adapters whose tensors hold NaN/inf (refused by default: such an adapter
                only produces NaN/inf outputs, typically the result of a diverged training). Set it to keep a
                broken adapter for inspection.
        """
        if not safe_serialization:
            raise ValueError(
                "safe_serialization=False asks for a pickled adapter_model.bin; veralab writes safetensors "
                "only (PEFT reads them too). Drop the argument."
            )
        if is_main_process:
            saving.save_pretrained(self, save_directory, selected_adapters, allow_non_finite=allow_non_finite)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> VeraModel:
        """Adapt `model` with a saved VeRA adapter (veralab's or PEFT's); the drop-in for
        `peft.PeftModel.from_pretrained`.

        The files are checked against `model` before anything is allocated or changed (every size the files
        state is compared with the tensors in the file and the model's layers); every problem with them is
        an `AdapterLoadError` naming the file. On any error (KeyboardInterrupt included) `model` is left
        exactly as it was.

        Args:
            model: the base model.
            model_id: the adapter directory.
            adapter_name: the name to give the adapter.
            is_trainable: False (default) freezes the adapter and puts the model in eval mode, as PEFT does.
        """
        return loading.from_pretrained(
            cls, model, model_id, adapter_name=adapter_name, is_trainable=is_trainable
        )

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Load a saved adapter under `adapter_name` (inactive until `set_adapter`); an existing adapter of
        that name has its weights replaced in place. All or nothing, checked as in `from_pretrained`: on any
        error (KeyboardInterrupt included) the model is unchanged.

        Args:
            model_id: the adapter directory.
            adapter_name: the name to load it under.
            is_trainable: False (default) freezes the adapter and puts the model in eval mode, as PEFT does.
        """
        loading.load_adapter(self, model_id, adapter_name, is_trainable=is_trainable)

    def save_as_lora(
        self, save_directory: str | os.PathLike, adapter_name: str = "default", allow_non_finite: bool = False
    ) -> None:
        """Export an adapter as a standard PEFT LoRA adapter with exactly the same outputs
        (`lora_A = lambda_d * A_s`, `lora_B = lambda_b * B_s`, rank r, alpha r), for LoRA-only servers.

        Args:
            save_directory: where to write adapter_config.json and adapter_model.safetensors (updated
                atomically, like `save_pretrained`).
            adapter_name: the adapter to export.
            allow_non_finite: export tensors holding NaN/inf instead of refusing them.
        """
        lora_export.save_as_lora(self, save_directory, adapter_name, allow_non_finite=allow_non_finite)


def _own_projection_shapes(
    config: VeraConfig, targets: list[Target]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(r, max_in) and (max_out, r): the pair sized for an adapter's own targets."""
    max_in, max_out = find_max_dims([(t.out_features, t.in_features) for t in targets])
    return (config.r, max_in), (max_out, config.r)


def _check_projection_shapes(model: nn.Module, shapes, own) -> None:
    """Projections from a file must have the adapter's rank, cover its targets and no layer beyond the
    model's largest (a size from a file is not trusted to allocate)."""
    (r, own_in), (own_out, _) = own
    largest_in, largest_out = find_max_dims(
        [(g.out_features, g.in_features) for _, m in model.named_modules() if (g := layer_geometry(m))]
    )
    valid = len(shapes) == 2 and all(len(s) == 2 for s in shapes)
    if not valid or shapes[0][0] != r or shapes[1][1] != r:
        raise ValueError(
            f"projections of shapes {shapes} do not have rank r={r}: vera_A must be (r, max_in) and vera_B "
            "(max_out, r)"
        )
    (_, max_in), (max_out, _) = shapes
    if not (own_in <= max_in <= largest_in and own_out <= max_out <= largest_out):
        raise ValueError(
            f"projections vera_A {tuple(shapes[0])} / vera_B {tuple(shapes[1])} do not fit this model: its "
            f"targets need max_in >= {own_in} and max_out >= {own_out}, and no layer of the model is larger "
            f"than ({largest_out} x {largest_in}); the adapter was trained on another architecture"
        )


def _buffer_names(group_index: int) -> tuple[str, str]:
    """The model's buffer names of the `group_index`-th pair of projections."""
    suffix = "" if group_index == 0 else f"_{group_index}"
    return f"vera_A{suffix}", f"vera_B{suffix}"
