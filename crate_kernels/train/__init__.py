"""MAE pretraining of CRATE-MAE: ``python -m crate_kernels.train`` or ``crate-train`` (``--help`` lists flags).

With no arguments it trains the small ``demo`` model on scikit-image's bundled photographs on CPU in a few
minutes. ``--model crate_mae_base --data_path /path/to/imagenet`` (under torchrun for several GPUs) runs the
MAE recipe. Submodules: config (flags, presets), data (datasets, augmentation, sampler), loop (the run),
checkpoint (atomic files, RNG state, lock), distributed (torchrun), monitor (logs).
"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 1 run failed, 2 bad arguments)."""
    from .loop import main as run  # imported here so that importing crate_kernels.train.data stays light

    return run(argv)
