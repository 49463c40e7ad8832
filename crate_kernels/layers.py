"""CRATE layers with the module tree (and so the state_dict keys) of the official release.

Encoder layer:  z_half = z + MSSA(LN1(z));   z_next = ISTA(LN2(z_half))
Decoder layer:  y = LN1(z) W_dec^T;          z_next = y - MSSA'(LN2(y))

PreNorm hands its LayerNorm to the layer it wraps. When autograd records and the backend is not
`reference`, the layer fuses the norm into its first product (ops.layer_norm_linear, ista_step(norm=))
so backward keeps LN's input and per-row statistics instead of LN's output. Without autograd (eval,
analysis) every submodule is called as in the release, so forward hooks on `qkv` and `norm` fire.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import ista_step, mssa_attention
from .ops.backend import _check_name, get_backend
from .ops.layer_norm_linear import layer_norm_linear


class _BackendMixin:
    """Holds the operator backend of one layer (``None``: the process-wide default)."""

    backend: str | None = None

    def set_backend(self, backend: str | None) -> None:
        self.backend = None if backend is None else _check_name(backend)

    def _fuse_norm(self, norm: nn.LayerNorm | None) -> bool:
        """Whether to fold ``norm`` into this layer's first product (see the module docstring)."""
        backend = get_backend() if self.backend is None else self.backend
        return norm is not None and torch.is_grad_enabled() and backend != "reference"


class CRATELayers:
    """A model made of CRATE layers: ``set_backend`` chooses the operator backend of all of them at once."""

    backend: str | None = None

    def set_backend(self, backend: str | None):
        """Operator backend for every layer (``None``: the process-wide default, see crate_kernels.ops)."""
        self.backend = None if backend is None else _check_name(backend)
        for m in self.modules():
            if isinstance(m, _BackendMixin):
                m.set_backend(backend)
        return self


class MSSA(_BackendMixin, nn.Module):
    """Multi-head subspace self-attention: w = x U (shared q = k = v), softmax(w w^T / sqrt(p)) w, then to_out."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> w (B, H, N, p), the shared query/key/value."""
        b, n, _ = x.shape
        return self.qkv(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        if self._fuse_norm(norm):
            w = layer_norm_linear(x, norm, self.qkv.weight).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        else:
            w = self.project(x if norm is None else norm(x))
        out = mssa_attention(w, self.scale, backend=self.backend)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class ISTA(_BackendMixin, nn.Module):
    """One ISTA step relu(x + eta (x D - x D^T D) - eta lambda) with dictionary D = ``weight`` (d x d)."""

    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)
        self.step_size, self.lambd = step_size, lambd

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        if norm is not None and not self._fuse_norm(norm):
            x, norm = norm(x), None
        return ista_step(x, self.weight, self.step_size, self.lambd, backend=self.backend, norm=norm)


class LinearNoBias(_BackendMixin, nn.Module):
    """The decoder's bias-free d x d map x W^T (kept out of nn.Linear so the xavier init skips it)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        if self._fuse_norm(norm):
            return layer_norm_linear(x, norm, self.weight)
        return nn.functional.linear(x if norm is None else norm(x), self.weight)


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, norm=self.norm)


class EncoderBlock(nn.Module):
    """Compression (MSSA, residual) then sparsification (ISTA, no residual)."""

    def __init__(self, dim: int, heads: int, dim_head: int, step_size: float, lambd: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, MSSA(dim, heads, dim_head)), PreNorm(dim, ISTA(dim, step_size, lambd))])]
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        attn, ista = self.layers[0]
        z = z + attn(z)
        return ista(z)


class DecoderBlock(nn.Module):
    """Undo sparsification (a linear map), then undo compression (y - MSSA'(LN(y)))."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, LinearNoBias(dim)), PreNorm(dim, MSSA(dim, heads, dim_head))])]
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        linear, attn = self.layers[0]
        y = linear(z)
        return y - attn(y)
