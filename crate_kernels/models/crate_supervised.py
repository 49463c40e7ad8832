"""Supervised CRATE ("White-Box Transformers via Sparse Rate Reduction"), a drop-in for the release's
``model/crate.py`` (Ma-Lab-Berkeley/CRATE): the same constructor, module tree, state_dict keys and numbers, its
layers the CRATE-MAE encoder's (MSSA and ISTA through crate_kernels.ops, any backend).

  patches (p1 p2 c order) -> LN -> Linear -> LN -> [CLS] + learned positions -> dropout
  -> L x (z_half = z + MSSA(LN(z)); z = ISTA(LN(z_half)), eta = ista, lambda = 0.1)
  -> [CLS] or the token mean -> mlp_head (LN, Linear) -> logits (B, num_classes)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import GradCheckpointing, patches
from .crate import CONFIGS, ISTA, MSSA, CRATELayers, PreNorm
from .hub import HubMixin

__all__ = ["CRATE", "crate_tiny", "crate_small", "crate_base", "crate_large", "SUPERVISED_CONFIGS"]


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class Patches(nn.Module):
    """(B, C, H, W) -> (B, N, p1 * p2 * C), the release's ``Rearrange`` (``models.base.patches``)."""

    def __init__(self, patch_height: int, patch_width: int):
        super().__init__()
        self.patch_height, self.patch_width = patch_height, patch_width

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return patches(img, self.patch_height, self.patch_width)


def _crate_layer(x: torch.Tensor, attn: nn.Module, ista: nn.Module) -> torch.Tensor:
    """One layer: z_half = z + MSSA(LN(z)), then ISTA(LN(z_half)) (the release's residual placement)."""
    return ista(attn(x) + x)


class Transformer(nn.Module):
    """``depth`` CRATE layers: ``layers[i] = [PreNorm(MSSA), PreNorm(ISTA)]`` (the release's key names)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, dropout: float = 0.0, ista: float = 0.1):
        super().__init__()
        project_out = not (heads == 1 and dim_head == dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, MSSA(dim, heads, dim_head, dropout, project_out=project_out)),
                           PreNorm(dim, ISTA(dim, step_size=ista, lambd=0.1))])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, count: int | None = None, recompute: bool = False) -> torch.Tensor:
        """The first ``count`` layers (all by default), each recomputed in backward when ``recompute``."""
        for attn, ista in self.layers[:count]:
            x = (checkpoint(_crate_layer, x, attn, ista, use_reentrant=False) if recompute
                 else _crate_layer(x, attn, ista))
        return x


class CRATE(CRATELayers, GradCheckpointing, nn.Module, HubMixin):
    """The release's supervised CRATE; ``forward(img (B, C, H, W)) -> logits (B, num_classes)``."""

    def __init__(self, *, image_size, patch_size, num_classes: int, dim: int, depth: int, heads: int,
                 pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
                 emb_dropout: float = 0.0, ista: float = 0.1, backend: str | None = None):
        super().__init__()
        (image_height, image_width), (patch_height, patch_width) = _pair(image_size), _pair(patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' ([CLS] token) or 'mean' (mean of the tokens), got {pool!r}")
        self.config = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim,
                           depth=depth, heads=heads, pool=pool, channels=channels, dim_head=dim_head,
                           dropout=dropout, emb_dropout=emb_dropout, ista=ista)
        num_patches = (image_height // patch_height) * (image_width // patch_width)
        patch_dim = channels * patch_height * patch_width
        self.image_size, self.channels = (image_height, image_width), channels
        self.patch_size = patch_height if patch_height == patch_width else (patch_height, patch_width)
        self.to_patch_embedding = nn.Sequential(Patches(patch_height, patch_width), nn.LayerNorm(patch_dim),
                                                nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, dropout, ista)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        self.set_backend(backend)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder layers, as the white-box analysis (crate_kernels.analysis) reads a model's ``blocks``."""
        return self.transformer.layers

    @property
    def num_classes(self) -> int:
        return self.mlp_head[1].out_features

    def forward_features(self, img: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """(B, C, H, W) -> the tokens (B, 1 + N, dim) after layer ``layer`` (0-based; default the last), [CLS]
        first."""
        if img.dim() != 4 or img.shape[1] != self.channels or tuple(img.shape[2:]) != self.image_size:
            raise ValueError(f"img must be (B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}), got "
                             f"{tuple(img.shape)}")
        depth = len(self.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer must lie in [{-depth}, {depth}) for this {depth}-layer model, got {layer}")
        x = self.to_patch_embedding(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embedding
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        return self.transformer(self.dropout(x), layer % depth + 1, recompute)

    def pooled(self, img: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """(B, dim): the image feature, [CLS] or the token mean (``pool``), after the head's LayerNorm at the last
        layer (what its linear map sees); at an earlier ``layer``, without it."""
        feature = self._pool(self.forward_features(img, layer))
        return self.mlp_head[0](feature) if layer % len(self.blocks) == len(self.blocks) - 1 else feature

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, dim) -> (B, dim): the token mean ([CLS] included, as the release) or [CLS]."""
        return tokens.mean(dim=1) if self.pool == "mean" else tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.to_latent(self._pool(tokens)))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))

    def describe(self, source: str = "", note: str = "") -> str:
        """One line: parameters (head apart), classes, pooling, and where the weights came from."""
        head = sum(p.numel() for p in self.mlp_head.parameters())
        total = sum(p.numel() for p in self.parameters())
        c = self.config
        return (f"CRATE: {total:,} parameters ({total - head:,} encoder, {head:,} head), {c['depth']} layers of "
                f"width {c['dim']}, {c['heads']} heads, {self.num_classes} classes, {self.pool} pooling"
                + (f"; from {source}" if source else "") + (f"; {note}" if note else ""))


# The release's factories (CRATE_tiny ... CRATE_large): 224 px, patch 16, dim_head = dim / heads, no dropout; the
# widths, depths and heads are CRATE-MAE's encoder's of the same name. crate_demo (ours) is the CPU demo's scale.
SUPERVISED_CONFIGS = {
    "crate_demo": dict(dim=128, depth=3, heads=4),
    **{name.replace("_mae", ""): dict(dim=c["embed_dim"], depth=c["depth"], heads=c["num_heads"])
       for name, c in CONFIGS.items()},
}


def _factory(name: str):
    def build(num_classes: int = 1000, **kwargs) -> CRATE:
        config = SUPERVISED_CONFIGS[name]
        args = dict(image_size=224, patch_size=16, num_classes=num_classes, dim_head=config["dim"] // config["heads"],
                    **config)
        return CRATE(**{**args, **kwargs})

    build.__name__ = name
    origin = "the CPU demo's size" if name == "crate_demo" else f"the release's CRATE_{name.split('_')[1]}"
    build.__doc__ = (f"Supervised CRATE, {origin}: {SUPERVISED_CONFIGS[name]}, 224 px, patch 16 (keywords override, "
                     "e.g. image_size=32, patch_size=4 for CIFAR).")
    return build


crate_demo = _factory("crate_demo")
crate_tiny = _factory("crate_tiny")
crate_small = _factory("crate_small")
crate_base = _factory("crate_base")
crate_large = _factory("crate_large")
