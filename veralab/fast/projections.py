"""A pair of shared projections, and the caches of the forms layers read from it.

Every adapted layer of a model holds a reference to the same `SharedProjections` object for each group of
adapters reading the same pair, so `vera_A` and `vera_B` exist once in memory whatever the number of layers
and adapters. Nothing is re-sliced, re-cast or recomputed on every forward:

- `SharedProjections.sliced_A/sliced_B/sliced` return cached contiguous slices in the dtype and on the device
  asked for, shared by every layer of the same shape, rebuilt only when the pair changes (moved, cast, or
  written in place);
- `SharedProjections.hidden` computes `h = x A_s^T` once for all the layers that read the same input through
  the same slice (q, k and v; gate and up), for as long as that input lives unchanged;
- `DerivedCache` keeps a layer's forms built from its lambdas (its scaled projection `S = B_s ⊙ (Λ_b^T Λ_d)`,
  its mixed-batch lambda tables) while the lambdas, dtype and device stay the same (inference, where the
  lambdas do not change between forwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from veralab.fast.functional import autocast_dtype
from veralab.reference import MaxDims, find_max_dims, init_projections, kaiming_init

__all__ = [
    "DerivedCache",
    "MaxDims",
    "SharedProjections",
    "find_max_dims",
    "init_projections",
    "kaiming_init",
]


@dataclass
class _SharedHidden:
    """One cached h, and what it was computed from."""

    h: torch.Tensor
    input_version: int


class SharedProjections:
    """Holds `vera_A (r x max_in)` and `vera_B (max_out x r)`, caches their per-layer slices and the shared h.

    Args:
        vera_A: the shared (r, max_in) projection.
        vera_B: the shared (max_out, r) projection.
        prng_key: the generator seed they were drawn from (checked when adapters are added).
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor, prng_key: int) -> None:
        self.vera_A = vera_A
        self.vera_B = vera_B
        self.prng_key = prng_key
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cache_stamp: tuple | None = None
        # input tensor -> {(in_features, dtype, device, autocast dtype): _SharedHidden}; dies with its input.
        self._hidden: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @classmethod
    def create(cls, r: int, max_in: int, max_out: int, prng_key: int) -> SharedProjections:
        """Draw the pair exactly as the reference (and PEFT) does: A first, then B, one CPU generator."""
        vera_A, vera_B = init_projections(r, max_in, max_out, prng_key)
        return cls(vera_A, vera_B, prng_key)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def max_in(self) -> int:
        return self.vera_A.shape[1]

    @property
    def max_out(self) -> int:
        return self.vera_B.shape[0]

    def replace(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> None:
        """Point at new tensors (after `.to()` / `load_state_dict(assign=True)`) and drop the cache."""
        self.vera_A, self.vera_B = vera_A, vera_B
        self._clear_caches()

    def fits(self, in_features: int, out_features: int) -> bool:
        return in_features <= self.max_in and out_features <= self.max_out

    def holds(self, tensors: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether this pair is exactly `tensors` (vera_A, vera_B), compared in its dtype, on its device."""
        return all(
            held.shape == given.shape and torch.equal(held, given.detach().to(held.device, held.dtype))
            for held, given in zip((self.vera_A, self.vera_B), tensors, strict=True)
        )

    def sliced(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous `A_s = vera_A[:, :in]` (r, in) and `B_s = vera_B[:out]` (out, r) in the form asked.

        Each form is built once and shared by every layer with the same in (or out) features.
        """
        return self.sliced_A(in_features, dtype, device), self.sliced_B(out_features, dtype, device)

    def sliced_A(self, in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The cached contiguous `vera_A[:, :in_features]`, (r, in), in the dtype and on the device asked."""
        self._drop_cache_if_stale()
        return self._cached("A", in_features, dtype, device, lambda: self.vera_A[:, :in_features])

    def sliced_B(self, out_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The cached contiguous `vera_B[:out_features]`, (out, r), in the dtype and on the device asked."""
        self._drop_cache_if_stale()
        return self._cached("B", out_features, dtype, device, lambda: self.vera_B[:out_features, :])

    def hidden(self, x: torch.Tensor, A_s: torch.Tensor) -> torch.Tensor:
        """`h = x A_s^T` (..., r) without grad, computed once for every layer that reads this same `x` through
        `A_s`.

        Layers reading one input through the same slice (q, k and v; gate and up) get the same h, so it is
        computed once and kept once for the backward. h never carries a graph (the VeRA Functions produce x's
        gradient themselves), so sharing it across layers, or across forwards on the same x, is always sound.

        The entry is never stale: it is keyed on x's identity and dropped when x is freed, recomputed when x
        was written in place or the projections changed. Under torch.compile (which deduplicates the matmuls
        itself) and for inference-mode tensors (which have no version counter) nothing is cached.

        Args:
            x: the input, (..., in).
            A_s: `sliced_A(in, dtype, x.device)` in the dtype h is computed in (x is cast to it).
        """
        if torch.compiler.is_compiling() or x.is_inference():
            with torch.no_grad():
                return F.linear(x.to(A_s.dtype), A_s)
        self._drop_cache_if_stale()
        entries = self._hidden.get(x)
        if entries is None:
            entries = self._hidden[x] = {}
        # Under autocast the matmul (and so h) runs in autocast's dtype, whatever A_s's.
        key = (A_s.shape[1], A_s.dtype, A_s.device, autocast_dtype(x.device.type))
        entry = entries.get(key)
        if entry is None or entry.input_version != x._version:
            with torch.no_grad():
                entry = entries[key] = _SharedHidden(F.linear(x.to(A_s.dtype), A_s), x._version)
        return entry.h

    def _cached(self, which: str, size: int, dtype: torch.dtype, device: torch.device, view) -> torch.Tensor:
        key = (which, size, dtype, device)
        tensor = self._cache.get(key)
        if tensor is None:
            tensor = self._cache[key] = view().to(device=device, dtype=dtype).contiguous()
        return tensor

    def _drop_cache_if_stale(self) -> None:
        # In-place writes (load_state_dict, DDP broadcasts) bump the tensors' version counters.
        stamp = (self.vera_A.data_ptr(), self.vera_A._version, self.vera_B.data_ptr(), self.vera_B._version)
        if stamp != self._cache_stamp:
            self._clear_caches()
            self._cache_stamp = stamp

    def _clear_caches(self) -> None:
        self._cache.clear()
        self._hidden = WeakIdKeyDictionary()

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) start with empty caches: weak references cannot be copied or pickled.
        state = self.__dict__.copy()
        state.update(_cache={}, _cache_stamp=None, _hidden=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._hidden = WeakIdKeyDictionary()


class DerivedCache:
    """One value derived from some tensors, kept while none of them is replaced or written in place.

    A layer keeps its scaled projection `S = B_s ⊙ (Λ_b^T Λ_d)` in one of these, and its mixed-batch lambda
    tables in another, for inference, where the same lambdas serve forward after forward. (While the lambdas
    train they change every step, and S is cheaper to rebuild than to keep.) The value is rebuilt when a
    source tensor is another object or was written in place (optimizer step, load_state_dict), or when the
    key (dtype, device, adapter names, ...) differs.
    """

    def __init__(self) -> None:
        self._sources: tuple[torch.Tensor, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._key: object = None
        self._value: object = None

    def get(self, sources: Sequence[torch.Tensor], key: object, build: Callable[[], object]) -> object:
        """The cached value, or `build()` when a source or the key changed.

        Args:
            sources: the tensors the value is computed from (held, and compared by identity and version).
            key: everything else the value depends on; compared with ==.
            build: computes the value from scratch.
        """
        sources = tuple(sources)
        versions = tuple(t._version for t in sources)
        same_sources = len(sources) == len(self._sources) and all(
            a is b for a, b in zip(sources, self._sources, strict=True)
        )
        if self._value is None or not same_sources or versions != self._versions or key != self._key:
            self._value = build()
            self._sources, self._versions, self._key = sources, versions, key
        return self._value

    def __getstate__(self) -> dict:
        return DerivedCache().__dict__  # a copy (deepcopy, pickle) rebuilds on first use
