"""Command-line flags of every command (train, finetune, probe, analyze): MAE's flag names with underscores
(hyphenated spellings accepted), ``--no_<flag>`` for booleans, a YAML ``--config`` whose keys are the flag names,
``ConfigError`` messages that name the flag, and ``command_main``, the one entry point (error lines, exit codes).

A flag table maps name -> (type, help, choices); type ``"bool"`` gives ``--name`` / ``--no_name``. The flags that
several commands share are defined once here: ``COMMON_FLAGS`` (every command), ``CHECKPOINT_FLAGS`` (the commands
that read a pretrained checkpoint), ``LABELLED_FLAGS`` (probe and finetune) and ``ENGINE_FLAGS`` (the training
engine's, train and finetune); a command's table is ``{**shared, **own}``, its own entries overriding.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from collections.abc import Callable

import yaml

from ..checkpoint import atomic_write
from ..errors import ConfigError, DatasetError, StopRequested, TrainError
from ..models.hub import hub_available
from ..models.registry import CHECKPOINT_MODELS
from ..ops.backend import BACKENDS
from .data import LABELLED_DATASETS

# Every flag table is rows of one shape, "name": (type, help, choices); a flag two commands share with the same
# meaning lives in one of the tables below, so the rows alike in shape across the commands' tables (as
# `duplicates` pairs them) are different flags, not repeated code.
COMMON_FLAGS = {
    "config": (str, "YAML file of flag values (keys as the flag names); command-line flags override it", None),
    "device": (str, "auto, cpu, cuda or cuda:N", None),
    "backend": (str, "CRATE operator backend (crate_kernels.ops); unset: $CRATE_KERNELS_BACKEND, else auto",
                BACKENDS),
}

CHECKPOINT_FLAGS = {
    "model": (str, "architecture, when the checkpoint does not name it (a release .pth whose shape fits several)",
              CHECKPOINT_MODELS),
    "input_size": (int, "image side, a multiple of the checkpoint's patch size (unset: its pretraining size; the "
                        "position table is interpolated)", None),
}

LABELLED_FLAGS = {
    "dataset": (str, "labelled dataset; auto: the bundled digits without --data_path, else the layout found there",
                LABELLED_DATASETS),
    "data_path": (str, "dataset root: train/ and val/ class folders, cifar-10-batches-py / cifar-100-python, "
                       "Oxford Flowers-102 (jpg/, imagelabels.mat, setid.mat) or Oxford-IIIT Pets (images/, "
                       "annotations/)", None),
    "pool": (str, "the image feature: [CLS] after the final norm (cls: the paper's CRATE-MAE protocol; MAE's "
                  "main_linprobe.py default) or the fc-normed mean patch token (mean: MAE's --global_pool, "
                  "main_finetune.py's default)", ("cls", "mean")),
}

# The training engine's flags (crate_kernels.pipeline.run), the same for train and finetune; their defaults that
# agree are ENGINE_DEFAULTS, those that differ (epochs, warmup, blr, min_lr) stay with each command.
ENGINE_FLAGS = {
    **COMMON_FLAGS,
    "batch_size": (int, "images per process per iteration (effective batch: x accum_iter x processes)", None),
    "accum_iter": (int, "iterations accumulated per optimizer step", None),
    "epochs": (int, "training epochs", None),
    "max_steps": (int, "train exactly this many optimizer steps, overriding --epochs (0: off)", None),
    "warmup_epochs": (float, "linear lr warmup length in epochs", None),
    "warmup_steps": (int, "linear lr warmup length in optimizer steps (overrides --warmup_epochs)", None),
    "blr": (float, "base lr: lr = blr x effective batch / 256", None),
    "lr": (float, "absolute lr (overrides --blr)", None),
    "min_lr": (float, "lr at the end of the cosine schedule", None),
    "clip_grad": (float, "clip the gradient norm to this value (None: no clipping)", None),
    "log_dir": (str, "TensorBoard folder (None: --output_dir)", None),
    "tensorboard": ("bool", "write TensorBoard events when tensorboard is installed", None),
    "log_wandb": ("bool", "log to Weights & Biases (the extra wandb; WANDB_PROJECT, WANDB_MODE=offline ...)", None),
    "push_to_hub": (str, "push the final output_dir/hf folder to this Hugging Face Hub repo (the extra hub)", None),
    "threads": (int, "CPU threads per process for compute (0: torch's default); on a small or shared machine "
                     "one thread avoids threads waiting on each other", None),
    "auto_resume": ("bool", "continue from <output_dir>/checkpoint-last.pth when it exists (it takes precedence "
                            "over --resume, so re-running a command continues it)", None),
    "num_workers": (int, "data-loading worker processes (None: fit the machine, the cores per process less one, "
                         "1 to 10)", None),
    "pin_mem": ("bool", "pin host memory of batches (CUDA only)", None),
    "log_every": (int, "optimizer steps between log lines", None),
    "save_every": (int, "optimizer steps between checkpoint-last.pth writes (also written at each epoch end)", None),
    "save_every_epochs": (int, "epochs between numbered checkpoint-<epoch>.pth files (also the last)", None),
    "amp": (str, "mixed precision; auto: bf16 on GPUs that support it, fp16 (with loss scaling) on other GPUs, "
                 "off on CPU", ("auto", "bf16", "fp16", "off")),
    "dist_backend": (str, "process-group backend; auto: nccl on CUDA, gloo otherwise", ("auto", "nccl", "gloo")),
    "compile": ("bool", "run the training step's model under torch.compile (compiled once, on the first step)", None),
    "grad_checkpointing": ("bool", "recompute each layer in backward instead of keeping its activations (less "
                                   "memory, about one more forward pass)", None),
}

ENGINE_DEFAULTS = dict(
    batch_size=64, accum_iter=1, max_steps=0, warmup_steps=None, lr=None, weight_decay=0.05, clip_grad=None,
    data_path=None, dataset="auto", max_unreadable=0.01, log_dir=None, tensorboard=True,
    log_wandb=False, push_to_hub=None, device="auto", threads=0, seed=0, resume=None, auto_resume=True,
    num_workers=None, pin_mem=True, log_every=50, save_every=1000,
    save_every_epochs=20, backend=None, amp="auto", dist_backend="auto", compile=False, grad_checkpointing=False,
)


def spellings(name: str) -> list[str]:
    """``--flag_name`` first, then ``--flag-name`` when it differs."""
    return sorted({f"--{name}", f"--{name.replace('_', '-')}"}, key=lambda s: "-" in s[2:])


def add_flags(parser: argparse.ArgumentParser, table: dict, shown_default: Callable[[str], str]) -> None:
    """Add every flag of ``table`` to ``parser`` (whose ``argument_default`` is SUPPRESS, so only the flags given
    appear); ``shown_default(name)`` is appended to each help text."""
    for name, (kind, help_text, choices) in table.items():
        shown = shown_default(name)
        if choices:
            help_text += f"; one of: {', '.join(choices)}"
        if kind == "bool":
            help_text += f"; --no_{name} turns it off"
            parser.add_argument(*spellings(name), dest=name, action="store_const", const=True, help=help_text + shown)
            parser.add_argument(*spellings("no_" + name), dest=name, action="store_const", const=False,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(*spellings(name), dest=name, type=kind, choices=choices, metavar=name.upper(),
                                help=help_text + shown)


def coerce(table: dict, name: str, value, source: str):
    """Convert a YAML value to the flag's type; errors name the flag and the source."""
    kind, _, choices = table[name]
    if value is None:
        return None
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
                value = value.lower() in ("true", "yes", "on")
            if not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        expected = {"bool": "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        raise ConfigError(f"--{name} expects {expected}, got {value!r} (in {source})") from None
    if choices and value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r} (in {source})")
    return value


