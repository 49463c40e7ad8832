"""LayerNorm followed by a linear map, saving the LayerNorm's input instead of its output.

    y = LN(x) = (x - mean) * rstd * gamma + beta,     out = y A^T + b

Autograd through nn.LayerNorm and nn.Linear keeps both x (for LayerNorm) and y (for Linear).
This Function keeps x, mean and rstd (one float per row) and recomputes y in the backward pass,
one elementwise pass instead of a (rows, d) activation held per layer:

    dA = dOut^T y,   db = sum_rows dOut,   dy = dOut A,   (dx, dgamma, dbeta) = LN backward of dy

Under autocast the product runs in the autocast dtype on y cast to it, as nn.Linear would.
Also home of ``layer_norm_stats``/``layer_norm_backward``, the same recompute for ISTA's input.
"""
from __future__ import annotations

import torch

from .backend import autocast_dtype

__all__ = ["layer_norm_linear", "LayerNormLinearFunction", "layer_norm_stats", "layer_norm_backward"]


def _norm_dtype(x2d, norm_weight) -> torch.dtype:
    """LayerNorm runs in its parameters' dtype (fp32 under autocast, as autocast runs layer_norm)."""
    return x2d.dtype if norm_weight is None else torch.promote_types(x2d.dtype, norm_weight.dtype)


def layer_norm_stats(x2d, norm_weight, norm_bias, eps):
    """(rows, d) -> LN(x), mean and rstd (rows, 1), via PyTorch's fused kernel."""
    return torch.native_layer_norm(x2d.to(_norm_dtype(x2d, norm_weight)), (x2d.shape[-1],), norm_weight, norm_bias, eps)


def layer_norm_recompute(x2d, norm_weight, norm_bias, mean, rstd):
    """LN(x) from the saved statistics (one elementwise pass)."""
    y = (x2d.to(_norm_dtype(x2d, norm_weight)) - mean) * rstd
    if norm_weight is not None:
        y = y * norm_weight
    if norm_bias is not None:
        y = y + norm_bias
    return y


def layer_norm_backward(dy, x2d, norm_weight, norm_bias, mean, rstd, needs):
    """(dx, dgamma, dbeta) of LN at x2d for the gradient dy of its output; entries not in ``needs`` are None."""
    dtype = _norm_dtype(x2d, norm_weight)
    dx, dgamma, dbeta = torch.ops.aten.native_layer_norm_backward(
        dy.to(dtype), x2d.to(dtype), [x2d.shape[-1]], mean, rstd, norm_weight, norm_bias, list(needs)
    )
    return (None if dx is None else dx.to(x2d.dtype)), dgamma, dbeta


class LayerNormLinearFunction(torch.autograd.Function):
    """out = LN(x) A^T + b for x (rows, d); saves x, mean, rstd, gamma, beta and A."""

    @staticmethod
    def forward(ctx, x2d, norm_weight, norm_bias, eps, weight, bias, compute_dtype):
        y, mean, rstd = layer_norm_stats(x2d, norm_weight, norm_bias, eps)
        cb = None if bias is None else bias.to(compute_dtype)
        out = torch.nn.functional.linear(y.to(compute_dtype), weight.to(compute_dtype), cb)
        ctx.save_for_backward(x2d, norm_weight, norm_bias, mean, rstd, weight)
        ctx.compute_dtype, ctx.has_bias = compute_dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x2d, norm_weight, norm_bias, mean, rstd, weight = ctx.saved_tensors
        need_x, need_g, need_b, _, need_a, need_bias, _ = ctx.needs_input_grad
        cdt = ctx.compute_dtype
        dout = dout.to(cdt)
        y = layer_norm_recompute(x2d, norm_weight, norm_bias, mean, rstd).to(cdt)
        d_weight = (dout.t() @ y).to(weight.dtype) if need_a else None
        d_bias = dout.sum(0).to(weight.dtype) if (need_bias and ctx.has_bias) else None
        dx = dgamma = dbeta = None
        if need_x or need_g or need_b:
            dy = dout @ weight.to(cdt)
            dx, dgamma, dbeta = layer_norm_backward(
                dy, x2d, norm_weight, norm_bias, mean, rstd,
                (need_x, need_g and norm_weight is not None, need_b and norm_bias is not None),
            )
        return dx, dgamma, dbeta, None, d_weight, d_bias, None


def layer_norm_linear(x, norm: torch.nn.LayerNorm, weight, bias=None):
    """linear(norm(x), weight, bias) for x (..., d), keeping only x and per-row statistics for backward."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have shape (..., {weight.shape[1]}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    x2d = x.reshape(-1, x.shape[-1])
    out = LayerNormLinearFunction.apply(x2d, norm.weight, norm.bias, norm.eps, weight, bias, autocast_dtype(x))
    return out.view(*x.shape[:-1], weight.shape[0])
