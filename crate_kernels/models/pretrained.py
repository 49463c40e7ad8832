"""Checkpoints of the models: loading one into a model, and telling which masked autoencoder a checkpoint holds.

``load_checkpoint(model, checkpoint)`` loads a release or crate-train checkpoint (a path or a dict) into a model,
shapes checked first. ``load_pretrained(source)`` reads any checkpoint of the three families (a crate-train or
crate-finetune run directory, its checkpoint-*.pth or model.safetensors, a release ``{'model': ...}`` .pth of
CRATE-MAE or ViT-MAE, supervised CRATE's ``{'state_dict': ...}``, 'module.' prefixes allowed) and tells which
architecture (``registry.MODELS`` or ``SUPERVISED_MODELS``) it is; ``Pretrained.build()`` gives the model with those
weights, ``Pretrained.from_scratch`` stands for a random initialisation; ``supervised_classifier`` builds a supervised
CRATE from one at another size or class count.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from ..checkpoint import load
from ..errors import TrainError
from .crate import CRATEMAE
from .crate_supervised import CRATE
from .hub import CONFIG, WEIGHTS, download, is_repo_id, read_config
from .pos_embed import resize_table
from .registry import CHECKPOINT_MODELS, FAMILY_NAMES, MODELS, SUPERVISED_MODELS, build_mae, build_supervised, family
from .vit_mae import MaskedAutoencoderViT


def clean_state_dict(checkpoint: Mapping) -> dict:
    """Unwrap {'model': state_dict, ...} (CRATE-MAE's and MAE's release) or {'state_dict': ...} (supervised CRATE's
    main.py) and strip DDP's 'module.' prefixes."""
    state = (checkpoint.get("model", checkpoint.get("state_dict", checkpoint)) if isinstance(checkpoint, Mapping)
             else None)
    if not isinstance(state, Mapping):
        raise TypeError("checkpoint must be a state_dict or a dict holding one under 'model' or 'state_dict'")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def key_sample(keys, shown: int = 3) -> str:
    """The first ``shown`` of ``keys`` and how many there are, for an error message: ``a, b, c, ... (60 keys)``."""
    keys = list(keys)
    more = ", ..." if len(keys) > shown else ""
    return f"{', '.join(keys[:shown])}{more} ({len(keys)} key{'s' if len(keys) != 1 else ''})"