def load_yaml(path: str, table: dict) -> dict:
    """Flag values from a YAML mapping; unknown keys and wrong types are errors naming the key."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    known = set(table) - {"config"}
    cfg = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
        cfg[name] = coerce(table, name, value, path)
    return cfg


def given(parser: argparse.ArgumentParser, table: dict, argv: list[str] | None) -> dict:
    """The values set by the user: ``--config`` YAML < command line (the parser's ``argument_default`` is
    SUPPRESS, so flags not given are absent)."""
    cli = vars(parser.parse_args(argv))
    config_path = cli.pop("config", None)
    return {**(load_yaml(config_path, table) if config_path else {}), **cli}


def parse(parser: argparse.ArgumentParser, table: dict, defaults: dict, argv: list[str] | None) -> dict:
    """defaults < ``--config`` YAML < command line, as one dict (no validation)."""
    return {**defaults, **given(parser, table, argv)}


def save_yaml(cfg: dict, table: dict, path: str, header: str = "") -> str:
    """The values of ``cfg`` for the flags of ``table`` as YAML text (returned, and written atomically to ``path``).

    An lr derived from --blr (``cfg["lr_from_blr"]``) is written as a comment, not a value: reused as --config, the
    file then still scales the lr with --blr and the batch size given beside it."""
    values = {k: cfg[k] for k in table if k in cfg}
    if cfg.get("lr_from_blr"):
        header += f"# lr = blr x effective batch / 256 = {cfg['lr']:.6g}\n"
        values["lr"] = None
    text = header + yaml.safe_dump(values, sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    return text


def check_ranges(cfg: dict, positive=(), non_negative=(), fractions=()) -> None:
    """Range checks naming the flag: > 0, >= 0, within [0, 1]; None passes (unset)."""
    for name in positive:
        if cfg[name] is not None and cfg[name] <= 0:
            raise ConfigError(f"--{name} must be positive, got {cfg[name]}")
    for name in non_negative:
        if cfg[name] is not None and cfg[name] < 0:
            raise ConfigError(f"--{name} must be >= 0, got {cfg[name]}")
    for name in fractions:
        if cfg[name] is not None and not 0.0 <= cfg[name] <= 1.0:
            raise ConfigError(f"--{name} must lie in [0, 1], got {cfg[name]}")


# MAE's names for settings the probe and fine-tuning commands already have (facebookresearch/mae, main_finetune.py and
# main_linprobe.py): --finetune PATH is the positional checkpoint, --global_pool / --cls_token choose --pool.
MAE_ALIASES = {
    "finetune": (str, "MAE's name for the checkpoint (the positional CHECKPOINT_OR_RUN; give one of the two, or both "
                      "naming the same file)", None),
    "global_pool": ("bool", "MAE's pooling flag: --global_pool is --pool mean (the fc-normed mean patch token), "
                            "--no_global_pool is --pool cls", None),
    "cls_token": ("bool", "MAE's --cls_token: --pool cls ([CLS] after the final norm)", None),
    "nb_classes": (int, "MAE's class count, checked against the data: an error when the dataset holds another "
                        "number of classes (unset: the data's)", None),
}


def apply_mae_aliases(values: dict) -> dict:
    """Map MAE's flags among the user's ``values`` onto ours: ``finetune`` -> ``checkpoint``, ``global_pool`` /
    ``cls_token`` -> ``pool``; a MAE flag that contradicts our flag given beside it is an error naming both."""
    values = dict(values)
    path = values.pop("finetune", None)
    if path is not None:
        if values.get("checkpoint", path) != path:
            raise ConfigError(f"--finetune {path} and the positional checkpoint {values['checkpoint']} differ; "
                              "give one of them")
        values["checkpoint"] = path
    pools = {}
    if "global_pool" in values:
        on = values.pop("global_pool")
        pools["--global_pool" if on else "--no_global_pool"] = "mean" if on else "cls"
    if "cls_token" in values:
        on = values.pop("cls_token")
        pools["--cls_token" if on else "--no_cls_token"] = "cls" if on else "mean"
    if "pool" in values:
        pools[f"--pool {values['pool']}"] = values["pool"]
    if len(set(pools.values())) > 1:
        raise ConfigError(f"{' and '.join(pools)} ask for different pooling; give one of them")
    if pools:
        values["pool"] = next(iter(pools.values()))
    return values


def check_nb_classes(nb_classes: int | None, classes: int, description: str) -> None:
    """MAE's --nb_classes must equal the number of classes of the data (``description`` names the data)."""
    if nb_classes is not None and nb_classes != classes:
        raise ConfigError(f"--nb_classes {nb_classes} disagrees with the data: {description} holds {classes} classes "
                          f"(pass --nb_classes {classes}, or leave it out to take the data's)")

