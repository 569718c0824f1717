"""The one pair of shared projections, and the cache of the forms layers read from it.

Every adapted layer of a model holds a reference to the same `SharedProjections` object, so `vera_A` and
`vera_B` exist once in memory whatever the number of layers and adapters. Layers never slice or cast the
pair themselves on every forward: `SharedProjections.sliced(...)` returns a cached contiguous slice in the
dtype and on the device asked for, shared by every layer of the same shape, and rebuilt only when the pair
changes (moved, cast, or written in place).
"""

from __future__ import annotations

import torch

from veralab.reference import find_max_dims, init_projections, kaiming_init

__all__ = ["SharedProjections", "find_max_dims", "init_projections", "kaiming_init"]


class SharedProjections:
    """Holds `vera_A (r x max_in)` and `vera_B (max_out x r)` and caches their per-layer slices.

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
        self._cache.clear()

    def fits(self, in_features: int, out_features: int) -> bool:
        return in_features <= self.max_in and out_features <= self.max_out

    def sliced(
        self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous `A_s = vera_A[:, :in]` (r, in) and `B_s = vera_B[:out]` (out, r) in the form asked.

        Each form is built once and shared by every layer with the same in (or out) features.
        """
        self._drop_cache_if_stale()
        return (
            self._cached("A", in_features, dtype, device, lambda: self.vera_A[:, :in_features]),
            self._cached("B", out_features, dtype, device, lambda: self.vera_B[:out_features, :]),
        )

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
            self._cache.clear()
            self._cache_stamp = stamp