def load_checkpoint(model: nn.Module, checkpoint, strict: bool = True):
    """Load a release checkpoint (path to .pth/.safetensors, or a dict) into ``model`` (a CRATE-MAE, ViT-MAE or
    supervised CRATE).

    Every mismatch is reported in one line before anything is copied: a checkpoint holding none of the model's
    tensors (with a sample of its keys), tensors of other shapes, and (``strict``) missing or extra tensors, counted
    and a few named. A path is read by ``crate_kernels.checkpoint.load`` (``weights_only=True``; a file that is not a
    checkpoint, or whose bytes no longer match their checksum, is refused in one line).
    """
    source = "the checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        source, checkpoint = os.fspath(checkpoint), load(os.fspath(checkpoint))
    state = clean_state_dict(checkpoint)
    own = model.state_dict()
    name = type(model).__name__
    if not state.keys() & own.keys():
        raise ValueError(f"{source} holds none of {name}'s {len(own)} tensors; "
                         + (f"its keys look like {key_sample(state)}" if state else "it holds no tensors"))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        shown = mismatched[:3] + ([f"... and {len(mismatched) - 3} more"] if len(mismatched) > 3 else [])
        raise ValueError(f"{source} does not fit this {name} (other size?); {len(mismatched)} mismatched tensors: "
                         + "; ".join(shown))
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if strict and (missing or unexpected):
        parts = ([f"missing {key_sample(missing)}"] if missing else []) + (
            [f"unexpected {key_sample(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source} does not match this {name}'s {len(own)} tensors: " + "; ".join(parts))
    return model.load_state_dict(state, strict=strict)


def is_decoder_key(key: str) -> bool:
    """Whether a state_dict key belongs to the decoder (dropped by classifiers; absent from FAIR's encoder-only
    releases)."""
    return key.startswith(("decoder_", "mask_token"))


@dataclass
class Pretrained:
    """A checkpoint, resolved: architecture ``model`` at ``img_size``/``patch_size``, and its weights (empty: a
    random initialisation); ``pool``, a classifier's pooling when its run recorded it."""

    model: str
    img_size: int
    patch_size: int
    norm_pix_loss: bool
    state: dict = field(repr=False)
    source: str = ""
    pool: str | None = None

    @classmethod
    def from_scratch(cls, model: str, img_size: int, patch_size: int) -> "Pretrained":
        """No checkpoint: architecture ``model``, randomly initialised."""
        return cls(model, img_size, patch_size, False, {}, "random initialisation")

    @property
    def family(self) -> str:
        return family(self.model)

    @property
    def has_decoder(self) -> bool:
        return any(k.startswith("decoder_blocks.") for k in self.state)

    def describe(self) -> str:
        whole = self.has_decoder or self.family == "supervised" or not self.state
        return (f"{self.model} ({FAMILY_NAMES[self.family]}, {self.img_size}px, patch {self.patch_size})"
                + (f" from {self.source}" if self.state else ", random initialisation")
                + ("" if whole else ", encoder only"))

    def build(self, backend: str | None = None, weights: bool = True) -> CRATEMAE | MaskedAutoencoderViT | CRATE:
        """The model in eval mode, on CPU, with these weights (``weights=False``: freshly initialised, from torch's
        global generator): a masked autoencoder (an encoder-only checkpoint leaves the decoder at its
        initialisation), or a supervised CRATE with the checkpoint's head and pooling."""
        if self.family == "supervised":  # its own head (class count), pooling and size
            head = self.state.get("mlp_head.1.weight")
            if weights or head is None:  # without a head, supervised_classifier says so
                return supervised_classifier(self, backend=backend, log=None).eval()
            return supervised_classifier(replace(self, state={}), int(head.shape[0]), backend=backend, log=None).eval()
        model = build_mae(self.model, self.img_size, self.patch_size, self.norm_pix_loss, backend)
        if weights:
            try:
                result = load_checkpoint(model, self.state, strict=False)
            except ValueError as e:
                raise TrainError(f"{self.source} does not fit --model {self.model}: {e}") from None
            missing = [k for k in result.missing_keys if not is_decoder_key(k)]
            decoder_missing = [k for k in result.missing_keys if is_decoder_key(k)]
            if missing or (decoder_missing and self.has_decoder):
                absent = missing or decoder_missing
                raise TrainError(f"{self.source} lacks {len(absent)} tensors of {self.model}: "
                                 f"{', '.join(absent[:6])}{' ...' if len(absent) > 6 else ''}")
        return model.eval()


def supervised_classifier(pretrained: Pretrained, num_classes: int | None = None, img_size: int | None = None,
                          pool: str | None = None, backend: str | None = None, log=print) -> CRATE:
    """Supervised CRATE ``pretrained.model`` at ``img_size`` (default the checkpoint's), in train mode, with the
    checkpoint's weights (none: the release's random initialisation). ``num_classes`` None keeps the checkpoint's
    head (a trained classifier, evaluated or probed); a number gives a fresh ``mlp_head`` (LayerNorm and Linear) for
    that many classes, as the release's finetune.py does. A position table of another grid is interpolated
    bicubically; ``pool`` defaults to the one the checkpoint's run recorded, else [CLS]. ``log`` (None: silent)
    receives one line."""
    img_size = img_size or pretrained.img_size
    state, note = dict(pretrained.state), ""
    if num_classes is None:
        head = state.get("mlp_head.1.weight")
        if head is None:
            raise TrainError(f"{pretrained.source} holds no classification head (mlp_head.1.weight)")
        num_classes = int(head.shape[0])
    elif state:
        state, note = {k: v for k, v in state.items() if not k.startswith("mlp_head.")}, "fresh head"
    model = build_supervised(pretrained.model, num_classes, img_size, pretrained.patch_size,
                             pool or pretrained.pool or "cls", backend)
    if state:
        old, new = (pretrained.img_size // pretrained.patch_size,) * 2, (img_size // pretrained.patch_size,) * 2
        if "pos_embedding" in state and old != new:
            state["pos_embedding"] = resize_table(state["pos_embedding"], old, new)
            note += f"{', ' if note else ''}position table {old[0]}x{old[1]} -> {new[0]}x{new[1]}"
        try:
            result = load_checkpoint(model, state, strict=False)
        except ValueError as e:
            raise TrainError(f"{pretrained.source} does not fit {pretrained.model}: {e}") from None
        missing = [k for k in result.missing_keys if not k.startswith("mlp_head.")]
        wrong = missing or result.unexpected_keys
        if wrong:
            raise TrainError(f"{pretrained.source} does not match {pretrained.model}: "
                             f"{'lacks' if missing else 'has extra'} {', '.join(wrong[:6])}"
                             + (" ..." if len(wrong) > 6 else ""))
    if log is not None:
        log(model.describe(pretrained.describe(), note))
    return model.train()


def _family_of_state(state: dict) -> str | None:
    if "blocks.0.attn.qkv.weight" in state:
        return "vit"
    if "blocks.0.layers.0.0.fn.qkv.weight" in state:
        return "crate"
    if "transformer.layers.0.0.fn.qkv.weight" in state:
        return "supervised"
    return None


def _count(state: dict, prefix: str) -> int:
    """Number of consecutive numbered sub-modules ``prefix.<i>.`` in ``state``."""
    indices = {int(k[len(prefix) + 1:].split(".", 1)[0]) for k in state if k.startswith(prefix + ".")}
    return max(indices) + 1 if indices else 0


def _geometry(state: dict, source: str, fam: str) -> tuple[int, int]:
    """(img_size, patch_size) from the patch embedding and the position table (square grids; supervised CRATE's
    patch of p x p x 3 pixels, the release's RGB)."""
    try:
        if fam == "supervised":
            patch = int(round((int(state["to_patch_embedding.1.weight"].shape[0]) / 3) ** 0.5))
            n = int(state["pos_embedding"].shape[1]) - 1
        else:
            patch = int(state["patch_embed.proj.weight"].shape[-1])
            table = state.get("pos_embed", state.get("decoder_pos_embed"))
            n = int(table.shape[1]) - 1
    except (KeyError, AttributeError, IndexError):
        needed = ("to_patch_embedding.1.weight or pos_embedding" if fam == "supervised"
                  else "patch_embed.proj.weight or pos_embed")
        raise TrainError(f"{source} lacks {needed}: not a whole {FAMILY_NAMES[fam]} checkpoint") from None
    if fam == "supervised" and 3 * patch * patch != int(state["to_patch_embedding.1.weight"].shape[0]):
        raise TrainError(f"{source}: a patch of {int(state['to_patch_embedding.1.weight'].shape[0])} values is not "
                         "p x p RGB pixels")
    side = int(round(n ** 0.5))
    if side * side != n:
        raise TrainError(f"{source}: position table of {n} patches is not a square grid")
    return side * patch, patch


def _infer_model(state: dict, source: str) -> str:
    """The MODELS (or SUPERVISED_MODELS) name whose family, width, depth (and decoder, when present) match
    ``state``."""
    fam = _family_of_state(state)
    if fam == "supervised":
        shape = {"dim": int(state["to_patch_embedding.2.weight"].shape[0]),
                 "depth": _count(state, "transformer.layers")}
        matches = [name for name, cfg in SUPERVISED_MODELS.items() if all(cfg[k] == v for k, v in shape.items())]
        if len(matches) != 1:
            raise TrainError(f"cannot tell the architecture of {source} (supervised CRATE, width {shape['dim']}, "
                             f"depth {shape['depth']}): no --model has this shape; choices: "
                             + ", ".join(SUPERVISED_MODELS))
        return matches[0]
    width = int(state["patch_embed.proj.weight"].shape[0])
    depth = _count(state, "blocks")
    shape = {"embed_dim": width, "depth": depth}
    if fam == "vit" and "decoder_embed.weight" in state:
        shape.update(decoder_embed_dim=int(state["decoder_embed.weight"].shape[0]),
                     decoder_depth=_count(state, "decoder_blocks"))
    matches = [name for name, cfg in MODELS.items()
               if family(name) == fam and all(cfg.get(k, v) == v for k, v in shape.items())]
    encoders = {tuple(MODELS[name][k] for k in ("embed_dim", "depth", "num_heads")) for name in matches}
    if "decoder_embed.weight" not in state and len(encoders) == 1:
        return matches[0]  # encoder only: the candidates build the same encoder
    if len(matches) != 1:
        found = ", ".join(f"{k} {v}" for k, v in shape.items())
        raise TrainError(f"cannot tell the architecture of {source} ({FAMILY_NAMES[fam]}, {found}): "
                         + ("pass --model, one of " + ", ".join(matches) if matches
                            else "no --model has this shape; choices: " + ", ".join(MODELS)))
    return matches[0]


def _read_state(path: str) -> tuple[dict, dict, dict]:
    """(state_dict, training args or {}, safetensors metadata or {}) of a checkpoint file."""
    ckpt = load(path)
    meta = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    try:
        state = clean_state_dict(ckpt)
    except TypeError as e:
        raise TrainError(f"{path}: {e}") from None
    return state, ckpt.get("args") or {}, meta


def load_pretrained(source: str, model: str | None = None, norm_pix_loss: bool | None = None) -> Pretrained:
    """Resolve a pretraining checkpoint: a crate-train run directory (args.yaml, then model.safetensors or
    checkpoint-last.pth), a checkpoint file of such a run, a release ``.pth``/``.safetensors`` of CRATE-MAE or
    FAIR's ViT-MAE (full, or encoder only), or a ``save_pretrained`` folder (config.json) or its Hub repo id. The
    architecture comes from the run's settings (or config.json), else ``model``, else the one MODELS entry that fits
    the tensors; a ``model`` that contradicts the checkpoint is an error. ``norm_pix_loss``
    (how the decoder's output is read) comes from the run's settings, else the argument, else False."""
    args_path, saved = None, {}
    if is_repo_id(source):
        source = download(source)  # the Hub cache's folder of a save_pretrained upload
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, CONFIG)) \
            and not os.path.isfile(os.path.join(source, "args.yaml")):
        path, saved = os.path.join(source, WEIGHTS), read_config(source)  # a save_pretrained folder
    elif os.path.isdir(source):
        args_path = os.path.join(source, "args.yaml")
        if not os.path.isfile(args_path):
            raise TrainError(f"{source} is a directory but not a crate-train run (no args.yaml); pass a run "
                             "directory or a checkpoint file")
        final = os.path.join(source, "model.safetensors")
        path = final if os.path.isfile(final) else os.path.join(source, "checkpoint-last.pth")
        if not os.path.isfile(path):
            raise TrainError(f"run {source} holds no weights yet (no model.safetensors or checkpoint-last.pth)")
    elif os.path.isfile(source):
        path = source
        beside = os.path.join(os.path.dirname(os.path.abspath(source)), "args.yaml")
        args_path = beside if source.endswith(".safetensors") and os.path.isfile(beside) else None
    else:
        raise TrainError(f"checkpoint {source} does not exist")
    state, args, meta = _read_state(path)
    args = {**saved, **args}
    if args_path:
        import yaml

        with open(args_path) as f:
            args = {**(yaml.safe_load(f) or {}), **args}
    fam = _family_of_state(state)
    if fam is None:
        raise TrainError(f"{path} is not a CRATE-MAE, ViT-MAE or supervised CRATE checkpoint: it holds none of "
                         f"their parameters; its keys look like {key_sample(state)}")
    img_size, patch_size = _geometry(state, path, fam)
    named = args.get("model") or meta.get("model")
    if model is not None and named is not None and model != named:
        raise TrainError(f"--model {model} contradicts {path}, which was trained as {named}")
    name = model or named or _infer_model(state, path)
    if name not in CHECKPOINT_MODELS:
        raise TrainError(f"{path} names the architecture {name!r}, which is not one of {', '.join(CHECKPOINT_MODELS)}")
    if family(name) != fam:
        raise TrainError(f"{path} holds a {FAMILY_NAMES[fam]} checkpoint, but {name} is a "
                         f"{FAMILY_NAMES[family(name)]}")
    pix = args.get("norm_pix_loss", norm_pix_loss)
    pool = args.get("pool") or meta.get("pool")
    return Pretrained(name, img_size, patch_size, bool(pix), state, path, pool if pool in ("cls", "mean") else None)
