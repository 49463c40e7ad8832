"""MAE pretraining of CRATE-MAE: ``python -m crate_kernels.train`` or ``crate-train`` (``--help`` lists flags).

With no arguments it trains the small ``demo`` model on scikit-image's bundled photographs on CPU in a few
minutes. ``--model crate_mae_base --data_path /path/to/imagenet`` (under torchrun for several GPUs) runs the
MAE recipe. Submodules: config (flags, presets) and trainer (the masked autoencoder's part of the run), on top of the
shared layer crate_kernels.pipeline (the training engine run, data, checkpoint, distributed, monitor, flags), which
fine-tuning (crate_kernels.finetune) shares.
``load_run(output_dir)`` gives back the model a run trained.
"""
from __future__ import annotations

import os


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 run failed, 2 bad arguments)."""
    from .trainer import main as run  # imported here so that importing crate_kernels.train stays light

    return run(argv)


def load_run(output_dir: str, backend: str | None = None):
    """The CRATEMAE a ``crate-train`` run wrote to ``output_dir``, on CPU, in eval mode.

    The architecture comes from the run's args.yaml (model, input and patch size), the weights from
    model.safetensors (written when the run finished) or else checkpoint-last.pth (a run still going or
    stopped). ``backend`` sets the operator backend (None: the process-wide default).
    """
    from ..checkpoint import load
    from ..errors import TrainError
    from ..models.pretrained import load_checkpoint
    from .config import resolve
    from .trainer import build_model

    args = os.path.join(output_dir, "args.yaml")
    if not os.path.isfile(args):
        raise TrainError(f"{output_dir} holds no crate-train run (no args.yaml)")
    cfg = resolve(["--config", args])
    model = build_model({**cfg, "backend": backend})
    final = os.path.join(output_dir, "model.safetensors")
    weights = final if os.path.isfile(final) else os.path.join(output_dir, "checkpoint-last.pth")
    load_checkpoint(model, load(weights))
    return model.eval()

