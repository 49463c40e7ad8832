"""Every pretraining architecture by name.

``MODELS``: name -> constructor arguments, for CRATE-MAE (``demo``, ``crate_mae_*``) and ViT-MAE (``mae_vit_*``);
``family(name)`` tells which; ``build_mae(name, ...)`` builds one.
"""
from __future__ import annotations

from .crate import CONFIGS, CRATEMAE
from .vit_mae import VIT_CONFIGS, MaskedAutoencoderViT

MODELS = {"demo": dict(embed_dim=128, depth=3, num_heads=4), **CONFIGS, **VIT_CONFIGS}

FAMILY_NAMES = {"crate": "CRATE-MAE", "vit": "ViT-MAE"}
DEMO_MODELS = ("demo", "mae_vit_demo")  # the CPU demo's scale, in each family


def family(name: str) -> str:
    """``crate`` or ``vit``: the family of the architecture ``name`` (a key of MODELS)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    return "vit" if name in VIT_CONFIGS else "crate"


def build_mae(name: str, img_size: int = 224, patch_size: int = 16, norm_pix_loss: bool = False,
              backend: str | None = None) -> CRATEMAE | MaskedAutoencoderViT:
    """The masked autoencoder ``name`` at ``img_size``/``patch_size``; ``backend`` sets CRATE's operators (ViT-MAE
    has none: its attention is ``F.scaled_dot_product_attention``)."""
    if family(name) == "vit":
        return MaskedAutoencoderViT(img_size=img_size, patch_size=patch_size, norm_pix_loss=norm_pix_loss,
                                    **MODELS[name])
    return CRATEMAE(img_size=img_size, patch_size=patch_size, norm_pix_loss=norm_pix_loss, backend=backend,
                    **MODELS[name])
