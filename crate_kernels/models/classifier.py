"""Image classifiers built from a pretrained masked autoencoder: its encoder (decoder dropped) and MAE's head.

MAE's conventions (facebookresearch/mae, models_vit.py, main_finetune.py, main_linprobe.py):
  pooling  ``global_pool=False``: [CLS] of ``norm(tokens)``;  ``global_pool=True``: ``fc_norm`` of the mean of the
           patch tokens (the encoder's ``norm`` is then not used, and not kept);
  head     fine-tuning: ``head`` = Linear(d, classes), weight trunc_normal(std 2e-5), bias 0;
           linear probing (``linear_probe=True``): ``head`` = BatchNorm1d(d, affine=False, eps 1e-6) then Linear,
           weight trunc_normal(std 0.01), bias 0.
The state_dict keys are the encoder's own (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``) plus
``fc_norm`` and ``head``, so a ViT classifier has the layout of FAIR's fine-tuned ViTs.

    clf = CRATEClassifier.from_pretrained("output_dir", num_classes=10)     # or classifier_from_pretrained(...)
    logits = clf(imgs)                                                         # (B, classes)
    features = clf.pooled(imgs)                                                # (B, d): what the head sees
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TrainError
from .base import GradCheckpointing, PatchEmbed
from .crate import CRATELayers, EncoderBlock
from .hub import HubMixin
from .pos_embed import resize_table, sincos_2d_table
from .pretrained import Pretrained, load_checkpoint, load_pretrained
from .registry import FAMILY_NAMES, MODELS
from .vit_mae import Block

__all__ = ["EncoderClassifier", "CRATEClassifier", "ViTClassifier", "classifier_from_pretrained", "make_head"]


def make_head(embed_dim: int, num_classes: int, linear_probe: bool = False) -> nn.Module:
    """MAE's classification head on (B, embed_dim) features: Linear with trunc_normal(std 2e-5) weight and zero bias
    (fine-tuning), or BatchNorm1d(affine=False, eps 1e-6) then Linear with std 0.01 (linear probing)."""
    linear = nn.Linear(embed_dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01 if linear_probe else 2e-5)
    nn.init.zeros_(linear.bias)
    if linear_probe:
        return nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), linear)
    return linear


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


class EncoderClassifier(GradCheckpointing, nn.Module, HubMixin):
    """The shared part: embedding, blocks (built by the subclass), pooling, norm and head."""

    family = ""

    def __init__(self, num_classes: int, img_size: int, patch_size: int, embed_dim: int, global_pool: bool,
                 linear_probe: bool, in_chans: int = 3):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.global_pool, self.linear_probe, self.num_classes = global_pool, linear_probe, num_classes
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d_table(embed_dim, *self.patch_embed.grid_size), requires_grad=False)
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = make_head(embed_dim, num_classes, linear_probe)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def forward_features(self, imgs: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Tokens (B, 1 + N, d) after encoder layer ``layer`` (default the last), before any final norm; images of
        any size divisible by the patch (the position table is interpolated)."""
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans or imgs.shape[-1] % self.patch_size \
                or imgs.shape[-2] % self.patch_size:
            raise ValueError(f"imgs must be (B, {self.in_chans}, H, W) with H and W multiples of {self.patch_size}, "
                             f"got {tuple(imgs.shape)}")
        depth = len(self.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer must lie in [{-depth}, {depth}) for this {depth}-layer encoder, got {layer}")
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        x = self.patch_embed(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + resize_table(self.pos_embed, self.patch_embed.grid_size, grid).to(x.dtype)
        return self._run_blocks(self.blocks[: layer % depth + 1], x)

    def pooled(self, imgs: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """(B, d), what the head sees: [CLS] after ``norm``, or ``fc_norm`` of the mean patch token (global pool).
        At an earlier ``layer``, [CLS] is taken without the final ``norm`` (it belongs to the last layer)."""
        x = self.forward_features(imgs, layer)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        last = layer % len(self.blocks) == len(self.blocks) - 1
        return (self.norm(x) if last else x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.pooled(imgs))

    # ------------------------------------------------------------------ from a pretraining checkpoint
    def _encoder_state(self, state: dict) -> dict:
        """The checkpoint's tensors under this classifier's names (the subclass maps its position table)."""
        own = self.state_dict()
        return {k: v for k, v in state.items() if k in own}

    def load_pretrained_state(self, state: dict, source: str = "checkpoint") -> int:
        """Copy the encoder (and a head of the same shape, if the checkpoint is a classifier's) from ``state``;
        returns the number of checkpoint parameters left out (the decoder, a ``norm`` that global pooling replaces;
        position tables not counted)."""
        own, mine = self._encoder_state(state), self.state_dict()
        head = [k for k in own if k.startswith(("head.", "fc_norm."))]
        if any(tuple(own[k].shape) != tuple(mine[k].shape) for k in head):
            own = {k: v for k, v in own.items() if k not in head}  # another number of classes: a fresh head
        try:
            result = load_checkpoint(self, own, strict=False)
        except ValueError as e:
            raise TrainError(f"{source} does not fit this classifier: {e}") from None
        missing = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm."))]
        if missing:
            raise TrainError(f"{source} lacks {len(missing)} encoder tensors: {', '.join(missing[:6])}"
                             + (" ..." if len(missing) > 6 else ""))
        tables = {"pos_embed", "decoder_pos_embed"}
        return sum(v.numel() for k, v in state.items() if k not in own and k not in tables)

    @classmethod
    def from_pretrained(cls, source: str | Pretrained, num_classes: int | None = None, global_pool: bool = False,
                        linear_probe: bool = False, model: str | None = None, backend: str | None = None,
                        log=print, **hub_kwargs) -> "EncoderClassifier":
        """The classifier of a pretraining checkpoint (see ``pretrained.load_pretrained``: a run directory,
        checkpoint-*.pth, model.safetensors, a release .pth, a save_pretrained folder or Hub repo id) with a fresh
        head; ``log`` (None: silent) receives one line with the parameter count of what remains.
        Without ``num_classes``: a classifier saved by ``save_pretrained`` (a folder or a Hub repo id), whole, as
        huggingface_hub's ``from_pretrained`` loads it (``hub_kwargs``: its options; ``backend`` for CRATE)."""
        if num_classes is None:
            if cls is EncoderClassifier:
                raise TypeError("EncoderClassifier.from_pretrained needs num_classes; a saved classifier loads with "
                                "CRATEClassifier.from_pretrained or ViTClassifier.from_pretrained")
            extra = {"backend": backend} if backend is not None else {}
            return super().from_pretrained(source, **extra, **hub_kwargs)
        pretrained = source if isinstance(source, Pretrained) else load_pretrained(source, model)
        target = {"crate": CRATEClassifier, "vit": ViTClassifier}[pretrained.family]
        if cls is not EncoderClassifier and not issubclass(target, cls):
            raise TrainError(f"{pretrained.source} holds a {FAMILY_NAMES[pretrained.family]} checkpoint; "
                             f"{cls.__name__} needs a {FAMILY_NAMES[cls.family]} one")
        clf = target.for_architecture(pretrained.model, num_classes, pretrained.img_size, pretrained.patch_size,
                                      global_pool, linear_probe, backend)
        dropped = clf.load_pretrained_state(pretrained.state, pretrained.source)
        if log is not None:
            log(clf.describe(pretrained.describe(), dropped))
        return clf.eval()

    @classmethod
    def for_architecture(cls, name: str, num_classes: int, img_size: int, patch_size: int, global_pool: bool = False,
                         linear_probe: bool = False, backend: str | None = None) -> "EncoderClassifier":
        """A freshly initialised classifier of the pretraining architecture ``name`` (a key of MODELS)."""
        cfg = MODELS[name]
        kwargs = dict(embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"])
        if cls is CRATEClassifier:
            kwargs["backend"] = backend
        return cls(num_classes, img_size, patch_size, global_pool=global_pool, linear_probe=linear_probe, **kwargs)

    def describe(self, source: str = "", dropped: int = 0) -> str:
        """One line: the architecture, pooling, head and parameter counts."""
        head = _count(self.head.parameters())
        total = _count(self.parameters())
        pool = "global pool + fc_norm" if self.global_pool else "[CLS] + norm"
        kind = "BatchNorm + linear (linear probe)" if self.linear_probe else "linear"
        text = (f"{type(self).__name__}: {total:,} parameters ({total - head:,} encoder, {head:,} head: {kind}, "
                f"{self.num_classes} classes; {pool})")
        if source:
            text += f"; from {source}"
        if dropped:
            text += f"; {dropped:,} checkpoint parameters dropped (the decoder{', norm' if self.global_pool else ''})"
        return text


class CRATEClassifier(CRATELayers, EncoderClassifier):
    """CRATE-MAE encoder (MSSA + ISTA layers, the release's names) with MAE's pooling and head."""

    family = "crate"

    def __init__(self, num_classes: int, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, global_pool: bool = False, linear_probe: bool = False,
                 step_size: float = 0.1, lambd: float = 0.5, backend: str | None = None):
        super().__init__(num_classes, img_size, patch_size, embed_dim, global_pool, linear_probe)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.blocks = nn.ModuleList(
            [EncoderBlock(embed_dim, num_heads, embed_dim // num_heads, step_size, lambd) for _ in range(depth)]
        )
        self.set_backend(backend)

    def _encoder_state(self, state: dict) -> dict:
        # the release's encoder adds the table it names decoder_pos_embed (its pos_embed is an unused copy)
        own = super()._encoder_state(state)
        if "decoder_pos_embed" in state:
            own["pos_embed"] = state["decoder_pos_embed"]
        return own


class ViTClassifier(EncoderClassifier):
    """FAIR's fine-tuning ViT (models_vit.VisionTransformer): ViT-MAE's encoder with MAE's pooling and head."""

    family = "vit"

    def __init__(self, num_classes: int, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, global_pool: bool = False, linear_probe: bool = False,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__(num_classes, img_size, patch_size, embed_dim, global_pool, linear_probe)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])


def classifier_from_pretrained(source: str, num_classes: int, global_pool: bool = False, linear_probe: bool = False,
                               model: str | None = None, backend: str | None = None, log=print) -> EncoderClassifier:
    """A ``CRATEClassifier`` or ``ViTClassifier``, whichever the checkpoint's family is (see
    ``EncoderClassifier.from_pretrained``)."""
    return EncoderClassifier.from_pretrained(source, num_classes, global_pool, linear_probe, model, backend, log)
