"""ViT-MAE, the baseline of the CRATE-MAE paper, as FAIR's MAE defines it (facebookresearch/mae, models_mae.py).

The encoder sees only the visible patches; mask tokens enter the decoder. Blocks are timm's pre-norm ViT blocks
(x + Attn(LN(x)), then x + MLP(LN(x)), MLP ratio 4, GELU, qkv with bias), every LayerNorm with eps 1e-6,
attention through ``F.scaled_dot_product_attention``. The module tree, and so the state_dict keys, are FAIR's:
``blocks.i.norm1``, ``blocks.i.attn.qkv`` (output channels ordered q | k | v, each head-major), ``blocks.i.attn.proj``,
``blocks.i.norm2``, ``blocks.i.mlp.fc1``, ``blocks.i.mlp.fc2``, ``decoder_embed``, ``mask_token``,
``decoder_blocks.i...``, ``decoder_norm``, ``decoder_pred``, and the fixed sin-cos tables ``pos_embed`` and
``decoder_pos_embed``.

forward(imgs, mask_ratio=0.75, noise=None) -> (loss, pred, mask), as ``CRATEMAE``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import MaskedImageModel
from .hub import HubMixin
from .pos_embed import resize_table

__all__ = ["MaskedAutoencoderViT", "VIT_CONFIGS", "mae_vit_small", "mae_vit_base"]


class Attention(nn.Module):
    """Multi-head self-attention: qkv = x W^T + b split into q, k, v of H heads; softmax(q k^T / sqrt(p)) v; proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """The qkv output (B, N, 3d) -> (3, B, H, N, p): q, k, v."""
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.split_heads(self.qkv(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 (d -> ratio * d), GELU, fc2 (back to d)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm1(x)), then x + MLP(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedAutoencoderViT(MaskedImageModel, nn.Module, HubMixin):
    """FAIR's masked autoencoder with a ViT encoder (visible patches only) and a lighter ViT decoder."""

    # The keyword names are the public constructor of FAIR's MAE, spelled out as in CRATE-MAE's (models.crate): the two
    # signatures look alike on purpose (MAE's keyword names carry over); the defaults and a few extras differ.
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        qkv_bias: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        for name, dim, heads in (("num_heads", embed_dim, num_heads),
                                 ("decoder_num_heads", decoder_embed_dim, decoder_num_heads)):
            if dim % heads:
                raise ValueError(f"{'decoder_embed_dim' if name.startswith('decoder') else 'embed_dim'} ({dim}) must "
                                 f"be divisible by {name} ({heads})")
        n = self._embedding(img_size, patch_size, in_chans, embed_dim, norm_pix_loss)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias, eps) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self._init_weights()

    def _table(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return resize_table(table, self.patch_embed.grid_size, grid)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """Visible patches only -> latent (B, 1 + kept, d) after ``norm``, mask (B, N) with 1 = masked (raster order),
        ids_restore (B, N)."""
        grid = self._check_imgs(imgs)
        pos = self._table(self.pos_embed, grid).to(imgs.dtype)
        x = self.patch_embed(imgs) + pos[:, 1:]
        b, n, d = x.shape
        ids_shuffle, ids_restore, len_keep = self.masking_order(b, n, mask_ratio, noise, x.device)
        x = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, d))
        mask = (ids_restore >= len_keep).to(torch.float32)
        cls = (self.cls_token + pos[:, :1]).expand(b, -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self._run_blocks(self.blocks, x)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        grid: tuple[int, int] | None = None) -> torch.Tensor:
        """latent (B, 1 + kept, d) -> pred (B, N, p*p*C): mask tokens fill the removed positions, raster order."""
        x = self.decoder_embed(latent)
        b, kept, d = x.shape
        n = ids_restore.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, n + 1 - kept, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], tokens], dim=1)
        x = x + self._table(self.decoder_pos_embed, grid or self.patch_embed.grid_size).to(x.dtype)
        x = self._run_blocks(self.decoder_blocks, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, self._check_imgs(imgs))
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder output (B, 1 + N, d) after ``norm``, any size divisible by the patch; [:, 0] is [CLS]."""
        grid = self._check_imgs(imgs)
        x = self.patch_embed(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self._table(self.pos_embed, grid).to(x.dtype)
        return self.norm(self._run_blocks(self.blocks, x))


# The paper's baselines (patch 16, 224 px): ViT-S and ViT-B encoders. Their parameter counts (47.6M, 143.8M) fix the
# decoders: 512 wide and 8 deep for S (FAIR's default), 768 wide and 8 deep for B; decoder heads 16 as in FAIR's
# factories. ``mae_vit_demo`` is the CPU demo's scale (width 128, 4 heads, 3 + 3 layers). The ``_patch`` names are
# FAIR's own releases (decoder 512 x 8), so their checkpoints load as they are.
_FAIR_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
VIT_CONFIGS = {
    "mae_vit_demo": dict(embed_dim=128, depth=3, num_heads=4, decoder_embed_dim=128, decoder_depth=3,
                         decoder_num_heads=4),
    "mae_vit_small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=512, decoder_depth=8,
                          decoder_num_heads=16),
    "mae_vit_base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                         decoder_num_heads=16),
    "mae_vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, **_FAIR_DECODER),
    "mae_vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, **_FAIR_DECODER),
    "mae_vit_huge_patch14": dict(embed_dim=1280, depth=32, num_heads=16, **_FAIR_DECODER),
}


def mae_vit_small(**kwargs) -> MaskedAutoencoderViT:
    """ViT-MAE-S: ViT-S/16 encoder (384 wide, 6 heads, 12 layers), decoder 512 wide x 8; 47,578,240 parameters."""
    return MaskedAutoencoderViT(**{**VIT_CONFIGS["mae_vit_small"], **kwargs})


def mae_vit_base(**kwargs) -> MaskedAutoencoderViT:
    """ViT-MAE-B: ViT-B/16 encoder (768 wide, 12 heads, 12 layers), decoder 768 wide x 8; 143,836,416 parameters."""
    return MaskedAutoencoderViT(**{**VIT_CONFIGS["mae_vit_base"], **kwargs})

