"""ISTA in plain PyTorch: the release's eager math (backend "reference") and the bit-packed activation mask that
every backend saves. Backend "torch" runs the fused algorithm through library products (``library``).
"""
from __future__ import annotations

import torch

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
