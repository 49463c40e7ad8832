"""Configuration of MAE pretraining: flags (MAE's names), presets, a YAML file, precedence and checks.

Precedence, lowest first: recipe defaults < the ``--model`` preset < ``--config`` YAML < command-line flags.
The resolved configuration is a plain dict; ``args.yaml`` in the output directory records it and can be fed
back with ``--config``.
"""
from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..models.registry import DEMO_MODELS, MODELS
from ..pipeline import flags
from ..pipeline.data import DATASETS
from ..pipeline.flags import add_flags

# The MAE / CRATE-MAE ImageNet-1K recipe (MAE's main_pretrain.py defaults); the model sizes use it as is.
DEFAULTS = dict(
    flags.ENGINE_DEFAULTS, model="demo", input_size=224, patch_size=16, mask_ratio=0.75, norm_pix_loss=False,
    epochs=800, warmup_epochs=40.0, blr=1.5e-4, min_lr=0.0, epoch_size=4096, eval_images=8,
    output_dir="./output_dir", eval_every=5000,
)

# What ``--model NAME`` changes besides the architecture. ``demo`` is the default with no arguments:
# about 8 minutes on 2 CPU cores, loss falling and reconstructions recovering structure. ``mae_vit_demo``, the ViT-MAE
# of the same width and depth, trains with the same preset.
_DEMO = dict(
    input_size=64, patch_size=8, epochs=25, warmup_epochs=1.0, blr=6e-3, min_lr=1e-5,
    num_workers=1, threads=1, log_every=10, save_every=320, save_every_epochs=5, eval_every=320,
)
PRESETS = {name: _DEMO if name in DEMO_MODELS else {} for name in MODELS}

_POSITIVE = ("input_size", "patch_size", "batch_size", "accum_iter", "epochs", "epoch_size", "eval_images",
             "log_every", "save_every", "save_every_epochs")
_NON_NEGATIVE = ("max_steps", "warmup_epochs", "warmup_steps", "min_lr", "weight_decay", "num_workers", "threads",
                 "eval_every")

# name: (type, help, choices); type "bool" gives --name / --no_name.
FLAGS = {
    **flags.ENGINE_FLAGS,
    "model": (str, "architecture and preset: CRATE-MAE (demo, crate_mae_*) or the ViT-MAE baselines (mae_vit_*); "
                   "'demo' (default) trains on CPU in minutes", tuple(MODELS)),
    "input_size": (int, "image side in pixels", None),
    "patch_size": (int, "patch side in pixels", None),
    "mask_ratio": (float, "fraction of patches masked", None),
    "norm_pix_loss": ("bool", "regress per-patch normalised pixels", None),
    "weight_decay": (float, "AdamW weight decay (not on biases, norms, 1-D parameters, cls/mask tokens)", None),
    "data_path": (str, "dataset root: ImageNet-style folder (with train/ and val/, or class folders), a folder of "
                       "unlabelled images, a folder holding cifar-10-batches-py / cifar-100-python, an Oxford "
                       "Flowers-102 or Oxford-IIIT Pets root (their photos), or WebDataset tar shards (a pattern "
                       "such as 'shards/train-{000000..000146}.tar'; the extra webdataset)", None),
    "dataset": (str, "dataset kind; auto: bundled scikit-image photos without --data_path, else detected", DATASETS),
    "epoch_size": (int, "random crops per epoch of the scikit-image photo dataset; images per epoch of WebDataset "
                        "shards that have no shards.json", None),
    "eval_images": (int, "images in the fixed evaluation batch (held-out images where the dataset has them)", None),
    "max_unreadable": (float, "fraction of image reads allowed to fail (each unreadable image is skipped with a "
                              "warning and replaced by another sample) before the run stops", None),
    "output_dir": (str, "where checkpoints, logs and images go", None),
    "seed": (int, "seed of initialisation, data order, augmentation and masking", None),
    "resume": (str, "checkpoint to start from: a training checkpoint continues its run, a weights-only one "
                    "(e.g. a release checkpoint) initialises the model", None),
    "eval_every": (int, "optimizer steps between coding-rate/sparsity measurements and reconstructions "
                        "(0: off)", None),
}


def build_parser() -> argparse.ArgumentParser:
    """MAE's flag names with underscores; hyphenated aliases are accepted too."""
    p = argparse.ArgumentParser(
        prog="crate-train", argument_default=argparse.SUPPRESS,
        description="CRATE-MAE masked-autoencoder pretraining (single process, or DDP under torchrun).",
    )
    add_flags(p, FLAGS, _shown_default)
    return p


def _shown_default(name: str) -> str:
    if name == "config":
        return ""
    if name in PRESETS["demo"]:
        return (f" (crate_mae_* and mae_vit_small/base: {DEFAULTS[name]}; demo, the default --model, and "
                f"mae_vit_demo: {PRESETS['demo'][name]})")
    return f" (default: {DEFAULTS[name]})"


def load_yaml(path: str) -> dict:
    """Flag values from a YAML mapping; unknown keys and wrong types are errors naming the key."""
    return flags.load_yaml(path, FLAGS)


def resolve(argv: list[str] | None = None, world_size: int = 1) -> dict:
    """Parse the command line (and ``--config``) into the full configuration, validated, with the absolute lr."""
    values = flags.given(build_parser(), FLAGS, argv)
    model = values.get("model", DEFAULTS["model"])
    cfg = {**DEFAULTS, **PRESETS[model], **values}
    validate(cfg)
    if cfg["lr"] is None:
        cfg["lr"] = cfg["blr"] * effective_batch(cfg, world_size) / 256
        cfg["lr_from_blr"] = True
    return cfg


def effective_batch(cfg: dict, world_size: int) -> int:
    return cfg["batch_size"] * cfg["accum_iter"] * world_size


def validate(cfg: dict) -> None:
    """Range checks; errors name the flag and what it expects."""
    flags.check_ranges(cfg, positive=_POSITIVE + ("blr", "lr", "clip_grad"), non_negative=_NON_NEGATIVE,
                       fractions=("max_unreadable",))
    if not 0.0 <= cfg["mask_ratio"] < 1.0:
        raise ConfigError(f"--mask_ratio must lie in [0, 1), got {cfg['mask_ratio']}")
    if cfg["input_size"] % cfg["patch_size"]:
        raise ConfigError(f"--input_size ({cfg['input_size']}) must be a multiple of --patch_size "
                          f"({cfg['patch_size']})")
    if cfg["model"] not in MODELS:
        raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {cfg['model']!r}")
    if not cfg["output_dir"]:
        raise ConfigError("--output_dir must not be empty")


def save_yaml(cfg: dict, path: str, header: str = "") -> str:
    """The resolved configuration as YAML text (returned, and written to ``path``); see ``flags.save_yaml``."""
    return flags.save_yaml(cfg, FLAGS, path, header)

