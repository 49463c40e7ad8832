"""Fine-tuning's recipe (MAE's main_finetune.py, after timm): AdamW groups with layer-wise lr decay, label smoothing,
batch-mode mixup / cutmix, per-image RandAugment and random erasing in the loading workers, and MAE's ``--aa``
RandAugment string. The command and its flags are ``crate_kernels.finetune``.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError, TrainError
from .data import IMAGENET_MEAN, IMAGENET_STD

# Parameter names of the embedding (layer 0) and of the numbered encoder layers, in the classifiers of a masked
# autoencoder (MAE's names) and in supervised CRATE (the release's).
EMBEDDING_NAMES = ("patch_embed.", "cls_token", "pos_embed", "to_patch_embedding.")
LAYER_PREFIXES = ("blocks.", "transformer.layers.")


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float,
                       decay_all: bool = False) -> list[dict]:
    """Optimizer groups with MAE's layer-wise lr decay: the embedding (patch_embed or to_patch_embedding, cls_token,
    pos_embed or pos_embedding) is layer 0, encoder layer i is layer i + 1, the rest (norm, fc_norm, head, mlp_head)
    layer L = depth + 1; a group's ``lr_scale`` is layer_decay^(L - layer). No weight decay on 1-D parameters
    (biases, norms) and the cls token and position table, unless ``decay_all`` (the supervised CRATE release decays
    every parameter). Frozen parameters are left out; each group carries ``param_names``."""
    depth = len(model.blocks)
    top = depth + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((pre for pre in LAYER_PREFIXES if name.startswith(pre)), None)
        if name.startswith(EMBEDDING_NAMES):
            layer = 0
        elif prefix is not None:
            layer = int(name[len(prefix):].split(".")[0]) + 1
        else:
            layer = top
        decay = decay_all or not (p.ndim == 1 or name.endswith(".bias")
                                  or name in ("cls_token", "pos_embed", "pos_embedding"))
        group = groups.setdefault((layer, decay), {
            "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (top - layer),
        })
        group["params"].append(p)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int labels -> (B, classes) targets: 1 - smoothing + smoothing / classes on the label, smoothing /
    classes elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def mix_batch(imgs: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              switch_prob: float, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch-mode Mixup/CutMix (MAE's fine-tuning): each image is mixed with the batch's mirror image
    (``flip(0)``) by lam ~ Beta(alpha, alpha); cutmix (chosen with ``switch_prob`` when both are on) pastes a box of
    area 1 - lam, and lam becomes the unpasted area. Returns (images, soft targets (B, classes)) with the targets
    lam x y + (1 - lam) x y_mirror of smoothed one-hot labels; every row sums to 1. Random draws come from torch's
    global generator (kept in checkpoints)."""
    targets = smoothed_one_hot(labels, num_classes, smoothing)
    if mixup <= 0 and cutmix <= 0:
        return imgs, targets
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(())) < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha)).sample())
    mirror = imgs.flip(0)
    if use_cutmix:
        h, w = imgs.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, bottom = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
        left, right = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
        imgs = imgs.clone()
        imgs[..., top:bottom, left:right] = mirror[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    else:
        imgs = imgs * lam + mirror * (1.0 - lam)
    return imgs, targets * lam + targets.flip(0) * (1.0 - lam)


class ImageAugment:
    """Per-image RandAugment and random erasing of uint8 (3, H, W) views, in the data-loading workers (kornia's
    operations on floats, back to uint8): RandAugment draws ``n`` operations per image at magnitude ``m`` on timm's
    0-10 scale (kornia's 0-30 scale x 3; 0: off), or with ``mstd`` > 0 at a magnitude drawn per image from
    N(m, mstd^2) clipped to 0..10 (``mstd`` >= 100: uniform in 0..m, timm's 'inf'); ``inc``: the colour, contrast,
    brightness and sharpness factors grow from 1 to 1.9 with the magnitude (timm's increasing operations; timm also
    flips their direction at random, and its solarize threshold falls with the magnitude, which kornia's cannot);
    random erasing (probability ``reprob``, area 0.02-1/3, aspect 0.3-3.3) fills its box with the mean colour, 0
    after normalisation. ``augment(view, seed)`` is a function of the seed: kornia draws from torch's global
    generator, forked and seeded here."""

    def __init__(self, n: int, m: int, reprob: float, mstd: float = 0.0, inc: bool = False):
        try:
            import kornia.augmentation as K
            from kornia.augmentation.auto import RandAugment
            from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
        except ImportError as e:
            raise TrainError("RandAugment and random erasing need kornia: pip install 'crate_kernels[analysis]' "
                             "(or --randaug_m 0 --reprob 0)") from e
        policy = None
        if inc:
            policy = [[(op[0][0], 1.0, 1.9)] if op[0][0] in ("color", "contrast", "brightness", "sharpness") else op
                      for op in default_policy]
        self.m, self.mstd = m, mstd
        # kornia's magnitude lies in (0, 30) when built; each call sets it from the (drawn) magnitude
        self.randaug = RandAugment(n=n, m=min(29, 3 * m), policy=policy) if m else None
        self.erase = K.RandomErasing(p=reprob, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value=0.0) if reprob else None
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __call__(self, view: torch.Tensor, seed: int) -> torch.Tensor:
        x = view.unsqueeze(0).float() / 255.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.randaug is not None:
                self.randaug.m = 3 * self.magnitude()
                x = self.randaug(x).clamp(0, 1)
            if self.erase is not None:
                x = self.erase((x - self.mean) / self.std) * self.std + self.mean
        return (x[0].clamp(0, 1) * 255.0).round().to(torch.uint8)

    def magnitude(self) -> float:
        """This image's magnitude on timm's 0-10 scale: ``m``, or drawn around it (``mstd``), from torch's
        generator."""
        if self.mstd <= 0:
            return float(self.m)
        if self.mstd >= 100:
            return float(torch.rand(())) * self.m
        return min(10.0, max(0.0, self.m + self.mstd * float(torch.randn(()))))


AA_GRAMMAR = "timm's rand[-m<magnitude 0-10>][-n<operations>][-mstd<std>][-inc<0|1>], e.g. rand-m9-mstd0.5-inc1"


def randaug_settings(aa: str, given: dict) -> dict:
    """MAE's ``--aa`` (timm's RandAugment string) -> {randaug_m, randaug_n, randaug_mstd, randaug_inc}: 'rand' then
    '-'-separated parts m<int> (magnitude, timm's 0-10 scale), n<int> (operations), mstd<float> (magnitude std),
    inc<0|1> (increasing operations); parts left out take timm's defaults (m 10, n 2, mstd 0, inc 0). 'none' is
    RandAugment off. An unknown part, or a setting also given by its own flag with another value, is an error naming
    --aa and the grammar."""
    if aa.lower() in ("none", "off", ""):
        parsed = {"randaug_m": 0}
    else:
        parts = aa.split("-")
        if parts[0] != "rand":
            raise ConfigError(f"--aa {aa!r}: only RandAugment strings are supported ({AA_GRAMMAR}), or 'none'")
        parsed = {"randaug_m": 10, "randaug_n": 2, "randaug_mstd": 0.0, "randaug_inc": False}
        for part in parts[1:]:
            key = next((k for k in ("mstd", "inc", "m", "n") if part.startswith(k)), None)
            value = part[len(key):] if key else ""
            try:
                if key == "mstd":
                    parsed["randaug_mstd"] = float(value)
                elif key == "inc" and value in ("0", "1"):
                    parsed["randaug_inc"] = value == "1"
                elif key in ("m", "n"):
                    parsed["randaug_" + key] = int(value)
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"--aa {aa!r}: cannot read the part {part!r}; expected {AA_GRAMMAR}") from None
    if not 0 <= parsed["randaug_m"] <= 10 or parsed.get("randaug_n", 1) < 1 or parsed.get("randaug_mstd", 0) < 0:
        raise ConfigError(f"--aa {aa!r}: the magnitude must lie in 0..10 (timm's scale), the operations be at least 1 "
                          f"and the std >= 0; expected {AA_GRAMMAR}")
    for key, value in parsed.items():
        if key in given and given[key] != value:
            raise ConfigError(f"--aa sets --{key} {value}, but --{key} {given[key]} is given too; give one of them")
    return parsed
