"""CRATE-MAE, a drop-in for the official release (same forward, same state_dict keys, same numbers): its layers,
with the release's module tree (and so its state_dict keys), and the masked autoencoder built from them.

Encoder layer:  z_half = z + MSSA(LN1(z));   z_next = ISTA(LN2(z_half))
Decoder layer:  y = LN1(z) W_dec^T;          z_next = y - MSSA'(LN2(y))

PreNorm hands its LayerNorm to the layer it wraps. When autograd records and the backend is not
`reference`, the layer fuses the norm into its first product (ops.layer_norm_linear, ista_step(norm=))
so backward keeps LN's input and per-row statistics instead of LN's output. Without autograd (eval,
analysis) every submodule is called as in the release, so forward hooks on `qkv` and `norm` fire.

forward(imgs, mask_ratio=0.75, noise=None) -> (loss, pred, mask):
  patch embed -> random masking (mask tokens ENTER the encoder, raster order restored) -> [CLS]
  -> + fixed sin-cos table -> L encoder layers -> norm -> L decoder layers -> decoder_norm
  -> decoder_pred, [CLS] dropped -> pred (B, N, patch^2 * 3); loss = mean squared error on masked patches.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import ista_step, mssa_attention
from ..ops.backend import check_backend_name, get_backend
from ..ops.layer_norm_linear import layer_norm_linear
from .base import MaskedImageModel
from .hub import HubMixin
from .pos_embed import resize_table

__all__ = ["CRATEMAE", "crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large", "CONFIGS"]


class _BackendMixin:
    """Holds the operator backend of one layer (``None``: the process-wide default)."""

    backend: str | None = None

    def set_backend(self, backend: str | None) -> None:
        self.backend = None if backend is None else check_backend_name(backend)

    def _fuse_norm(self, norm: nn.LayerNorm | None) -> bool:
        """Whether to fold ``norm`` into this layer's first product (see the module docstring)."""
        backend = get_backend() if self.backend is None else self.backend
        return norm is not None and torch.is_grad_enabled() and backend != "reference"


class CRATELayers:
    """A model made of CRATE layers: ``set_backend`` chooses the operator backend of all of them at once."""

    backend: str | None = None

    def set_backend(self, backend: str | None):
        """Operator backend for every layer (``None``: the process-wide default, see crate_kernels.ops)."""
        self.backend = None if backend is None else check_backend_name(backend)
        for m in self.modules():
            if isinstance(m, _BackendMixin):
                m.set_backend(backend)
        return self


class MSSA(_BackendMixin, nn.Module):
    """Multi-head subspace self-attention: w = x U (shared q = k = v), softmax(w w^T / sqrt(p)) w, then to_out."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, project_out: bool = True):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.qkv = nn.Linear(dim, inner, bias=False)
        # supervised CRATE's release has no output map for one head as wide as the model (heads=1, dim_head=dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

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


class CRATEMAE(CRATELayers, MaskedImageModel, nn.Module, HubMixin):
    """CRATE masked autoencoder (white-box encoder and decoder, mask tokens in the encoder)."""

    # The keyword names are the public constructor of FAIR's MAE, spelled out as in ViT-MAE's (models.vit_mae): the two
    # signatures look alike on purpose (MAE's keyword names carry over); the defaults and a few extras differ.
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        norm_layer=None,
        norm_pix_loss: bool = False,
        step_size: float = 0.1,
        lambd: float = 0.5,
        backend: str | None = None,
    ):
        super().__init__()
        del mlp_ratio, norm_layer  # accepted for signature compatibility with MAE; CRATE has no MLP
        decoder_embed_dim = embed_dim if decoder_embed_dim is None else decoder_embed_dim
        if decoder_embed_dim != embed_dim:
            raise ValueError(
                f"decoder_embed_dim must equal embed_dim in CRATE-MAE (got {decoder_embed_dim} and {embed_dim})"
            )
        decoder_depth = depth if decoder_depth is None else decoder_depth
        decoder_num_heads = num_heads if decoder_num_heads is None else decoder_num_heads
        for name, heads in (("num_heads", num_heads), ("decoder_num_heads", decoder_num_heads)):
            if embed_dim % heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by {name} ({heads})")

        n = self._embedding(img_size, patch_size, in_chans, embed_dim, norm_pix_loss)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)  # unused, as released
        self.blocks = nn.ModuleList(
            [EncoderBlock(embed_dim, num_heads, embed_dim // num_heads, step_size, lambd) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, embed_dim)  # unused, as released
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(embed_dim, decoder_num_heads, embed_dim // decoder_num_heads) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        self.grad_checkpointing = False
        self._init_weights()
        self.set_backend(backend)

    def _table(self, grid: tuple[int, int]) -> torch.Tensor:
        return resize_table(self.decoder_pos_embed, self.patch_embed.grid_size, grid)

    # ------------------------------------------------------------------ model
    def random_masking(self, batch: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None, device):
        """MAE's per-sample shuffle; returns mask (B, N) with 1 = masked, in raster order."""
        _, ids_restore, len_keep = self.masking_order(batch, num_patches, mask_ratio, noise, device)
        return (ids_restore >= len_keep).to(torch.float32)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """-> latent (B, 1 + N, d) after ``norm``, mask (B, N)."""
        grid = self._check_imgs(imgs)
        x = self.patch_embed(imgs)
        b, n, d = x.shape
        mask = self.random_masking(b, n, mask_ratio, noise, x.device)
        x = torch.where(mask.unsqueeze(-1).bool(), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self._table(grid).to(x.dtype)
        return self.norm(self._run_blocks(self.blocks, x)), mask

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + N, d) -> pred (B, N, p*p*C)."""
        x = self._run_blocks(self.decoder_blocks, latent)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder output (B, 1 + N, d) after ``norm``, any size divisible by the patch; [:, 0] is [CLS]."""
        grid = self._check_imgs(imgs)
        x = self.patch_embed(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self._table(grid).to(x.dtype)
        return self.norm(self._run_blocks(self.blocks, x))


CONFIGS = {
    "crate_mae_tiny": dict(embed_dim=384, depth=12, num_heads=6),
    "crate_mae_small": dict(embed_dim=576, depth=12, num_heads=12),
    "crate_mae_base": dict(embed_dim=768, depth=12, num_heads=12),
    "crate_mae_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def _factory(name: str):
    def build(**kwargs) -> CRATEMAE:
        return CRATEMAE(**{**CONFIGS[name], **kwargs})

    build.__name__ = name
    cfg = CONFIGS[name]
    build.__doc__ = (f"CRATE-MAE with d={cfg['embed_dim']}, {cfg['num_heads']} heads, "
                     f"{cfg['depth']}+{cfg['depth']} layers.")
    return build


crate_mae_tiny = _factory("crate_mae_tiny")
crate_mae_small = _factory("crate_mae_small")
crate_mae_base = _factory("crate_mae_base")
crate_mae_large = _factory("crate_mae_large")
