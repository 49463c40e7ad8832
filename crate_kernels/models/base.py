"""What the models share: the patch embedding, gradient checkpointing, and the masked-autoencoder base
(image checks, (un)patchify, MAE's random masking order, the masked-patch loss, MAE's initialisation).

CRATE-MAE (``models.crate``) and ViT-MAE (``models.vit_mae``) derive from ``MaskedImageModel``; the classifiers
(``models.classifier``) from ``GradCheckpointing``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .pos_embed import sincos_2d_table

__all__ = ["PatchEmbed", "GradCheckpointing", "MaskedImageModel", "patches"]


def patches(imgs: torch.Tensor, patch_height: int, patch_width: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, ph * pw * C): non-overlapping patches in raster order, pixels (row, column, channel)
    inside a patch: MAE's patchify, and supervised CRATE's patch rearrangement in the release."""
    b, c, h, w = imgs.shape
    rows, cols = h // patch_height, w // patch_width
    x = imgs.reshape(b, c, rows, patch_height, cols, patch_width).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, rows * cols, patch_height * patch_width * c)


class PatchEmbed(nn.Module):
    """Conv2d(in_chans, d, patch, stride patch) -> (B, N, d) tokens in raster order."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.proj(imgs).flatten(2).transpose(1, 2)


class GradCheckpointing:
    """Blocks run one after the other, each optionally recomputed in backward."""

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each layer in backward instead of keeping its activations (``torch.utils.checkpoint``,
        non-reentrant): less memory, one more forward per layer."""
        self.grad_checkpointing = enable
        return self

    def _run_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        return x


class MaskedImageModel(GradCheckpointing):
    """What the masked autoencoders of this package share: image checks, (un)patchify, the masked-patch loss,
    gradient checkpointing.

    Needs ``self.patch_embed`` (a ``PatchEmbed``), ``self.in_chans`` and ``self.norm_pix_loss``.
    """

    def _embedding(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, norm_pix_loss: bool) -> int:
        """Set ``in_chans``, ``norm_pix_loss``, ``patch_embed`` and ``cls_token`` (1, 1, embed_dim); -> the number of
        patches N of an img_size image."""
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        self.in_chans, self.norm_pix_loss = in_chans, norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        return self.patch_embed.num_patches

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def _check_imgs(self, imgs: torch.Tensor) -> tuple[int, int]:
        if not isinstance(imgs, torch.Tensor) or imgs.dim() != 4:
            shape = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
            raise ValueError(f"imgs must be a (B, C, H, W) tensor, got {shape}")
        b, c, h, w = imgs.shape
        p = self.patch_size
        if c != self.in_chans:
            raise ValueError(f"imgs must have {self.in_chans} channels, got {c} (shape {tuple(imgs.shape)})")
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"imgs height and width must be positive multiples of the patch size {p}, got {h}x{w}")
        return h // p, w // p

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), per-patch layout (p, q, c)."""
        self._check_imgs(imgs)
        return patches(imgs, self.patch_size, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); ``grid`` (rows, cols) defaults to a square grid."""
        p, c = self.patch_size, self.in_chans
        if grid is None:
            side = int(round(x.shape[1] ** 0.5))
            if side * side != x.shape[1]:
                raise ValueError(f"unpatchify needs grid=(rows, cols) for a non-square count of {x.shape[1]} patches")
            grid = (side, side)
        gh, gw = grid
        if x.dim() != 3 or x.shape[1] != gh * gw or x.shape[2] != p * p * c:
            raise ValueError(f"x must have shape (B, {gh * gw}, {p * p * c}), got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def masking_order(self, batch: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None, device):
        """MAE's per-sample shuffle: ids_shuffle (B, N) (kept patches first), its inverse ids_restore (B, N) and the
        number of kept patches. ``noise`` (B, N) fixes the order (uniform random noise when None)."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        if noise is None:
            noise = torch.rand(batch, num_patches, device=device)
        elif tuple(noise.shape) != (batch, num_patches):
            raise ValueError(f"noise must have shape (B, N) = ({batch}, {num_patches}), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        return ids_shuffle, torch.argsort(ids_shuffle, dim=1), int(num_patches * (1 - mask_ratio))

    def patch_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error of each patch (B, N) against its pixels (per-patch normalised if norm_pix_loss)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((pred - target) ** 2).mean(dim=-1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The patch loss averaged over masked patches."""
        return (self.patch_loss(imgs, pred) * mask).sum() / mask.sum()

    def _init_weights(self) -> None:
        """MAE's initialisation: sin-cos tables, patch embedding as a linear map (xavier), tokens normal(0.02),
        linear layers xavier_uniform with zero bias, LayerNorms (1, 0)."""
        grid = self.patch_embed.grid_size
        for table in (self.pos_embed, self.decoder_pos_embed):
            table.data.copy_(sincos_2d_table(table.shape[-1], *grid))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