RESUME_HINT = "interrupted; run the same command again to resume from checkpoint-last.pth"


def command_main(program: str, resolve: Callable[[list[str] | None], dict], run: Callable[[dict], object],
                 argv: list[str] | None = None, interrupted: str = "interrupted") -> int:
    """A command's entry point: ``resolve(argv) -> cfg``, then ``run(cfg)``; an error is one line prefixed with
    ``program`` (under torchrun a run's failure is printed by rank 0 alone). Exit status: 0 done, 1 failed
    (``TrainError``, ``DatasetError``), 2 bad arguments (``ConfigError``), 128 + signal when a stop signal ended
    the run (``StopRequested``), 130 on Ctrl-C (``interrupted`` is printed)."""
    try:
        cfg = resolve(argv)
        if cfg.get("push_to_hub") and not hub_available():
            raise ConfigError("--push_to_hub needs huggingface_hub, the optional extra 'hub': "
                              "pip install 'crate_kernels[hub]'")
        if cfg.get("log_wandb") and importlib.util.find_spec("wandb") is None:
            raise ConfigError("--log_wandb needs wandb, the optional extra 'wandb': pip install 'crate_kernels[wandb]'")
    except ConfigError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return 2
    if "push_to_hub" in cfg:  # a training command: its model card names the command line
        cfg["command"] = shlex.join([program, *(sys.argv[1:] if argv is None else argv)])
    try:
        run(cfg)
    except ConfigError as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        return 2
    except (TrainError, DatasetError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{program}: error: {e}", file=sys.stderr)
        return 1
    except StopRequested as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{program}: {interrupted}", file=sys.stderr)
        return 130
    return 0
