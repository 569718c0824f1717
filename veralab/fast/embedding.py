"""VeRA over `torch.nn.Embedding`: the table as a linear map of one-hot inputs (`veralab.reference` §7).

A table E (num_embeddings, dim) is the weight W = E^T (out = dim, in = num_embeddings) of a linear map of
one-hot inputs, so `A_s = vera_A[:, :num_embeddings]`, `B_s = vera_B[:dim, :]`, and projecting an input is a
lookup: `h = A_s[:, ids]^T`, gathered, never a matmul, and the adapted table `E + ΔW^T` is never built
while training. The term is added with the same autograd Function as a linear layer's activation space
(`veralab.fast.functional.activation_space_vera`): only h is kept for the backward and the lambda gradients
come from `P = G^T h`. The padding row stays fixed, as nn.Embedding keeps it (h is zero there, and merging
leaves that row alone).
"""

from __future__ import annotations

import torch
from torch import nn

from veralab.fast.functional import activation_space_vera, mixed_batch_vera
from veralab.fast.layer import VeraLayer
from veralab.fast.projections import SharedProjections
from veralab.reference import check_embedding


class VeraEmbedding(VeraLayer):
    """VeRA over a frozen `nn.Embedding`: `E[ids] + Σ_active λ_b ⊙ ((λ_d ⊙ A_s[:, ids]^T) B_s^T)`.

    Dropout on the adapter's one-hot input drops whole tokens' terms (each kept one scaled by 1 / (1 - p)).

    Args:
        base_layer: the embedding to adapt; it stays frozen. One with `max_norm` is refused: it re-normalises
            looked-up rows of its table in place on every lookup, which no adapter term can follow.
        projections: the pair adapters read unless `update_layer` is given another (in = num_embeddings,
            out = embedding_dim).
        fan_in_fan_out: must be False (accepted for the layer factory's uniform call).
    """

    def __init__(
        self, base_layer: nn.Embedding, projections: SharedProjections, fan_in_fan_out: bool = False
    ) -> None:
        check_embedding(base_layer)
        super().__init__(base_layer, projections, base_layer.num_embeddings, base_layer.embedding_dim)

    def get_base_weight(self) -> torch.Tensor:
        """W = E^T, (embedding_dim, num_embeddings): a view of the table."""
        return self.base_layer.weight.data.T

    def lora_factors(self, adapter_name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """As for any layer, with the padding column of (λ_d ⊙ A_s) zero: the padding row stays fixed."""
        scaled_A, scaled_B = super().lora_factors(adapter_name, device)
        if self.base_layer.padding_idx is not None:
            scaled_A[:, self.base_layer.padding_idx] = 0.0
        return scaled_A, scaled_B

    def output(self, result: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return result  # the input is ids: the output keeps the table's dtype

    def adapter_dtype(self, ids: torch.Tensor) -> torch.dtype:
        """The table's dtype (the input is integer ids)."""
        return self.base_layer.weight.dtype

    def adapted_forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_forward(ids, *args, **kwargs)
        adapters = [adapter for group in self._adapter_facts() for adapter in group]
        dropped = [a.name for a in adapters if self.training and a.dropout > 0]
        for names in self.grouped([a.name for a in adapters if a.name not in dropped]):
            result = self._add_terms(result, ids, names, keep=None)
        for name in dropped:
            result = self._add_terms(result, ids, (name,), keep=1.0 - self._dropout_probability(name))
        return result

    def _add_terms(
        self, base_output: torch.Tensor, ids: torch.Tensor, names: tuple[str, ...], keep: float | None
    ) -> torch.Tensor:
        """`base_output + h S^T` for the adapters `names`; h holds the gathered columns of A_s (with tokens
        dropped out when `keep` is given)."""
        dtype = self.adapter_dtype(ids)
        pair = self.projections_of(names[0])
        lambda_d, lambda_b = self._stacked_lambdas(names)
        A_s = pair.sliced_A(self.in_features, dtype, ids.device)
        B_s = pair.sliced_B(self.out_features, self._lambda_compute_dtype(lambda_d), ids.device)
        h = self.gathered(ids, A_s)
        if keep is not None:
            h = h * torch.bernoulli(torch.full((*ids.shape, 1), keep, dtype=dtype, device=ids.device)) / keep
        S = self._lambda_forms.scaled_projection(
            names, B_s, lambda_d, lambda_b, self._lambda_parameters(names), dtype
        )
        return activation_space_vera(base_output, ids, h, S, A_s, B_s, lambda_d, lambda_b)

    def gathered(self, ids: torch.Tensor, A_s: torch.Tensor) -> torch.Tensor:
        """h = A_s[:, ids]^T, (*ids.shape, r): each id's column of A_s (zeros for the padding id)."""
        h = A_s.index_select(1, ids.reshape(-1)).T.reshape(*ids.shape, A_s.shape[0])
        if self.base_layer.padding_idx is not None:
            h = h * (ids != self.base_layer.padding_idx).unsqueeze(-1).to(h.dtype)
        return h

    def mixed_batch_forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One adapter per row of the batch (the first dimension of ids), one gather per group of
        projections the batch uses."""
        result = self.base_forward(ids, *args, **kwargs)
        dtype = self.adapter_dtype(ids)
        groups = self.row_groups(ids.shape[0])
        keep = self._row_keep_probabilities(torch.empty(0, dtype=dtype, device=ids.device))
        if keep is not None:  # each row's tokens dropped with its own adapter's probability
            keep = keep.view(-1, *([1] * (ids.dim() - 1)), 1)
            keep = torch.bernoulli(keep.expand(*ids.shape, 1)) / keep
        for group in groups:
            A_s, B_s = self.projections_of(group[0]).sliced(
                self.in_features, self.out_features, dtype, ids.device
            )
            h = self.gathered(ids, A_s)  # (batch, ..., r)
            if keep is not None:
                h = h * keep
            lambda_d_rows, lambda_b_rows = self._row_lambdas(h, group)
            result = mixed_batch_vera(result, h, B_s, lambda_d_rows, lambda_b_rows)
        return result
