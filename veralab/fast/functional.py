"""The VeRA adapter term, as functions of tensors.

`adapter_delta` is the term one adapter adds to a layer's output; `mixed_adapter_delta` is the same term
when each row of the batch uses its own adapter. Both compute in the dtype of `x` and leave the base
layer's output to the caller.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def adapter_delta(
    x: torch.Tensor, A_s: torch.Tensor, B_s: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor
) -> torch.Tensor:
    """λ_b ⊙ ((λ_d ⊙ (x A_s^T)) B_s^T) for x (..., in), A_s (r, in), B_s (out, r) -> (..., out)."""
    h = F.linear(x, A_s)  # (..., r)
    return lambda_b * F.linear(lambda_d * h, B_s)  # (..., out)


def mixed_adapter_delta(
    x: torch.Tensor,
    A_s: torch.Tensor,
    B_s: torch.Tensor,
    lambda_d_rows: torch.Tensor,
    lambda_b_rows: torch.Tensor,
) -> torch.Tensor:
    """The adapter term with one adapter per row of the batch.

    Every adapter shares A and B, so the batch costs the same two thin matmuls as one adapter; only the
    lambda vectors differ per row: `lambda_d_rows` (batch, r) and `lambda_b_rows` (batch, out), gathered
    by the caller (zeros for rows that use no adapter).
    """
    # (batch, r) -> (batch, 1, ..., 1, r) so it broadcasts over the middle (e.g. sequence) dims of x.
    middle = (1,) * (x.dim() - 2)
    lambda_d_rows = lambda_d_rows.view(lambda_d_rows.shape[0], *middle, -1)
    lambda_b_rows = lambda_b_rows.view(lambda_b_rows.shape[0], *middle, -1)
    h = F.linear(x, A_s)  # (batch, ..., r)
    return lambda_b_rows * F.linear(lambda_d_rows * h, B_s)  # (batch, ..., out)
