"""MSSA in plain PyTorch: the release's eager math (backend "reference") and the fused algorithm's launchers
(backend "torch", the CPU path), which register themselves with the backend registry.

On CPU the launchers call PyTorch's own tiled flash-attention kernels with q = k = v = w (which never hold an
N x N matrix; the three input gradients are summed into dw). Elsewhere, or where that op is missing, the matmul
form recomputes P from lse.
"""
from __future__ import annotations

import torch

from ..backend import accumulate_dtype, register_launcher

__all__ = ["mssa_reference"]


def mssa_reference(w: torch.Tensor, scale: float) -> torch.Tensor:
    """The release's eager math: softmax(w w^T * scale) w, autograd through every intermediate."""
    dots = torch.matmul(w, w.transpose(-1, -2)) * scale
    return torch.matmul(dots.softmax(dim=-1), w)


def _forward_matmul(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    wc = w.to(accumulate_dtype(w.dtype))
    scores = torch.matmul(wc, wc.transpose(-1, -2)).mul_(scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    out = torch.matmul(probs, wc)
    return out.to(w.dtype), lse


def _backward_matmul(dout, w, out, lse, scale):
    ct = accumulate_dtype(w.dtype)
    wc, doc = w.to(ct), dout.to(ct)
    probs = torch.matmul(wc, wc.transpose(-1, -2)).mul_(scale).sub_(lse.unsqueeze(-1)).exp_()
    delta = (doc * out.to(ct)).sum(dim=-1, keepdim=True)
    dscores = torch.matmul(doc, wc.transpose(-1, -2)).sub_(delta).mul_(probs).mul_(scale)
    dw = torch.matmul(dscores + dscores.transpose(-1, -2), wc)
    dw.add_(torch.matmul(probs.transpose(-1, -2), doc))
    return dw.to(w.dtype)


_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _forward_torch(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _CPU_FLASH and w.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(w, w, w, 0.0, False, scale=scale)
        return out, lse.to(accumulate_dtype(w.dtype))  # lse comes (B, N, H)-strided; the op makes it contiguous
    return _forward_matmul(w, scale)


def _backward_torch(dout, w, out, lse, scale):
    if _CPU_FLASH and w.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, w, w, w, out, lse, 0.0, False, scale=scale
        )
        return dq.add_(dk).add_(dv)
    return _backward_matmul(dout, w, out, lse, scale)


register_launcher("mssa_forward", "torch", _forward_torch)
register_launcher("mssa_backward", "torch", _backward_torch)
