"""MSSA: attention whose query, key and value are one shared projection w.

For every (batch, head) with w of shape (N, p):

    S = scale * w w^T            (N, N)
    P = softmax_rows(S)          lse = logsumexp_rows(S)
    out = P w                    (N, p)

Backward, in the shared-w form (q = k = v = w, so the three gradients are one):

    dP = dO w^T,  delta = rowsum(dO * out),  dS = P * (dP - delta)
    dw = scale * (dS + dS^T) w + P^T dO

The autograd.Function saves only w, out and one log-sum-exp per row; P is recomputed in the
backward pass. Every backend shares that Function; backends differ in the launchers they register with the
backend registry (crate_kernels.ops.backend.register_launcher). The modules, as for every operator
(``crate_kernels.ops``): ``torch_impl`` (reference math), ``library`` (PyTorch's kernels: backend "torch" and
auto's baselines), ``triton_common`` (launch checks, tiles, compile-time parameters, the shared ``@triton.jit``
steps), ``triton_v1`` (the "v1" variants, the "triton" and "cuda" backends) and ``triton_variants``; this module
imports ``torch_impl`` and ``library``, and ``crate_kernels.ops`` imports the Triton modules where triton is
installed.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..backend import (
    accumulate_dtype,
    autocast_input,
    launcher,
    launcher_backends,
    register_candidates,
    resolve_backend,
)
from . import library
from .torch_impl import mssa_reference

__all__ = ["mssa_attention", "mssa_reference", "MSSAFunction"]

_BACKENDS = ("reference",)

# PyTorch's own kernels: what backend ``torch`` runs (the first that supports the inputs) and auto's baselines
register_candidates(library.CANDIDATES)


# ----------------------------------------------------------------------------------------------
# torch.library registration: torch.compile sees each launcher as one opaque op
# ----------------------------------------------------------------------------------------------
def _layout_of(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with w's strides (what the fake kernels promise torch.compile); a copy only where they differ."""
    return t if t.stride() == w.stride() else torch.empty_like(w).copy_(t)


@torch.library.custom_op("crate_kernels::mssa_forward", mutates_args=())
def mssa_forward(w: torch.Tensor, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w (B, H, N, p) -> out in w's dtype and layout, lse (B, H, N) contiguous fp32 (fp64 for fp64 w)."""
    out, lse = launcher("mssa_forward", backend)(w, scale)
    return _layout_of(w, out), lse.contiguous()


@mssa_forward.register_fake
def _(w, scale, backend):
    return torch.empty_like(w), w.new_empty(w.shape[:-1], dtype=accumulate_dtype(w.dtype))


@torch.library.custom_op("crate_kernels::mssa_backward", mutates_args=())
def mssa_backward(
    dout: torch.Tensor, w: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    """Gradient of out = softmax(scale w w^T) w with respect to w (in w's layout), recomputing P from lse."""
    return _layout_of(w, launcher("mssa_backward", backend)(dout, w, out, lse, scale))


@mssa_backward.register_fake
def _(dout, w, out, lse, scale, backend):
    return torch.empty_like(w)


# FLOPs for torch.utils.flop_counter.FlopCounterMode, counted as it counts the reference's products (2 per
# multiply-add): S = w w^T and P w forward; dP, P^T dO and the two products of dS with w backward. Work that
# a backend repeats (recomputing S) is not model work and is not counted, so every backend reports the same.
@register_flop_formula(torch.ops.crate_kernels.mssa_forward)
def _mssa_forward_flops(w_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, n, p = w_shape
    return 4 * torch.Size(batch).numel() * n * n * p


@register_flop_formula(torch.ops.crate_kernels.mssa_backward)
def _mssa_backward_flops(dout_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _mssa_forward_flops(w_shape)


class MSSAFunction(torch.autograd.Function):
    """Shared-projection attention; saves w, out and lse (no N x N tensor) for every backend."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        out, lse = mssa_forward(w, scale, backend)
        ctx.save_for_backward(w, out, lse)
        ctx.scale, ctx.backend = scale, backend
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        w, out, lse = ctx.saved_tensors
        dw = mssa_backward(dout, w, out, lse, ctx.scale, ctx.backend)
        return dw, None, None


def _check_inputs(w: torch.Tensor, scale) -> float:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 4:
        raise ValueError(f"w must have shape (B, H, N, p) (4 dimensions), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    if w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"w must have N >= 1 tokens and head dim p >= 1, got shape {tuple(w.shape)}")
    scale = w.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    return scale


def mssa_attention(w: torch.Tensor, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(w w^T * scale) w per (batch, head); w is (B, H, N, p), scale defaults to p ** -0.5."""
    scale = _check_inputs(w, scale)
    name = resolve_backend(backend, w, _BACKENDS + launcher_backends("mssa_forward"))
    if name == "reference":
        return mssa_reference(w, scale)
    w = autocast_input(w)
    if name in ("torch", "auto") and w.stride(-1) != 1:
        w = w.contiguous()  # PyTorch's kernels want unit stride in p; the Triton and CUDA kernels read strides
    return MSSAFunction.apply(w, scale, name)
