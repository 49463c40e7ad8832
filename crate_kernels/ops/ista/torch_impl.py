"""ISTA in plain PyTorch: the release's eager math (backend "reference"), the bit-packed activation mask, and the
fused algorithm's launchers (backend "torch", the CPU path), which register themselves with the backend registry.
"""
from __future__ import annotations

import torch

from ..backend import register_launcher

__all__ = ["ista_reference", "pack_mask", "unpack_mask"]


def ista_reference(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    """The release's eager math: three products, autograd through every intermediate."""
    x1 = torch.nn.functional.linear(x, weight)
    grad_1 = torch.nn.functional.linear(x1, weight.t())
    grad_2 = torch.nn.functional.linear(x, weight.t())
    grad_update = step_size * (grad_2 - grad_1) - step_size * lambd
    return torch.nn.functional.relu(x + grad_update)


_BIT_WEIGHTS = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[device]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, d) bool -> (rows, ceil(d / 8)) uint8; bit j of byte k holds column 8k + j."""
    rows, d = mask.shape
    if d % 8:
        mask = torch.nn.functional.pad(mask, (0, 8 - d % 8))
    bits = mask.view(rows, mask.shape[1] // 8, 8).to(torch.uint8) * _bit_weights(mask.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: (rows, ceil(d / 8)) uint8 -> (rows, d) bool."""
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0
    return bits.flatten(1)[:, :d]


def _forward_torch(x, m, step_size, lambd):
    pre = torch.addmm(x, x, m.to(x.dtype), alpha=step_size).sub_(step_size * lambd)
    mask = pre > 0
    return pre.clamp_(min=0), pack_mask(mask)


def _backward_torch(dout, x, m, packed_mask, step_size, need_dx, need_dm):
    g = dout * unpack_mask(packed_mask, dout.shape[1])
    dx = torch.addmm(g, g, m.to(g.dtype).t(), alpha=step_size) if need_dx else None
    dm = torch.mm(x.t().to(m.dtype), g.to(m.dtype)).mul_(step_size) if need_dm else None
    return dx, dm


register_launcher("ista_forward", "torch", _forward_torch)
register_launcher("ista_backward", "torch", _backward_torch)
