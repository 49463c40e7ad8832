"""crate_kernels: fast, faithful CRATE-MAE (white-box masked autoencoder) with fused operators."""
from . import ops
from .models.classifier import CRATEClassifier, ViTClassifier, classifier_from_pretrained
from .models.crate import CONFIGS, CRATEMAE, crate_mae_base, crate_mae_large, crate_mae_small, crate_mae_tiny
from .models.crate_supervised import CRATE, crate_base, crate_large, crate_small, crate_tiny
from .models.pretrained import clean_state_dict, load_checkpoint
from .models.vit_mae import MaskedAutoencoderViT, mae_vit_base, mae_vit_small
from .ops import get_backend, set_backend

__version__ = "0.1.0"

__all__ = [
    "CRATEMAE", "CONFIGS", "crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large",
    "load_checkpoint", "clean_state_dict", "ops", "set_backend", "get_backend", "__version__",
    "MaskedAutoencoderViT", "mae_vit_small", "mae_vit_base", "CRATEClassifier", "ViTClassifier",
    "classifier_from_pretrained", "CRATE", "crate_tiny", "crate_small", "crate_base", "crate_large",
]
