"""ISTA: one proximal-gradient step of non-negative sparse coding against a dictionary W (d x d).

    out = relu(x + eta * (x W - x W^T W) - eta * lambda) = relu(x + eta * x M - eta * lambda)

with M = W - W^T W formed once per call, so the token work is ONE matrix product (rows x d x d).
With G = dOut * [out > 0] the backward is two token products plus d x d work:

    dx = G + eta * G M^T,     dM = eta * x^T G,     dW = dM - W (dM + dM^T)

The autograd.Function saves x, W, M and the activation mask packed to bits (one byte per eight
outputs); every backend shares it, backends differ in the launchers they register with
``crate_kernels.ops.backend.register_launcher``. The package is laid out as every operator's (see
``crate_kernels.ops``); ``torch_impl`` holds the reference math and the packed mask as well, and this module imports
nothing else of it (the Triton modules register themselves when ``crate_kernels.ops`` imports them).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..backend import (
    accumulate_dtype,
    autocast_dtype,
    autocast_input,
    launcher,
    launcher_backends,
    register_candidates,
    resolve_backend,
)
from ..layer_norm_linear import layer_norm_backward, layer_norm_recompute, layer_norm_stats
from . import library
from .torch_impl import ista_reference, pack_mask, unpack_mask

# PyTorch's own kernels: what backend ``torch`` runs (the first that supports the inputs) and auto's baselines
register_candidates(library.CANDIDATES)

__all__ = ["ista_step", "ista_reference", "ISTAFunction", "pack_mask", "unpack_mask"]

_BACKENDS = ("reference",)


def dictionary_matrix(weight: torch.Tensor) -> torch.Tensor:
    """M = W - W^T W in fp32 (fp64 for fp64 W), also under autocast (which would run W^T W in its 16-bit dtype)."""
    wc = weight.to(accumulate_dtype(weight.dtype))
    with torch.autocast(weight.device.type, enabled=False):
        return wc - wc.t() @ wc


def dictionary_grad(weight: torch.Tensor, grad_m: torch.Tensor) -> torch.Tensor:
    """dW = dM - W (dM + dM^T) for M = W - W^T W, in dM's dtype (fp32), also under autocast."""
    wc = weight.to(grad_m.dtype)
    with torch.autocast(weight.device.type, enabled=False):
        return (grad_m - wc @ (grad_m + grad_m.t())).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library registration: torch.compile sees each launcher as one opaque op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("crate_kernels::ista_forward", mutates_args=())
def ista_forward(
    x: torch.Tensor, m: torch.Tensor, step_size: float, lambd: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, d), M (d, d) -> out (rows, d) in x's dtype, packed mask (rows, ceil(d/8)) uint8."""
    return launcher("ista_forward", backend)(x, m, step_size, lambd)


