"""VeRA over `nn.Conv1d` / `Conv2d` / `Conv3d` with groups=1: the kernel as a matrix (`veralab.reference` §8).

A kernel W (out, in, *k) is the matrix (out, in · ∏k) applied to the input patch at every output position, so
`A_s = vera_A[:, :in·∏k]` reshaped to (r, in, *k) is a convolution with the layer's own stride, padding and
dilation, and `B_s` a 1 x 1 convolution:

    h = conv(x, A_s)                       (N, r, *positions)
    y = conv(x, W) + b + conv1x1(h, S)     S = B_s ⊙ (Λ_b^T Λ_d), (out, r): every active adapter at once

With grad, autograd keeps h (and x, which the base convolution keeps anyway) and forms the lambda
gradients from the same `P = Σ G ⊗ h` the linear layers use. Without grad, the plan may fold the adapters
into the kernel instead (`conv(x, W + ΔW)`, one convolution) where the cost model finds it cheaper.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from veralab.fast.dispatch import ForwardPlan, plan_forward
from veralab.fast.layer import VeraLayer
from veralab.fast.projections import SharedProjections
from veralab.reference import conv_matrix_shape
from veralab.targets import CONV_TYPES


class VeraConv(VeraLayer):
    """VeRA over a frozen Conv1d / Conv2d / Conv3d, groups=1 (any stride, padding, padding mode, dilation).

    Args:
        base_layer: the convolution to adapt; it stays frozen. Grouped convolutions are refused.
        projections: the pair adapters read unless `update_layer` is given another (in = in_channels · ∏k,
            out = out_channels).
        fan_in_fan_out: must be False (accepted for the layer factory's uniform call).
    """

    def __init__(
        self,
        base_layer: nn.modules.conv._ConvNd,
        projections: SharedProjections,
        fan_in_fan_out: bool = False,
    ) -> None:
        out_features, in_features = conv_matrix_shape(base_layer)
        super().__init__(base_layer, projections, in_features, out_features)

    def get_base_weight(self) -> torch.Tensor:
        """The kernel as the (out, in · ∏k) matrix (a view of it)."""
        return self.base_layer.weight.data.view(self.out_features, self.in_features)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.weight.data.copy_(weight.view_as(self.base_layer.weight))

    def base_is_plain_dense(self) -> bool:
        """A convolution with its own forward and no hooks: one call with the kernel W + ΔW may replace it."""
        base = self.base_layer
        return type(base).forward in tuple(t.forward for t in CONV_TYPES) and not (
            base._forward_hooks or base._forward_pre_hooks
        )

    def plans(self, x: torch.Tensor, extra_arguments: bool = False) -> list[ForwardPlan]:
        """How `forward` computes the active, unmerged adapters' terms for input `x` (`plan_forward`), one
        plan per pair of projections they read: the matrix multiplies batch x output positions rows; only
        the first plan may fold into the kernel, and only without grad.

        Args:
            x: the input, (N, in_channels, *spatial).
            extra_arguments: the base layer is called with more than x (only its own forward can honor them).
        """
        tokens = x.shape[0] * math.prod(output_positions(self.base_layer, x))
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
                tokens=tokens,
                weight_space_with_grad=False,
            )
            for index, adapters in enumerate(self._adapter_facts())
        ]

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """`base(x)` plus the active adapters' terms, computed as `plans` decides."""
        result = None
        for plan in self.plans(x, extra_arguments=bool(args or kwargs)):
            if plan.weight_space:
                result = self._merged_kernel_forward(x, plan.weight_space)
            elif result is None:
                result = self.base_forward(x, *args, **kwargs)
            if plan.activation_space:
                result = self._add_terms(result, x, plan.activation_space)
            for name in plan.own_dropout:
                result = self._add_terms(result, self.vera_dropout[name](x), (name,))
        return result

    def _kernel_A(self, adapter_name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The A_s `adapter_name` reads as a convolution kernel, (r, in_channels, *kernel_size)."""
        A_s = self.projections_of(adapter_name).sliced_A(self.in_features, dtype, device)
        return A_s.view(A_s.shape[0], self.base_layer.in_channels, *self.base_layer.kernel_size)

    def _scaled(self, names: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """S = B_s ⊙ (Λ_b^T Λ_d), (out, r), in `dtype`: differentiable while the lambdas train, else kept."""
        lambda_d, lambda_b = self._stacked_lambdas(names)
        pair = self.projections_of(names[0])
        B_s = pair.sliced_B(self.out_features, self._lambda_compute_dtype(lambda_d), device)
        parameters = self._lambda_parameters(names)
        if any(p.requires_grad for p in parameters) and torch.is_grad_enabled():
            return (B_s * (lambda_b.to(B_s.dtype).T @ lambda_d.to(B_s.dtype))).to(dtype)
        return self._lambda_forms.scaled_projection(names, B_s, lambda_d, lambda_b, parameters, dtype)

    def _add_terms(self, base_output: torch.Tensor, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """`base_output + conv1x1(conv(x, A_s), S)` for the adapters `names`."""
        dtype = self.adapter_dtype(x)
        x = x.to(dtype)
        h = self.base_layer._conv_forward(x, self._kernel_A(names[0], dtype, x.device), None)  # (N, r, ...)
        S = self._scaled(names, dtype, x.device)
        return base_output + torch.einsum("nr...,or->no...", h, S).to(base_output.dtype)

    def _merged_kernel_forward(self, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """One convolution with the kernel W + ΔW, ΔW = S A_s (no grad: the plan allows it only then)."""
        weight = self.get_base_weight()
        A_s = self.projections_of(names[0]).sliced_A(self.in_features, weight.dtype, weight.device)
        S = self._scaled(names, weight.dtype, weight.device)
        kernel = torch.addmm(weight, S, A_s).view_as(self.base_layer.weight)  # W + S A_s
        return self.base_layer._conv_forward(x, kernel, self.base_layer.bias)

    def mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One adapter per row (sample) of the batch, one pair of convolutions per group of projections the
        batch uses."""
        result = self.base_forward(x, *args, **kwargs)
        groups = self.row_groups(x.shape[0])
        x_adapter = x.to(self.adapter_dtype(x))
        keep = self._row_keep_probabilities(x_adapter)
        if keep is not None:  # dropout with each sample's own adapter probability
            keep = keep.view(-1, *([1] * (x.dim() - 1)))
            x_adapter = x_adapter * torch.bernoulli(keep.expand_as(x_adapter)) / keep
        for group in groups:
            kernel = self._kernel_A(group[0], x_adapter.dtype, x.device)
            h = self.base_layer._conv_forward(x_adapter, kernel, None)  # (N, r, *positions)
            lambda_d_rows, lambda_b_rows = self._row_lambdas(h, group)  # (N, r), (N, out)
            positions = (1,) * (h.dim() - 2)
            B_s = self.projections_of(group[0]).sliced_B(self.out_features, h.dtype, x.device)
            scaled_h = h * lambda_d_rows.view(*lambda_d_rows.shape, *positions)
            u = torch.einsum("nr...,or->no...", scaled_h, B_s)
            result = result + (u * lambda_b_rows.view(*lambda_b_rows.shape, *positions)).to(result.dtype)
        return result


def output_positions(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[int, ...]:
    """The spatial size of `conv(x)` (the padding mode pads as much as zero padding does)."""
    spatial = x.shape[-len(conv.kernel_size) :]
    if conv.padding == "same":
        return tuple(spatial)
    padding = (0,) * len(spatial) if conv.padding == "valid" else conv.padding
    return tuple(
        (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        for size, pad, dilation, kernel, stride in zip(
            spatial, padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    )
