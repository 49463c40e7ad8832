"""MSSA's ground truth: the release's eager math (backend "reference"). Backend "torch" runs the fused algorithm
through PyTorch's own kernels instead (``library``).
"""
from __future__ import annotations

import torch

__all__ = ["mssa_reference"]


def mssa_reference(w: torch.Tensor, scale: float) -> torch.Tensor:
    """The release's eager math: softmax(w w^T * scale) w, autograd through every intermediate."""
    dots = torch.matmul(w, w.transpose(-1, -2)) * scale
    return torch.matmul(dots.softmax(dim=-1), w)
