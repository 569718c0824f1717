"""The errors of adapter files: what loading one raises when the file cannot serve the model."""

from __future__ import annotations


class AdapterLoadError(ValueError):
    """An adapter file that cannot be loaded; the message names the file and the problem."""


class ProjectionMismatchError(AdapterLoadError):
    """Regenerated projections differ from the ones the adapter was saved with."""
