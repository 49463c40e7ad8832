"""Every architecture by name.

``MODELS``: the pretraining architectures, name -> constructor arguments, CRATE-MAE (``demo``, ``crate_mae_*``) and
ViT-MAE (``mae_vit_*``); ``SUPERVISED_MODELS``: supervised CRATE (``crate_demo``, ``crate_tiny`` ... ``crate_large``),
trained as classifiers by the fine-tuning command. ``family(name)`` tells which of the three; ``build_mae`` and
``build_supervised`` build one.
"""
from __future__ import annotations

from .crate import CONFIGS, CRATEMAE
from .crate_supervised import CRATE, SUPERVISED_CONFIGS
from .vit_mae import VIT_CONFIGS, MaskedAutoencoderViT

MODELS = {"demo": dict(embed_dim=128, depth=3, num_heads=4), **CONFIGS, **VIT_CONFIGS}
SUPERVISED_MODELS = SUPERVISED_CONFIGS
CHECKPOINT_MODELS = (*MODELS, *SUPERVISED_MODELS)  # what a checkpoint may hold

FAMILY_NAMES = {"crate": "CRATE-MAE", "vit": "ViT-MAE", "supervised": "supervised CRATE"}
DEMO_MODELS = ("demo", "mae_vit_demo", "crate_demo")  # the CPU demo's scale, in each family


def family(name: str) -> str:
    """``crate``, ``vit`` or ``supervised``: the family of the architecture ``name``."""
    if name in SUPERVISED_MODELS:
        return "supervised"
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(CHECKPOINT_MODELS)}, got {name!r}")
    return "vit" if name in VIT_CONFIGS else "crate"


def build_mae(name: str, img_size: int = 224, patch_size: int = 16, norm_pix_loss: bool = False,
              backend: str | None = None) -> CRATEMAE | MaskedAutoencoderViT:
    """The masked autoencoder ``name`` at ``img_size``/``patch_size``; ``backend`` sets CRATE's operators (ViT-MAE
    has none: its attention is ``F.scaled_dot_product_attention``)."""
    if family(name) == "vit":
        return MaskedAutoencoderViT(img_size=img_size, patch_size=patch_size, norm_pix_loss=norm_pix_loss,
                                    **MODELS[name])
    if family(name) == "supervised":
        raise ValueError(f"{name} is a supervised CRATE, not a masked autoencoder (build_supervised builds it)")
    return CRATEMAE(img_size=img_size, patch_size=patch_size, norm_pix_loss=norm_pix_loss, backend=backend,
                    **MODELS[name])


def build_supervised(name: str, num_classes: int, img_size: int = 224, patch_size: int = 16, pool: str = "cls",
                     backend: str | None = None) -> CRATE:
    """Supervised CRATE ``name`` (a key of SUPERVISED_MODELS) for ``num_classes`` at ``img_size``/``patch_size``,
    freshly initialised as the release does (torch's defaults, normal position table and [CLS])."""
    if family(name) != "supervised":
        raise ValueError(f"{name} is not a supervised CRATE; one of {', '.join(SUPERVISED_MODELS)}")
    cfg = SUPERVISED_MODELS[name]
    return CRATE(image_size=img_size, patch_size=patch_size, num_classes=num_classes,
                 dim_head=cfg["dim"] // cfg["heads"], pool=pool, backend=backend, **cfg)
