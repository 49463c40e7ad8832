"""Fine-tuning of a pretrained encoder: ``python -m crate_kernels.finetune [CHECKPOINT_OR_RUN]`` (``--help``).

MAE's recipe (facebookresearch/mae, main_finetune.py): the encoder with MAE's pooling and a linear head
(``crate_kernels.models.classifier``), trained end to end with AdamW (betas 0.9, 0.999), layer-wise lr decay (0.75; 0.65
for base models), linear warmup then half-cycle cosine, label smoothing 0.1, and at 128 px and above
RandomResizedCrop(0.08, 1), RandAugment (MAE's rand-m9-mstd0.5-inc1: 2 operations, magnitude about 9 of 10), random
erasing (p 0.25) and mixup 0.8 / cutmix 1.0 (one of the two per batch, switch probability 0.5), evaluated on centre
crops of 0.875. Top-1 and top-5 on the test split after every epoch; the best model is kept. It runs on the
pretraining engine (``crate_kernels.pipeline.run``): the same atomic checkpoints, exact resume, stop signals, AMP,
torchrun/DDP and logs. The recipe's pieces live in ``crate_kernels.pipeline.recipe``; this module holds the command.

MAE's command-line flags are accepted where they mean the same thing: ``--finetune PATH`` (the positional checkpoint),
``--global_pool`` / ``--cls_token`` (``--pool mean`` / ``cls``), ``--nb_classes`` (checked against the data), ``--aa
rand-m9-mstd0.5-inc1`` (RandAugment's settings), ``--eval`` (test a fine-tuned checkpoint and exit), ``--dist_eval``
and ``--start_epoch``. The pooling default is [CLS] (``--pool cls``), the paper's CRATE-MAE protocol (the encoder's
[CLS] output is the image feature); MAE's main_finetune.py defaults to ``--global_pool`` instead.

Supervised CRATE (the release's ``model/crate.py``, ``crate_kernels.CRATE``) trains on the same engine:
``--model crate_small`` without a checkpoint trains it from random initialisation, and a supervised checkpoint (the
release's main.py ``{'state_dict': ...}`` file, or a run of this command) is fine-tuned with a fresh head, as the
release's finetune.py does. Their recipes are the release's two scripts: ``crate_imagenet`` (main.py) and
``crate_cifar`` (finetune.py): the default for supervised CRATE is crate_cifar when fine-tuning a checkpoint (the
release's fine-tuning script, on any data) and, from scratch, crate_cifar on CIFAR and the bundled sets, else
crate_imagenet; see ``RECIPES``.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os

import torch
import torch.nn.functional as F

from . import checkpoint
from .errors import ConfigError, DatasetError, TrainError
from .models.classifier import EncoderClassifier
from .models.pretrained import Pretrained, load_pretrained, supervised_classifier
from .models.registry import DEMO_MODELS, SUPERVISED_MODELS
from .ops.backend import get_backend
from .pipeline import distributed, flags, run
from .pipeline.data import (
    EvalTransform,
    LabelledTrainViews,
    LabelledViews,
    TrainTransform,
    UnreadableImages,
    build_labelled,
    collate_labelled,
    collate_views,
    counted,
    default_num_workers,
    labels_of,
    normalize,
    resolve_labelled,
    stop_workers,
)
from .pipeline.recipe import ImageAugment, layer_decay_groups, mix_batch, randaug_settings

# MAE's fine-tuning defaults (main_finetune.py); the recipe-dependent ones are None and resolved per model and size.
DEFAULTS = dict(
    flags.ENGINE_DEFAULTS, checkpoint="./output_dir", model=None, input_size=None, pool="cls",
    epochs=50, warmup_epochs=5.0, blr=1e-3, min_lr=1e-6, layer_decay=None,
    smoothing=0.1, mixup=None, cutmix=None, mixup_switch_prob=0.5, recipe="auto", randaug_m=None, randaug_n=2,
    randaug_mstd=None, randaug_inc=None, reprob=None, nb_classes=None, eval=False, dist_eval=True, start_epoch=0,
    output_dir=None, patch_size=None, opt="adamw",
)

# After the default pretraining (the demo CRATE-MAE on 64 px crops), on the bundled digits: minutes on 2 cores.
DEMO = dict(epochs=40, warmup_epochs=2.0, blr=1e-2, threads=1, num_workers=1, log_every=20, save_every_epochs=10)
# Supervised crate_demo from scratch (only) on the bundled digits (32 px, patch 4), 30 epochs on 2 cores: 91.3%
# top-1 in 71 s; 68.1% with blr 2e-3, 79.2% with RandAugment on (the crate_cifar recipe's: the 8 x 8 digits,
# upscaled, lose too much to it).
SCRATCH_DEMO = dict(epochs=30, warmup_epochs=2.0, blr=1e-2, randaug_m=0, threads=1, num_workers=1, log_every=20,
                    save_every_epochs=10)

# What each augmentation recipe sets: RandomResizedCrop's smallest area, RandAugment magnitude (timm's 0-10 scale,
# 0: off), random erasing probability, mixup and cutmix alphas (0: off), and the evaluation crop. On the demo
# (digits at 64 px) mixing cost 4.9 points of top-1 (87.9% against 92.8% without, 40 epochs), so small inputs go
# without it.
# The supervised CRATE release's two scripts (Ma-Lab-Berkeley/CRATE) also set the training defaults (``train``,
# flags given win), the size and patch of a model trained from scratch, and decay every parameter (``decay_all``):
#   crate_imagenet, main.py: RandomResizedCrop(0.08, 1) + flip, label smoothing 0.1, AdamW at lr 4e-4 for batch 256,
#     weight decay 0.1 (its defaults), 20 warmup epochs then cosine to 0, eval on the 0.875 centre crop, 200 epochs
#     (its README's command, which uses Lion: see LION); 224 px, patch 16.
#   crate_cifar, finetune.py: RandomResizedCrop(0.08, 1) + flip + RandAugment(n 2, m 14 of torchvision's 30, i.e.
#     14 / 3 on timm's 10; kornia's operations, not torchvision's exact set), AdamW at lr 1e-4 for batch 50, weight
#     decay 0.01, cosine from the first step (no warmup) to 0, no label smoothing, full eval view, 400 epochs; from
#     scratch 32 px, patch 4 (its --patch default; the script itself resizes CIFAR to 224 px for the patch-16
#     factories: pass --input_size 224 --patch_size 16 for that). Neither uses layer decay. These are the script's
#     defaults; its README's fine-tuning command differs: batch 256, lr 5e-5, 200 epochs (--blr 5e-5 --epochs 200).
# The lr is set as a base lr (lr = blr x effective batch / 256) equal to the release's at the release's batch. Both
# scripts train with fp16 autocast and loss scaling; --amp auto takes bf16 where the GPU has it (--amp fp16: theirs).
RECIPES = {
    "mae": dict(min_crop=0.08, randaug_m=9, randaug_mstd=0.5, randaug_inc=True, reprob=0.25, mixup=0.8, cutmix=1.0,
                crop_pct=0.875),
    "small": dict(min_crop=0.35, randaug_m=0, randaug_mstd=0.0, randaug_inc=False, reprob=0.0, mixup=0.0, cutmix=0.0,
                  crop_pct=1.0),
    "crate_imagenet": dict(min_crop=0.08, randaug_m=0, randaug_mstd=0.0, randaug_inc=False, reprob=0.0, mixup=0.0,
                           cutmix=0.0, crop_pct=0.875, input_size=224, patch_size=16, decay_all=True,
                           train=dict(epochs=200, warmup_epochs=20.0, blr=4e-4, min_lr=0.0, weight_decay=0.1,
                                      smoothing=0.1, layer_decay=1.0)),
    "crate_cifar": dict(min_crop=0.08, randaug_m=14 / 3, randaug_mstd=0.0, randaug_inc=False, reprob=0.0, mixup=0.0,
                        cutmix=0.0, crop_pct=1.0, input_size=32, patch_size=4, decay_all=True,
                        train=dict(epochs=400, warmup_epochs=0.0, blr=1e-4 * 256 / 50, min_lr=0.0,
                                   weight_decay=0.01, smoothing=0.0, layer_decay=1.0)),
}
FULL_RECIPE_SIZE = 128  # --recipe auto: mae at this input size and above, small below it
SMALL_IMAGE_SETS = ("cifar10", "cifar100", "digits", "faces")  # --recipe auto from scratch: crate_cifar
# --opt lion: the release's Lion settings (its README's ImageNet command: lr 2e-4 at batch 512, weight decay 0.05),
# unless given; the optimizer is lion-pytorch's (the release's), with its default betas (0.9, 0.99).
LION = dict(blr=2e-4 * 256 / 512, weight_decay=0.05)

# Settings a resumed fine-tuning run must share with the interrupted one.
RESUME_KEYS = ("checkpoint", "model", "dataset", "data_path", "input_size", "pool", "batch_size", "accum_iter",
               "epochs", "max_steps", "warmup_epochs", "warmup_steps", "blr", "lr", "min_lr", "weight_decay",
               "layer_decay", "clip_grad", "smoothing", "mixup", "cutmix", "mixup_switch_prob", "recipe",
               "randaug_m", "randaug_n", "randaug_mstd", "randaug_inc", "reprob", "seed", "amp", "patch_size", "opt")

FLAGS = {
    **flags.ENGINE_FLAGS,
    **flags.CHECKPOINT_FLAGS,
    **flags.LABELLED_FLAGS,
    "model": (str, "architecture, when the checkpoint does not name it; a supervised CRATE (crate_demo, crate_tiny "
                   "... crate_large) without a checkpoint trains from random initialisation",
              flags.CHECKPOINT_FLAGS["model"][2]),
    "patch_size": (int, "patch side of a supervised CRATE trained from scratch (unset: the recipe's, 16 or 4; a "
                        "checkpoint's is its own)", None),
    "opt": (str, "optimizer: AdamW, or Lion (lion-pytorch, the extra lion; unset --blr and --weight_decay take the "
                 "release's Lion settings, 1e-4 and 0.05)", ("adamw", "lion")),
    "weight_decay": (float, "AdamW weight decay (not on biases, norms, 1-D parameters, cls token)", None),
    "layer_decay": (float, "layer-wise lr decay: layer l of L gets lr x decay^(L + 1 - l) (unset: 0.65 for base "
                           "models, else 0.75)", None),
    "smoothing": (float, "label smoothing", None),
    "mixup": (float, "mixup alpha (0: off; unset: the recipe's, 0.8 or 0)", None),
    "cutmix": (float, "cutmix alpha (0: off; unset: the recipe's, 1.0 or 0)", None),
    "mixup_switch_prob": (float, "probability of cutmix instead of mixup for a batch when both are on", None),
    "recipe": (str, f"augmentation; mae: RandomResizedCrop(0.08, 1), RandAugment, random erasing, mixup / cutmix, "
                    f"0.875 eval crop; small: RandomResizedCrop(0.35, 1), no mixing, full eval view; crate_imagenet "
                    f"and crate_cifar: the supervised CRATE release's main.py and finetune.py (augmentation and "
                    f"training defaults); auto: for masked-autoencoder checkpoints mae from {FULL_RECIPE_SIZE} px, "
                    f"else small; for supervised CRATE crate_cifar when fine-tuning a checkpoint, and from scratch "
                    f"crate_cifar on CIFAR and the bundled sets, else crate_imagenet", ("auto", *RECIPES)),
    "randaug_m": (float, "RandAugment magnitude on timm's 0-10 scale (0: off; unset: the recipe's, 9, 14 / 3 or 0)",
                  None),
    "randaug_n": (int, "RandAugment operations per image", None),
    "randaug_mstd": (float, "RandAugment magnitude noise: each image draws its magnitude from N(m, mstd^2), clipped "
                            "to 0..10 (0: fixed; 100 or more: uniform in 0..m, timm's 'inf'; unset: the recipe's, 0.5 "
                            "or 0)", None),
    "randaug_inc": ("bool", "RandAugment's increasing operations (timm's inc1): colour, contrast, brightness and "
                            "sharpness factors grow from 1 (identity) to 1.9 with the magnitude instead of spanning "
                            "0.1-1.9 (unset: the recipe's, on or off)", None),
    "aa": (str, "MAE's RandAugment string, timm's grammar rand[-m<magnitude>][-n<operations>][-mstd<std>][-inc<0|1>] "
                "(e.g. rand-m9-mstd0.5-inc1, MAE's default): sets --randaug_m, --randaug_n, --randaug_mstd and "
                "--randaug_inc; 'none' turns RandAugment off", None),
    "reprob": (float, "random erasing probability (unset: the recipe's, 0.25 or 0)", None),
    "max_unreadable": (float, "fraction of image reads allowed to fail (a training image is replaced by another "
                              "with its own label, a test image is left out) before the run stops", None),
    "output_dir": (str, "where checkpoints, logs and results go (unset: finetune/ beside the checkpoint)", None),
    "seed": (int, "seed of the head's initialisation, data order, augmentation and mixing", None),
    "resume": (str, "a fine-tuning checkpoint to continue (its run's settings are required)", None),
    "eval": ("bool", "MAE's --eval: test a fine-tuned checkpoint (--resume PATH, else the positional one: a "
                     "crate-finetune run, its model.safetensors, model-best.safetensors or checkpoint-*.pth) on the "
                     "test split, print top-1 (and top-5) and exit; nothing is trained or written", None),
    "dist_eval": ("bool", "under torchrun, each process tests its share of the test split (exact: no image twice) "
                          "and the counts are summed (off: every process tests the whole split, MAE's default "
                          "without --dist_eval)", None),
    "start_epoch": (int, "MAE's --start_epoch N: a run that resumes no training state starts at epoch N's first "
                         "step (its lr and data order; the weights are the checkpoint's, the optimizer fresh); "
                         "exact resume (checkpoint-last.pth, --resume) restores the step itself and overrides it",
                    None),
    **flags.MAE_ALIASES,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crate-finetune", argument_default=argparse.SUPPRESS,
        description="Fine-tune a pretrained CRATE-MAE or ViT-MAE encoder with MAE's recipe (single process, or DDP "
                    "under torchrun).",
    )
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT_OR_RUN",
                   help="a crate-train run directory, a checkpoint-*.pth, a model.safetensors, or a release .pth of "
                        f"CRATE-MAE or ViT-MAE, or a supervised CRATE checkpoint (default: {DEFAULTS['checkpoint']}; "
                        "none with a supervised --model: random initialisation)")
    flags.add_flags(p, FLAGS, _shown_default)
    return p


def _shown_default(name: str) -> str:
    if DEFAULTS.get(name) is None:
        return ""
    if name in DEMO:
        return (f" (default: {DEFAULTS[name]}; after a demo pretraining: {DEMO[name]}"
                + (f"; crate_demo from scratch: {SCRATCH_DEMO[name]})" if name in SCRATCH_DEMO else ")"))
    return f" (default: {DEFAULTS[name]})"


def resolve(argv: list[str] | None = None, world_size: int = 1) -> dict:
    """Flags (and --config YAML) -> the configuration, range-checked; what depends on the checkpoint (demo
    settings, input size, layer decay, recipe, lr) is filled in by ``complete``."""
    values = flags.apply_mae_aliases(flags.given(build_parser(), {**FLAGS, "checkpoint": (str, "", None)}, argv))
    if "aa" in values:
        aa = values.pop("aa")
        values.update(randaug_settings(aa, values))
    cfg = {**DEFAULTS, **values, "given": sorted(values), "world_size": world_size}
    flags.check_ranges(cfg, positive=("input_size", "batch_size", "accum_iter", "epochs", "blr", "lr", "layer_decay",
                                      "log_every", "save_every", "save_every_epochs", "randaug_n", "nb_classes",
                                      "patch_size"),
                       non_negative=("max_steps", "warmup_epochs", "warmup_steps", "min_lr", "weight_decay",
                                     "clip_grad", "mixup", "cutmix", "num_workers", "threads", "randaug_m",
                                     "randaug_mstd", "start_epoch"),
                       fractions=("smoothing", "mixup_switch_prob", "reprob", "max_unreadable"))
    if cfg["layer_decay"] is not None and cfg["layer_decay"] > 1:
        raise ConfigError(f"--layer_decay must lie in (0, 1], got {cfg['layer_decay']}")
    if cfg["randaug_m"] is not None and cfg["randaug_m"] > 10:
        raise ConfigError(f"--randaug_m must lie in 0..10 (timm's scale), got {cfg['randaug_m']}")
    if cfg["start_epoch"] and cfg["start_epoch"] >= cfg["epochs"]:
        raise ConfigError(f"--start_epoch ({cfg['start_epoch']}) must be below --epochs ({cfg['epochs']})")
    return cfg


def complete(cfg: dict, pretrained: Pretrained | None) -> tuple[dict, Pretrained]:
    """The settings that depend on the checkpoint (``pretrained``; None: a supervised CRATE ``--model`` from random
    initialisation): the recipe and its training defaults, the demo preset for the demo models (flags given still
    win), the input size and patch, the layer decay, the absolute lr and the output directory; under --eval, the
    pooling of the fine-tuned checkpoint (a --pool that contradicts it is an error). Returns the configuration and
    the checkpoint (for random initialisation, one holding no weights)."""
    given = set(cfg.pop("given"))
    name = pretrained.model if pretrained is not None else cfg["model"]
    supervised = name in SUPERVISED_MODELS
    cfg["dataset"] = resolve_labelled(cfg["dataset"], cfg["data_path"])
    if cfg["eval"]:
        pool = (pretrained.pool or "cls") if supervised else ("mean" if "fc_norm.weight" in pretrained.state else "cls")
        if "pool" in given and cfg["pool"] != pool:
            raise ConfigError(f"--pool {cfg['pool']} contradicts {pretrained.source}, fine-tuned with --pool {pool}")
        cfg["pool"] = pool
    if supervised and pretrained is not None and "pool" not in given:
        cfg["pool"] = pretrained.pool or "cls"  # the pooling the checkpoint was trained with, where it says
    if cfg["recipe"] == "auto" and supervised:  # fine-tuning: the release's finetune.py; from scratch: by the data
        small = pretrained is not None or cfg["dataset"] in SMALL_IMAGE_SETS
        cfg["recipe"] = "crate_cifar" if small else "crate_imagenet"
    recipe = RECIPES.get(cfg["recipe"], {})
    demo = name in DEMO_MODELS
    preset = (SCRATCH_DEMO if demo and pretrained is None else {}) if supervised else DEMO if demo else {}
    defaults = {**recipe.get("train", {}), **preset, **(LION if cfg["opt"] == "lion" else {})}
    cfg.update({k: v for k, v in defaults.items() if k not in given})
    if cfg["opt"] == "lion" and importlib.util.find_spec("lion_pytorch") is None:
        raise ConfigError("--opt lion needs lion-pytorch (the release's Lion): pip install 'crate_kernels[lion]'")
    cfg["model"] = name
    if pretrained is None:
        cfg["checkpoint"] = None
        cfg["patch_size"] = cfg["patch_size"] or recipe.get("patch_size", 16)
        cfg["input_size"] = cfg["input_size"] or recipe.get("input_size", 224)
        pretrained = Pretrained.from_scratch(name, cfg["input_size"], cfg["patch_size"])
    else:
        if cfg["patch_size"] not in (None, pretrained.patch_size):
            raise ConfigError(f"--patch_size {cfg['patch_size']} contradicts {pretrained.source}, whose patch is "
                              f"{pretrained.patch_size}")
        cfg["checkpoint"] = os.path.abspath(cfg["checkpoint"])
        cfg["patch_size"] = pretrained.patch_size
        cfg["input_size"] = cfg["input_size"] or pretrained.img_size
    if cfg["input_size"] % cfg["patch_size"]:
        whose = "the checkpoint's" if cfg["checkpoint"] else "the"
        raise ConfigError(f"--input_size ({cfg['input_size']}) must be a multiple of {whose} patch size "
                          f"({cfg['patch_size']})")
    if cfg["layer_decay"] is None:
        cfg["layer_decay"] = 0.65 if "base" in name else 0.75
    if cfg["recipe"] == "auto":
        cfg["recipe"] = "mae" if cfg["input_size"] >= FULL_RECIPE_SIZE else "small"
    for key in ("randaug_m", "randaug_mstd", "randaug_inc", "reprob", "mixup", "cutmix"):
        if cfg[key] is None:
            cfg[key] = RECIPES[cfg["recipe"]][key]
    if cfg["lr"] is None:
        cfg["lr"] = cfg["blr"] * cfg["batch_size"] * cfg["accum_iter"] * cfg.pop("world_size") / 256
        cfg["lr_from_blr"] = True
    else:
        cfg.pop("world_size")
    cfg["output_dir"] = cfg["output_dir"] or (checkpoint.folder_beside(cfg["checkpoint"], "finetune")
                                              if cfg["checkpoint"] else os.path.abspath(f"output_{name}"))
    return cfg, pretrained


class Finetuner(run.Run):
    """One fine-tuning run (one process of it under torchrun)."""

    program = "crate-finetune"
    recipe_keys = RESUME_KEYS
    strict_recipe = True
    betas = (0.9, 0.999)

    def __init__(self, cfg: dict, dist, pretrained: Pretrained):
        self.pretrained = pretrained
        self.best = {"top1": -1.0}
        super().__init__(cfg, dist)

    # ------------------------------------------------------------------ set-up
    def build_data(self) -> None:
        cfg = self.cfg
        recipe = RECIPES[cfg["recipe"]]
        size = cfg["input_size"]
        train = build_labelled(cfg["dataset"], cfg["data_path"], TrainTransform(size, scale=(recipe["min_crop"], 1.0)),
                               "train")
        test = build_labelled(cfg["dataset"], cfg["data_path"], EvalTransform(size, recipe["crop_pct"]), "test")
        unseen = sorted(set(labels_of(test)) - set(labels_of(train)))
        if unseen:
            names = [test.classes[c] for c in unseen[:10]]
            raise DatasetError(f"{test.describe()} holds classes with no training image: {', '.join(names)}")
        self.classes = train.classes
        flags.check_nb_classes(cfg["nb_classes"], len(self.classes), train.describe())
        self.test_desc = test.describe()
        if cfg["eval"]:  # no training loader: only the test split is read
            self.num_workers = default_num_workers() if cfg["num_workers"] is None else cfg["num_workers"]
        else:
            augment = (ImageAugment(cfg["randaug_n"], cfg["randaug_m"], cfg["reprob"], cfg["randaug_mstd"],
                                    cfg["randaug_inc"]) if cfg["randaug_m"] or cfg["reprob"] else None)
            self.make_loader(LabelledTrainViews(train, augment), collate_views, train.describe())
        # the test split, each rank its share (--dist_eval) or all of it; the loader's own generator seeds its
        # workers, so starting them draws nothing from the global generator that mixing uses (a resumed run starts
        # them at another step)
        share = (range(self.dist.rank, len(test), self.dist.world_size) if cfg["dist_eval"] else range(len(test)))
        shard = torch.utils.data.Subset(LabelledViews(test), share)
        self.test_loader = torch.utils.data.DataLoader(
            shard, batch_size=cfg["batch_size"], shuffle=False, num_workers=self.num_workers,
            collate_fn=collate_labelled, pin_memory=cfg["pin_mem"] and self.device.type == "cuda",
            persistent_workers=self.num_workers > 0, worker_init_fn=run.leave_stop_signals_to_the_main,
            generator=torch.Generator().manual_seed(cfg["seed"]),
        )

    def build_model(self) -> torch.nn.Module:
        self.load_summary, cfg = [], self.cfg
        if self.pretrained.family == "supervised":
            model = supervised_classifier(self.pretrained, None if cfg["eval"] else len(self.classes),
                                          cfg["input_size"], cfg["pool"], cfg["backend"], log=self.load_summary.append)
            if model.num_classes != len(self.classes):
                raise ConfigError(f"--eval: {self.pretrained.source} was trained for {model.num_classes} classes, the "
                                  f"data has {len(self.classes)}")
            return model.set_grad_checkpointing(cfg["grad_checkpointing"]).train()
        model = EncoderClassifier.from_pretrained(self.pretrained, len(self.classes), self.cfg["pool"] == "mean",
                                                  backend=self.cfg["backend"], log=self.load_summary.append)
        model.pos_embed.requires_grad_(True)  # fine-tuned from the sin-cos table, as MAE does
        if self.cfg["eval"]:
            head = self.pretrained.state.get("head.weight")
            if head is None or head.ndim != 2:
                raise TrainError(f"--eval needs a fine-tuned checkpoint (crate-finetune's model.safetensors, "
                                 f"model-best.safetensors or checkpoint-*.pth): {self.pretrained.source} holds no "
                                 "classification head")
            if head.shape[0] != len(self.classes):
                raise ConfigError(f"--eval: {self.pretrained.source} was fine-tuned for {head.shape[0]} classes, the "
                                  f"data has {len(self.classes)}")
        return model.set_grad_checkpointing(self.cfg["grad_checkpointing"]).train()

    def param_groups(self) -> list[dict]:
        return layer_decay_groups(self.model, self.cfg["weight_decay"], self.cfg["layer_decay"],
                                  RECIPES[self.cfg["recipe"]].get("decay_all", False))

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        if self.cfg["opt"] == "lion":
            from lion_pytorch import Lion  # the optional extra lion, checked by complete()

            return Lion(groups, lr=self.cfg["lr"])
        return super().make_optimizer(groups)

    def batch_loss(self, model, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        imgs, targets = mix_batch(imgs, labels, len(self.classes), cfg["mixup"], cfg["cutmix"],
                                  cfg["mixup_switch_prob"], cfg["smoothing"])
        logits = model(imgs)
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    # ------------------------------------------------------------------ evaluation and outputs
    def evaluate(self, epoch_end: bool, final: bool) -> None:
        if epoch_end or final:
            self.test()

    def test(self) -> dict:
        """``measure()``; the best top-1 so far keeps model-best.safetensors, and the scores are logged."""
        scores = self.measure()
        epoch = (self.step - 1) // self.steps_per_epoch
        better = scores["top1"] > self.best["top1"]
        if better:
            self.best = {"top1": scores["top1"], "top5": scores.get("top5"), "step": self.step, "epoch": epoch}
            self.on_main(lambda: self.write(checkpoint.save_safetensors, self.model.state_dict(),
                                            os.path.join(self.out, "model-best.safetensors"),
                                            metadata=self._metadata()))
        failed = scores["unreadable_test_images"]
        self.monitor.scores(self.step, epoch, scores,
                            f"test epoch {epoch}: {self.score_line(scores)}; best top-1 {self.best['top1']:.2f}% "
                            f"(epoch {self.best['epoch']})" + (f"; {failed} unreadable left out" if failed else ""))
        return scores

    @staticmethod
    def score_line(scores: dict) -> str:
        top5 = f", top-5 {scores['top5']:.2f}%" if "top5" in scores else ""
        return (f"top-1 {scores['top1']:.2f}%{top5}, loss {scores['eval_loss']:.4f} on "
                f"{counted(scores['test_images'], 'image')}")

    def measure(self) -> dict:
        """Top-1, top-5 (with more than 5 classes) and cross-entropy on the whole test split (with --dist_eval each
        rank its share, the counts summed; else each rank all of it; unreadable images left out and counted)."""
        self.model.eval()
        counts = torch.zeros(4, dtype=torch.float64, device=self.device)  # top-1, top-5, loss sum, images
        tally = UnreadableImages(self.cfg["max_unreadable"], self.warn, min_reads=len(self.test_loader.dataset),
                                 outcome="left out of the test")  # a fraction of the split
        error, k = None, min(5, len(self.classes))
        with torch.no_grad():
            for imgs, labels, _, failures in self.test_loader:
                try:
                    tally.add(failures, len(labels))
                except DatasetError as e:
                    error = e
                    break
                if imgs is None:
                    continue
                imgs, labels = normalize(imgs.to(self.device)), labels.to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.model(imgs).float()
                top = logits.topk(k, dim=-1).indices
                counts[0] += (top[:, 0] == labels).sum()
                counts[1] += (top == labels.unsqueeze(1)).any(dim=1).sum()
                counts[2] += F.cross_entropy(logits, labels, reduction="sum")
                counts[3] += len(labels)
        self.model.train()
        self.agree(error)
        sharded = self.cfg["dist_eval"]
        counts = (self.dist.sum(counts) if sharded else counts).tolist()
        failed = sum(self.dist.gather(tally.failed)) if sharded else tally.failed
        if counts[3] == 0:
            raise DatasetError(f"no readable image in {self.test_desc}")
        scores = {"top1": 100.0 * counts[0] / counts[3], "eval_loss": counts[2] / counts[3],
                  "test_images": int(counts[3]), "unreadable_test_images": failed}
        if len(self.classes) > 5:
            scores["top5"] = 100.0 * counts[1] / counts[3]
        return scores

    def resume_source(self) -> tuple[str, dict] | None:
        """As ``Run.resume_source``; with MAE's --start_epoch N and no training state to resume, the run starts at
        epoch N's first step (a training state's own step takes precedence, as in MAE)."""
        source = super().resume_source()
        start = self.cfg["start_epoch"]
        if start and source is not None and "optimizer" in source[1]:
            self.say(f"note: --start_epoch {start} is not used: {source[0]} resumes its own step")
        elif start:
            if start * self.steps_per_epoch >= self.total_steps:
                raise ConfigError(f"--start_epoch {start} starts at step {start * self.steps_per_epoch}, past the "
                                  f"run's {self.total_steps} steps")
            self.step = start * self.steps_per_epoch
        return source

    def extra_state(self) -> dict:
        return {"best": self.best}

    def load_extra_state(self, state: dict) -> None:
        self.best = state.get("best", self.best)

    def _metadata(self) -> dict:
        return {"model": self.cfg["model"], "family": self.pretrained.family, "classes": json.dumps(self.classes),
                "pool": self.cfg["pool"], "input_size": str(self.cfg["input_size"]),
                "patch_size": str(self.cfg["patch_size"]), "step": str(self.step)}

    def finish(self) -> dict:
        last = self.monitor.evals[-1] if self.monitor.evals else {}  # the final step was tested
        summary = {"step": self.step, "loss": self.last_loss, "final": {k: last.get(k) for k in ("top1", "top5")},
                   "best": self.best, "test": self.test_desc, "model": self.pretrained.describe()}
        def write_outputs():
            self.write(checkpoint.save_safetensors, self.model.state_dict(),
                       os.path.join(self.out, "model.safetensors"), metadata=self._metadata())
            self.write(checkpoint.save_json, summary, os.path.join(self.out, "results.json"))

        self.on_main(write_outputs)
        self.publish({"model": self.cfg["model"], "classes": self.classes})
        top5 = f", top-5 {last['top5']:.2f}%" if last.get("top5") is not None else ""
        self.say(f"final: top-1 {last.get('top1', float('nan')):.2f}%{top5}; best top-1 {self.best['top1']:.2f}% at "
                 f"epoch {self.best['epoch']} (model-best.safetensors)")
        return summary

    def save_config(self, path: str, header: str) -> None:
        flags.save_yaml(self.cfg, {"checkpoint": None, **FLAGS}, path, header)

    def banner(self) -> str:
        cfg = self.cfg
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp]
        augment = (f"RandomResizedCrop({RECIPES[cfg['recipe']]['min_crop']}, 1) + flip"
                   + (f", RandAugment(n {cfg['randaug_n']}, m {cfg['randaug_m']:g}, mstd {cfg['randaug_mstd']:g}"
                      + (", increasing)" if cfg["randaug_inc"] else ")") if cfg["randaug_m"] else "")
                   + (f", random erasing {cfg['reprob']}" if cfg["reprob"] else "")
                   + (f", mixup {cfg['mixup']} / cutmix {cfg['cutmix']}" if cfg["mixup"] or cfg["cutmix"] else "")
                   + f", label smoothing {cfg['smoothing']}")
        return (
            f"crate-finetune: {self.load_summary[0] if self.load_summary else self.pretrained.describe()}\n"
            f"  data: {self.data_desc}, {counted(self.num_workers, 'loading worker')}; test: {self.test_desc}\n"
            f"  {cfg['input_size']}px, backend {cfg['backend'] or get_backend()}; {cfg['recipe']} recipe: {augment}\n"
            f"  {counted(self.dist.world_size, 'process')} on {self.device}, amp {amp}; effective batch "
            f"{self.global_batch}, {'Lion' if cfg['opt'] == 'lion' else 'AdamW'} lr {cfg['lr']:.3g} (layer decay "
            f"{cfg['layer_decay']}), weight decay {cfg['weight_decay']}"
            f"{' on every parameter' if RECIPES[cfg['recipe']].get('decay_all') else ''}, "
            f"{counted(self.total_steps, 'step')} ({self.steps_per_epoch} per epoch), warmup {self.warmup_steps}\n"
            f"  output: {self.out}" + (f" (resuming at step {self.step})" if self.step else "")
            + f"; TensorBoard: {self.monitor.tensorboard}"
        )

    def close(self) -> None:
        if hasattr(self, "test_loader"):
            stop_workers(self.test_loader)
        super().close()


def finetune(cfg: dict) -> dict:
    """Fine-tune with a configuration from ``resolve`` (a supervised CRATE ``--model`` without a checkpoint: train
    it from random initialisation); returns the summary (final and best top-1/top-5). With --eval, test the
    fine-tuned checkpoint instead and return its scores."""
    source = cfg["resume"] if cfg["eval"] and cfg["resume"] else cfg["checkpoint"]
    own_run = cfg["model"] in SUPERVISED_MODELS and "checkpoint" not in cfg["given"]
    if own_run and cfg["eval"] and not cfg["resume"]:
        source = cfg["checkpoint"] = os.path.abspath(f"output_{cfg['model']}")  # where training from scratch wrote
    scratch = own_run and not cfg["eval"]
    pretrained = None if scratch else load_pretrained(source, cfg["model"])
    cfg, pretrained = complete(dict(cfg), pretrained)
    if cfg["eval"]:
        return evaluate_only(cfg, pretrained)
    return run.launch(cfg, functools.partial(Finetuner, pretrained=pretrained))


def evaluate_only(cfg: dict, pretrained: Pretrained) -> dict:
    """MAE's --eval: the fine-tuned classifier of ``pretrained`` (head included) on the test split, each process its
    share under torchrun with --dist_eval; prints one line and returns the scores. No output directory, lock, log or
    checkpoint is written."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dist = distributed.init(cfg["device"], cfg["dist_backend"])
    job = None
    try:
        run.check_backend(cfg["backend"], dist.device)
        job = Finetuner(cfg, dist, pretrained)
        scores = job.measure()
        job.say(f"crate-finetune --eval: {pretrained.source} ({job.model.describe()}); test: {job.test_desc}\n"
                f"  {job.score_line(scores)}"
                + (f"; {scores['unreadable_test_images']} unreadable left out" if scores["unreadable_test_images"]
                   else ""))
        return scores
    finally:
        if job is not None:
            job.close()
        job = None  # its DDP wrapper holds the process group: shutdown() below frees both
        distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``python -m crate_kernels.finetune``: 0 done, 1 failed, 2 bad arguments, 128 + signal when stopped."""
    return flags.command_main("crate-finetune", lambda a: resolve(a, distributed.world_size_from_env()), finetune, argv,
                              flags.RESUME_HINT)


if __name__ == "__main__":
    raise SystemExit(main())
