"""Fixed 2-D sin-cos position tables (MAE convention) and their resizing."""
from __future__ import annotations

import numpy as np
import torch


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(pos * omega_i), cos(pos * omega_i)], omega_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_table(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """(1, [1 +] grid_h * grid_w, dim) table; first dim/2 channels encode the column, last dim/2 the row.

    The [CLS] row (first, when ``cls_token``) is zeros.
    """
    if dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos table, got {dim}")
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def resize_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically interpolate the patch rows of a (1, 1 + H*W, d) table to a new grid; [CLS] row kept."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    cls_row, patches = table[:, :1], table[:, 1:]
    d = table.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(table.dtype)
    return torch.cat([cls_row, patches], dim=1)
