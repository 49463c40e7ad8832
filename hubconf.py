"""torch.hub entry points: ``torch.hub.load("<owner>/<repo>", "crate_mae_base")`` (or a local clone with
``source="local"``) builds a model of this package, freshly initialised; keyword arguments go to the constructor
(``img_size``, ``patch_size``, ``backend`` ...). Weights: ``Model.from_pretrained(folder_or_repo_id)`` (the extra hub)
or ``crate_kernels.load_checkpoint(model, path)``.

    crate_mae_tiny / _small / _base / _large    CRATE-MAE (the paper's sizes)
    mae_vit_small / mae_vit_base                ViT-MAE baselines
    crate_classifier / vit_classifier           classifiers (num_classes, then the constructor's arguments)
    crate_tiny / _small / _base / _large        supervised CRATE, the release's model/crate.py (num_classes=1000,
                                                image_size, patch_size ...)
"""
dependencies = ["torch", "numpy", "safetensors"]

from crate_kernels.models.classifier import CRATEClassifier as crate_classifier  # noqa: E402
from crate_kernels.models.classifier import ViTClassifier as vit_classifier  # noqa: E402
from crate_kernels.models.crate import (  # noqa: E402
    crate_mae_base,
    crate_mae_large,
    crate_mae_small,
    crate_mae_tiny,
)
from crate_kernels.models.crate_supervised import crate_base, crate_large, crate_small, crate_tiny  # noqa: E402
from crate_kernels.models.vit_mae import mae_vit_base, mae_vit_small  # noqa: E402

__all__ = ["crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large", "mae_vit_small", "mae_vit_base",
           "crate_classifier", "vit_classifier", "crate_tiny", "crate_small", "crate_base", "crate_large"]
