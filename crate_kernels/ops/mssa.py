"""MSSA: attention whose query, key and value are one shared projection w.

For every (batch, head) with w of shape (N, p):

    S = scale * w w^T            (N, N)
    P = softmax_rows(S)          lse = logsumexp_rows(S)
    out = P w                    (N, p)

Backward, in the shared-w form (q = k = v = w, so the three gradients are one):

    dP = dO w^T,  delta = rowsum(dO * out),  dS = P * (dP - delta)
    dw = scale * (dS + dS^T) w + P^T dO

The autograd.Function saves only w, out and one log-sum-exp per row; P is recomputed in the
backward pass. Every backend shares that Function; backends differ in the launchers below.
"""
from __future__ import annotations

import torch

from .backend import resolve_backend

__all__ = ["mssa_attention", "mssa_reference", "MSSAFunction"]

_BACKENDS = ("reference", "torch")


def mssa_reference(w: torch.Tensor, scale: float) -> torch.Tensor:
    """The release's eager math: softmax(w w^T * scale) w, autograd through every intermediate."""
    dots = torch.matmul(w, w.transpose(-1, -2)) * scale
    return torch.matmul(dots.softmax(dim=-1), w)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------------
# torch launchers: the fused algorithm in plain PyTorch (the CPU path)
# ----------------------------------------------------------------------------------------------
def _forward_torch(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    wc = w.to(_compute_dtype(w.dtype))
    scores = torch.matmul(wc, wc.transpose(-1, -2)).mul_(scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    out = torch.matmul(probs, wc)
    return out.to(w.dtype), lse


def _backward_torch(dout, w, out, lse, scale):
    ct = _compute_dtype(w.dtype)
    wc, doc = w.to(ct), dout.to(ct)
    probs = torch.matmul(wc, wc.transpose(-1, -2)).mul_(scale).sub_(lse.unsqueeze(-1)).exp_()
    delta = (doc * out.to(ct)).sum(dim=-1, keepdim=True)
    dscores = torch.matmul(doc, wc.transpose(-1, -2)).sub_(delta).mul_(probs).mul_(scale)
    dw = torch.matmul(dscores + dscores.transpose(-1, -2), wc)
    dw.add_(torch.matmul(probs.transpose(-1, -2), doc))
    return dw.to(w.dtype)


_FORWARD = {"torch": _forward_torch}
_BACKWARD = {"torch": _backward_torch}


# ----------------------------------------------------------------------------------------------
# torch.library registration: torch.compile sees each launcher as one opaque op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("crate_kernels::mssa_forward", mutates_args=())
def mssa_forward(w: torch.Tensor, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w (B, H, N, p) -> out (B, H, N, p) in w's dtype, lse (B, H, N) in fp32 (fp64 for fp64 w)."""
    return _FORWARD[backend](w, scale)


@mssa_forward.register_fake
def _(w, scale, backend):
    return torch.empty_like(w), w.new_empty(w.shape[:-1], dtype=_compute_dtype(w.dtype))


@torch.library.custom_op("crate_kernels::mssa_backward", mutates_args=())
def mssa_backward(
    dout: torch.Tensor, w: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    """Gradient of out = softmax(scale w w^T) w with respect to w, recomputing P from lse."""
    return _BACKWARD[backend](dout, w, out, lse, scale)


@mssa_backward.register_fake
def _(dout, w, out, lse, scale, backend):
    return torch.empty_like(w)


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
        dw = mssa_backward(dout.contiguous(), w, out, lse, ctx.scale, ctx.backend)
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
    name = resolve_backend(backend, w, _BACKENDS + tuple(_FORWARD))
    if name == "reference":
        return mssa_reference(w, scale)
    return MSSAFunction.apply(w.contiguous(), scale, name)
