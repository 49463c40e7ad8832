"""CRATE-MAE, a drop-in for the official release (same forward, same state_dict keys, same numbers).

forward(imgs, mask_ratio=0.75, noise=None) -> (loss, pred, mask):
  patch embed -> random masking (mask tokens ENTER the encoder, raster order restored) -> [CLS]
  -> + fixed sin-cos table -> L encoder layers -> norm -> L decoder layers -> decoder_norm
  -> decoder_pred, [CLS] dropped -> pred (B, N, patch^2 * 3); loss = mean squared error on masked patches.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import CRATELayers, DecoderBlock, EncoderBlock
from .pos_embed import resize_table, sincos_2d_table

__all__ = [
    "CRATEMAE", "crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large", "CONFIGS",
    "load_checkpoint", "clean_state_dict",
]


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
        gh, gw = self._check_imgs(imgs)
        p, c = self.patch_size, imgs.shape[1]
        x = imgs.reshape(imgs.shape[0], c, gh, p, gw, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], gh * gw, p * p * c)

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


class CRATEMAE(CRATELayers, MaskedImageModel, nn.Module):
    """CRATE masked autoencoder (white-box encoder and decoder, mask tokens in the encoder)."""

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
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")

        self.in_chans, self.norm_pix_loss = in_chans, norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
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
    build.__doc__ = f"CRATE-MAE with d={cfg['embed_dim']}, {cfg['num_heads']} heads, {cfg['depth']}+{cfg['depth']} layers."
    return build


crate_mae_tiny = _factory("crate_mae_tiny")
crate_mae_small = _factory("crate_mae_small")
crate_mae_base = _factory("crate_mae_base")
crate_mae_large = _factory("crate_mae_large")


def clean_state_dict(checkpoint: Mapping) -> dict:
    """Unwrap {'model': state_dict, ...} and strip DDP's 'module.' prefixes."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise TypeError("checkpoint must be a state_dict or a dict holding one under 'model'")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def key_sample(keys, shown: int = 3) -> str:
    """The first ``shown`` of ``keys`` and how many there are, for an error message: ``a, b, c, ... (60 keys)``."""
    keys = list(keys)
    more = ", ..." if len(keys) > shown else ""
    return f"{', '.join(keys[:shown])}{more} ({len(keys)} key{'s' if len(keys) != 1 else ''})"


def load_checkpoint(model: nn.Module, checkpoint, strict: bool = True):
    """Load a release checkpoint (path to .pth/.safetensors, or a dict) into ``model`` (a CRATE-MAE or ViT-MAE).

    Every mismatch is reported in one line before anything is copied: a checkpoint holding none of the model's
    tensors (with a sample of its keys), tensors of other shapes, and (``strict``) missing or extra tensors, counted
    and a few named. A path is read by ``crate_kernels.pipeline.checkpoint.load`` (``weights_only=True``; a file
    that is not a checkpoint, or whose bytes no longer match their checksum, is refused in one line).
    """
    source = "the checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        from .pipeline.checkpoint import load

        source, checkpoint = os.fspath(checkpoint), load(os.fspath(checkpoint))
    state = clean_state_dict(checkpoint)
    own = model.state_dict()
    name = type(model).__name__
    if not state.keys() & own.keys():
        raise ValueError(f"{source} holds none of {name}'s {len(own)} tensors; "
                         + (f"its keys look like {key_sample(state)}" if state else "it holds no tensors"))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        shown = mismatched[:3] + ([f"... and {len(mismatched) - 3} more"] if len(mismatched) > 3 else [])
        raise ValueError(f"{source} does not fit this {name} (other size?); {len(mismatched)} mismatched tensors: "
                         + "; ".join(shown))
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = ([f"missing {key_sample(missing)}"] if missing else []) + (
            [f"unexpected {key_sample(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source} does not match this {name}'s {len(own)} tensors: " + "; ".join(parts))
    return model.load_state_dict(state, strict=strict)
