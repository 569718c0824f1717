r"""The VeRA adapter term as custom autograd Functions.

Notation (as in the cost model in docs/design.md): x (N x in), W (out x in), A_s (r x in), B_s (out x r), and
the K active adapters' lambdas stacked as Λ_d (K x r) and Λ_b (K x out). All K adapters fold into one *scaled
projection*

    S = B_s ⊙ (Λ_b^T Λ_d)      (out x r),     S[o, k] = B_s[o, k] · Σ_a λ_b^a[o] λ_d^a[k]

so their whole term is `h S^T` with `h = x A_s^T` (N x r), and their weight is `ΔW = S A_s`. Two exact ways
to compute an adapted layer follow:

- activation space (`activation_space_vera`): `y = base(x) + h S^T`. Works over any base layer (quantized
  ones included), in any dtype, with dropout on the adapter's input.
- weight space (`weight_space_vera`): `y = x (W + S A_s)^T + b`, one base-sized matmul whose backward gives
the
  input gradient for free. ΔW is rebuilt in the backward rather than kept alive. Exact only where W's dtype
  keeps the small ΔW (float32/float64) and the adapter reads x itself (no dropout).

Both keep only h for the backward and get the lambda gradients from `P = G^T h` (out x r), G being the output
gradient: with `Q = B_s ⊙ P`, `grad Λ_b = Λ_d Q^T` and `grad Λ_d = Λ_b Q`. h is an *input* of both Functions,
computed without grad by the caller (`SharedProjections.hidden`), so that layers reading the same input
through the same A_s (q, k and v; gate and up) compute and keep it once; the Functions take x as well and
produce its gradient themselves, so a shared h never carries a graph that one backward could free under
another. S is an input too (the caller may cache it), recomputed from the lambdas in the backward rather
than saved.

Which of the two a layer runs, call by call, is decided in one place: `veralab.fast.dispatch`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type, or None when autocast is off (or unknown
    there)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def scaled_projection(B_s: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """S = B_s ⊙ (Λ_b^T Λ_d), (out, r), in the dtype of B_s: every active adapter folded into one matrix.

    Args:
        B_s: the layer's slice of vera_B, (out, r).
        lambda_d: the adapters' λ_d stacked, (K, r).
        lambda_b: the adapters' λ_b stacked, (K, out).
    """
    dtype = B_s.dtype
    return B_s * (lambda_b.detach().to(dtype).T @ lambda_d.detach().to(dtype))  # (out, K) @ (K, r)


def lambda_grads(
    grad_output: torch.Tensor,
    h: torch.Tensor,
    B_s: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    needs_d: bool,
    needs_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The exact gradients of Λ_d (K, r) and Λ_b (K, out) from P = G^T h, one (out x N) @ (N x r) matmul.

    Args:
        grad_output: G, the gradient of the layer's output, (N, out).
        h: x A_s^T, (N, r).
        B_s: the layer's slice of vera_B, (out, r), in the dtype the gradients are formed in.
        lambda_d: the adapters' λ_d stacked, (K, r).
        lambda_b: the adapters' λ_b stacked, (K, out).
        needs_d: return the gradient of lambda_d (else None).
        needs_b: return the gradient of lambda_b (else None).
    """
    if not (needs_d or needs_b):
        return None, None
    dtype = B_s.dtype
    P = (grad_output.to(h.dtype).T @ h).to(dtype)  # (out, r): dL/dS
    Q = B_s * P  # (out, r)
    grad_d = (lambda_b.detach().to(dtype) @ Q).to(lambda_d.dtype) if needs_d else None  # (K, r)
    grad_b = (lambda_d.detach().to(dtype) @ Q.T).to(lambda_b.dtype) if needs_b else None  # (K, out)
    return grad_d, grad_b