@ista_forward.register_fake
def _(x, m, step_size, lambd, backend):
    return torch.empty_like(x), x.new_empty((x.shape[0], (x.shape[1] + 7) // 8), dtype=torch.uint8)


@torch.library.custom_op("crate_kernels::ista_backward", mutates_args=())
def ista_backward(
    dout: torch.Tensor, x: torch.Tensor, m: torch.Tensor, packed_mask: torch.Tensor,
    step_size: float, need_dx: bool, need_dm: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = G + eta G M^T (x's dtype) and dM = eta x^T G (M's dtype) with G = dOut * mask.

    A gradient that is not needed comes back as an empty tensor."""
    dx, dm = launcher("ista_backward", backend)(dout, x, m, packed_mask, step_size, need_dx, need_dm)
    return (x.new_empty(0) if dx is None else dx), (m.new_empty(0) if dm is None else dm)


@ista_backward.register_fake
def _(dout, x, m, packed_mask, step_size, need_dx, need_dm, backend):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(m) if need_dm else m.new_empty(0))


# FLOPs for torch.utils.flop_counter.FlopCounterMode (2 per multiply-add): x M forward; G M^T and x^T G backward,
# each only where asked for. M = W - W^T W and dW run as ordinary torch products, which the counter sees itself.
@register_flop_formula(torch.ops.crate_kernels.ista_forward)
def _ista_forward_flops(x_shape, m_shape, *args, out_shape=None, **kwargs) -> int:
    rows, d = x_shape
    return 2 * rows * d * m_shape[1]


@register_flop_formula(torch.ops.crate_kernels.ista_backward)
def _ista_backward_flops(dout_shape, x_shape, m_shape, mask_shape, step_size, need_dx, need_dm, *args,
                         out_shape=None, **kwargs) -> int:
    return (int(need_dx) + int(need_dm)) * _ista_forward_flops(x_shape, m_shape)


class ISTAFunction(torch.autograd.Function):
    """One ISTA step on 2-D x, optionally on LN(x); saves x, W, M and the bit-packed activation mask.

    With a LayerNorm (``norm_eps`` given) it saves LN's input and per-row statistics instead of LN's
    output and recomputes LN(x) in the backward pass; the product runs in ``compute_dtype``.
    """

    @staticmethod
    def forward(ctx, x, weight, step_size, lambd, backend, norm_weight=None, norm_bias=None, norm_eps=None,
                compute_dtype=None):
        m = dictionary_matrix(weight)
        stats = ()
        xn = x
        if norm_eps is not None:
            xn, mean, rstd = layer_norm_stats(x, norm_weight, norm_bias, norm_eps)
            xn, stats = xn.to(compute_dtype), (mean, rstd)
        out, packed_mask = ista_forward(xn, m, step_size, lambd, backend)
        ctx.save_for_backward(x, weight, m, packed_mask, norm_weight, norm_bias, *stats)
        ctx.step_size, ctx.backend, ctx.compute_dtype = step_size, backend, compute_dtype
        ctx.has_norm = norm_eps is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, m, packed_mask, norm_weight, norm_bias, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_x = needs[0] or (ctx.has_norm and (needs[5] or needs[6]))
        need_dw = needs[1]
        xn = x
        if ctx.has_norm:
            xn = layer_norm_recompute(x, norm_weight, norm_bias, *stats).to(ctx.compute_dtype)
        dxn, dm = ista_backward(dout, xn, m, packed_mask, ctx.step_size, need_x, need_dw, ctx.backend)
        dw = dictionary_grad(weight, dm) if need_dw else None
        if not need_x:
            return None, dw, None, None, None, None, None, None, None
        if not ctx.has_norm:
            return dxn, dw, None, None, None, None, None, None, None
        dx, dgamma, dbeta = layer_norm_backward(
            dxn, x, norm_weight, norm_bias, *stats,
            (needs[0], needs[5] and norm_weight is not None, needs[6] and norm_bias is not None),
        )
        return dx, dw, None, None, None, dgamma, dbeta, None, None


def _check_inputs(x, weight, step_size, lambd):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"weight must be a square (d, d) dictionary, got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"x must have shape (..., d) with d = {weight.shape[0]} (the dictionary size), got shape {tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if not lambd >= 0:
        raise ValueError(f"lambd must be non-negative, got {lambd}")


def ista_step(
    x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.5, backend: str | None = None,
    norm: torch.nn.LayerNorm | None = None,
) -> torch.Tensor:
    """relu(z + step_size * (z W - z W^T W) - step_size * lambd) with z = norm(x) (or x) for x (..., d), W (d, d).

    With ``norm`` the fused backends keep x and LN's per-row statistics rather than norm(x) for backward.
    """
    _check_inputs(x, weight, step_size, lambd)
    name = resolve_backend(backend, x, _BACKENDS + launcher_backends("ista_forward"))
    if name == "reference":
        return ista_reference(x if norm is None else norm(x), weight, step_size, lambd)
    if norm is None:
        x = autocast_input(x)  # under autocast the product runs in its dtype, as the release's F.linear calls do
        rows = x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()
        out = ISTAFunction.apply(rows, weight, float(step_size), float(lambd), name)
    else:
        rows = x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()
        out = ISTAFunction.apply(rows, weight, float(step_size), float(lambd), name,
                                 norm.weight, norm.bias, norm.eps, autocast_dtype(x))
    return out.view(x.shape)
