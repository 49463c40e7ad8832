"""crate_kernels: fast, faithful CRATE-MAE (white-box masked autoencoder) with fused operators."""
from . import ops
from .model import (
    CONFIGS,
    CRATEMAE,
    clean_state_dict,
    crate_mae_base,
    crate_mae_large,
    crate_mae_small,
    crate_mae_tiny,
    load_checkpoint,
)
from .ops import get_backend, set_backend

__version__ = "0.1.0"

__all__ = [
    "CRATEMAE", "CONFIGS", "crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large",
    "load_checkpoint", "clean_state_dict", "ops", "set_backend", "get_backend", "__version__",
]