class ActivationSpaceVera(torch.autograd.Function):
    """y = base_output + h S^T, keeping only h (and the small lambdas) for the backward, never x."""

    @staticmethod
    def forward(ctx, base_output, x, h, S, A_s, B_s, lambda_d, lambda_b):
        out_features, r = S.shape
        h_2d = h.reshape(-1, r)  # (N, r)
        if h.dtype == base_output.dtype:
            output = torch.addmm(base_output.reshape(-1, out_features), h_2d, S.to(h.dtype).T)  # (N, out)
        else:  # the adapter term runs in its own dtype (quantized bases: float32) and is cast back
            output = base_output.reshape(-1, out_features) + (h_2d @ S.to(h.dtype).T).to(base_output.dtype)
        ctx.save_for_backward(h, A_s, B_s, lambda_d, lambda_b)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return output.view(base_output.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        h, A_s, B_s, lambda_d, lambda_b = ctx.saved_tensors
        out_features, r = B_s.shape
        G = grad_output.reshape(-1, out_features)  # (N, out)
        grad_x = None
        if ctx.needs_input_grad[1]:
            S = scaled_projection(B_s, lambda_d, lambda_b).to(h.dtype)
            grad_h = G.to(h.dtype) @ S  # (N, r)
            grad_x = (grad_h @ A_s.to(h.dtype)).to(ctx.x_dtype).view(ctx.x_shape)  # (..., in)
        grad_d, grad_b = lambda_grads(
            G, h.reshape(-1, r), B_s, lambda_d, lambda_b, ctx.needs_input_grad[6], ctx.needs_input_grad[7]
        )
        grad_base = grad_output if ctx.needs_input_grad[0] else None
        return grad_base, grad_x, None, None, None, None, grad_d, grad_b


class WeightSpaceVera(torch.autograd.Function):
    """y = x (W + S A_s)^T + b in one matmul; keeps h (for the lambdas), never x or W + ΔW."""

    @staticmethod
    def forward(ctx, x, h, S, weight, bias, A_s, B_s, lambda_d, lambda_b):
        adapted_weight = torch.addmm(weight, S.to(weight.dtype), A_s)  # W + S A_s, (out, in)
        ctx.save_for_backward(h, weight, A_s, B_s, lambda_d, lambda_b)
        return F.linear(x, adapted_weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        h, weight, A_s, B_s, lambda_d, lambda_b = ctx.saved_tensors
        out_features = weight.shape[0]
        G = grad_output.reshape(-1, out_features)  # (N, out)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Rebuilt (2·out·r·in) rather than kept alive between forward and backward.
            S = scaled_projection(B_s, lambda_d, lambda_b).to(weight.dtype)
            adapted_weight = torch.addmm(weight, S, A_s)
            grad_x = (G @ adapted_weight).view(*grad_output.shape[:-1], weight.shape[1])  # (..., in)
        if ctx.needs_input_grad[4]:
            grad_bias = G.sum(0)
        needs_d, needs_b = ctx.needs_input_grad[7], ctx.needs_input_grad[8]
        if (needs_d or needs_b) and h is None:
            raise RuntimeError(
                "WeightSpaceVera got h=None but its lambdas need gradients; pass h = x A_s^T (computed "
                "without grad) whenever the lambdas require grad"
            )
        grad_d, grad_b = lambda_grads(
            G, None if h is None else h.reshape(-1, h.shape[-1]), B_s, lambda_d, lambda_b, needs_d, needs_b
        )
        return grad_x, None, None, None, grad_bias, None, None, grad_d, grad_b


def activation_space_vera(
    base_output: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    S: torch.Tensor,
    A_s: torch.Tensor,
    B_s: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
) -> torch.Tensor:
    """The adapted layer's output in activation space: `base_output + h S^T`.

    Args:
        base_output: the base layer's output, (..., out); its gradient passes through unchanged.
        x: the adapter's input, (..., in): it receives the adapter's input gradient `(G S) A_s`.
        h: `x A_s^T` (..., r) computed without grad (it may be shared with other layers reading x), in the
            dtype the adapter term is computed in; the term is cast to base_output's dtype when it differs.
        S: `scaled_projection(B_s, lambda_d, lambda_b)`, in any dtype (used in h's).
        A_s: (r, in) in h's dtype.
        B_s: (out, r), in the dtype the lambda gradients are computed in (float32 or float64).
        lambda_d: (K, r) stacked λ_d of the adapters.
        lambda_b: (K, out) stacked λ_b of the adapters.
    """
    return ActivationSpaceVera.apply(base_output, x, h, S, A_s, B_s, lambda_d, lambda_b)


def weight_space_vera(
    x: torch.Tensor,
    h: torch.Tensor | None,
    S: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A_s: torch.Tensor,
    B_s: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
) -> torch.Tensor:
    """The adapted layer's output in weight space: `x (W + S A_s)^T + bias`.

    Args:
        x: the layer's input, (..., in), in the weight's dtype.
        h: `x A_s^T` (..., r) computed without grad (the input gradient already includes the adapter through
            W + ΔW); None when the lambdas need no gradient.
        S: `scaled_projection(B_s, lambda_d, lambda_b)`.
        weight: the frozen base weight, (out, in).
        bias: the base bias, (out,), or None; it may be trained.
        A_s: (r, in), in the weight's dtype.
        B_s: (out, r).
        lambda_d: (K, r) stacked λ_d of the adapters.
        lambda_b: (K, out) stacked λ_b of the adapters.
    """
    return WeightSpaceVera.apply(x, h, S, weight, bias, A_s, B_s, lambda_d, lambda_b)


def mixed_batch_vera(
    base_output: torch.Tensor,
    h: torch.Tensor,
    B_s: torch.Tensor,
    lambda_d_rows: torch.Tensor,
    lambda_b_rows: torch.Tensor,
) -> torch.Tensor:
    """The adapted output with one adapter per row of the batch: `base + λ_b,row ⊙ ((λ_d,row ⊙ h) B_s^T)`.

    Every adapter shares A and B, so the batch costs the same two thin matmuls (h and this one) as a single
    adapter, whatever the number of distinct adapters; only the lambda vectors differ per row.

    Args:
        base_output: (batch, ..., out).
        h: x A_s^T, (batch, ..., r).
        B_s: (out, r) in h's dtype.
        lambda_d_rows: (batch, r), each row's λ_d, gathered by the caller (zeros for rows that use no
            adapter), in h's dtype.
        lambda_b_rows: (batch, out), each row's λ_b, likewise.
    """
    # (batch, r) -> (batch, 1, ..., 1, r) so it broadcasts over the middle (e.g. sequence) dims.
    middle = (1,) * (h.dim() - 2)
    lambda_d_rows = lambda_d_rows.view(lambda_d_rows.shape[0], *middle, -1)
    lambda_b_rows = lambda_b_rows.view(lambda_b_rows.shape[0], *middle, -1)
    u = F.linear(h * lambda_d_rows, B_s)  # (batch, ..., out)
    return torch.addcmul(base_output, u.to(base_output.dtype), lambda_b_rows.to(base_output.dtype))
