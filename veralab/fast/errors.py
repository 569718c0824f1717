"""The errors veralab raises: adapter files that cannot serve a model, merges that cannot be done."""

from __future__ import annotations


class AdapterLoadError(ValueError):
    """An adapter file that cannot be loaded; the message names the file and the problem."""


class ProjectionMismatchError(AdapterLoadError):
    """Regenerated projections differ from the ones the adapter was saved with."""


class MergeNotSupportedError(TypeError):
    """A layer whose quantized weight cannot be written back (GPTQ, AWQ, ...): merging is refused before any
    weight changes; the adapter stays usable unmerged."""


class MergeNotWrittenError(RuntimeError):
    """A merge whose written weight does not hold the adapter's delta (the base layer ignored the write)."""
