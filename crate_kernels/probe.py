"""Linear probing of a pretrained encoder: ``python -m crate_kernels.probe [CHECKPOINT_OR_RUN]`` (``--help``).

The paper's protocol: the frozen encoder's [CLS] feature (``--pool mean``: the fc-normed mean patch token) of every
image, extracted once (centre crops at the pretraining size, bf16 autocast on GPUs) and cached on disk; then a
linear classifier on the cached features: scikit-learn's logistic regression on standardised features (C chosen on
a held-out 20% of the training features unless ``--logreg_c``), or for sets too large for it MAE's linear-probe head
(BatchNorm without affine, then a linear layer) trained in torch. Top-1 (and top-5 with more than 5 classes) are
printed and written to a JSON file beside the features. ``--compare_random`` probes ``--random_inits`` randomly
initialised models of the same architecture (seeds --seed, --seed + 1, ...) in the same run and says whether the
pretrained probe lies above, within or below their spread.

A supervised CRATE checkpoint (the release's, or a crate-finetune run of one) is probed the same way: its [CLS] (or
mean token) after its head's LayerNorm, the head's linear map left out.

Pooling: [CLS] by default, the paper's CRATE-MAE protocol (the [CLS] output of the encoder is the image feature it
probes) and MAE's main_linprobe.py default; MAE's ``--global_pool`` / ``--cls_token``, ``--finetune PATH`` and
``--nb_classes`` are accepted too (``pipeline.flags.MAE_ALIASES``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

from . import checkpoint
from .errors import ConfigError, DatasetError, TrainError
from .models.classifier import EncoderClassifier, make_head
from .models.crate_supervised import CRATE
from .models.pretrained import Pretrained, load_pretrained, supervised_classifier
from .pipeline import distributed, flags
from .pipeline.data import (
    EvalTransform,
    LabelledViews,
    UnreadableImages,
    build_labelled,
    collate_labelled,
    default_num_workers,
    labels_of,
    normalize,
    resolve_labelled,
)
from .pipeline.run import amp_dtype, lr_at
from .whitebox import fit_logistic, topk_accuracy

DEFAULTS = dict(
    checkpoint="./output_dir", model=None, dataset="auto", data_path=None, input_size=None, pool=None, layer=-1,
    classifier="auto", logreg_c=None, epochs=90, batch_size=128, head_batch_size=1024, blr=0.1, lr=None,
    weight_decay=0.0, warmup_epochs=10, output_dir=None, compare_random=False, random_inits=3, nb_classes=None,
    recompute=False, max_unreadable=0.01, num_workers=None, device="auto", amp="auto", backend=None, threads=0, seed=0,
)

FLAGS = {
    **flags.COMMON_FLAGS,
    **flags.CHECKPOINT_FLAGS,
    **flags.LABELLED_FLAGS,
    "layer": (int, "encoder layer whose output is probed, 0-based; -1: the last (with the final norm)", None),
    "classifier": (str, "sklearn: logistic regression; torch: MAE's linear-probe head; auto: sklearn while "
                        "training images x max(feature dim, classes) <= 1e8, else torch", ("auto", "sklearn", "torch")),
    "logreg_c": (float, "inverse L2 strength of the logistic regression (unset: the best of 1e-3 ... 1e2 on a "
                        "held-out 20%% of the training features, then refit on all)", None),
    "epochs": (int, "torch head: epochs over the cached features", None),
    "batch_size": (int, "images per batch of feature extraction", None),
    "head_batch_size": (int, "torch head: features per optimizer step", None),
    "blr": (float, "torch head: base lr, lr = blr x head_batch_size / 256 (SGD, momentum 0.9)", None),
    "lr": (float, "torch head: absolute lr (overrides --blr)", None),
    "weight_decay": (float, "torch head: weight decay (MAE's linear probe: 0)", None),
    "warmup_epochs": (int, "torch head: linear warmup epochs, then half-cycle cosine", None),
    "output_dir": (str, "where features and results go (unset: probe/ beside the checkpoint: in its run "
                        "directory, or its folder)", None),
    "compare_random": ("bool", "also probe --random_inits randomly initialised models of the same architecture "
                               "(seeds --seed, --seed + 1, ...) and report where the pretrained probe lies against "
                               "their spread", None),
    "random_inits": (int, "--compare_random: how many random initialisations (at least 2)", None),
    "recompute": ("bool", "extract the features again even when a cached file matches", None),
    "max_unreadable": (float, "fraction of images allowed to fail to decode (each is skipped, with its label, and "
                              "counted) before the probe stops", None),
    "num_workers": (int, "data-loading worker processes (unset: the cores less one, 1 to 10)", None),
    "amp": (str, "feature extraction precision; auto: bf16 on GPUs that support it, else off",
            ("auto", "bf16", "off")),
    "threads": (int, "CPU threads for compute (0: torch's default)", None),
    "seed": (int, "seed of the (first) random model, the held-out split and the torch head", None),
    **flags.MAE_ALIASES,
}

SKLEARN_LIMIT = 1e8  # training images x max(feature dim, classes) that auto leaves to scikit-learn
SMALL_FIT = 1e7  # training features (images x dim) up to which the logistic regression runs on one BLAS thread
FORMAT = 1  # bump when the features a key describes change


def _shown_default(name: str) -> str:
    if name == "pool":
        return " (default: cls; for a supervised CRATE run, the pooling it was trained with)"
    return "" if DEFAULTS.get(name) is None else f" (default: {DEFAULTS[name]})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crate-probe", argument_default=argparse.SUPPRESS,
        description="Linear probe of a pretrained CRATE-MAE or ViT-MAE encoder on frozen, cached features.",
    )
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT_OR_RUN",
                   help="a crate-train run directory, a checkpoint-*.pth, a model.safetensors, or a release .pth of "
                        f"CRATE-MAE or ViT-MAE (default: {DEFAULTS['checkpoint']})")
    flags.add_flags(p, FLAGS, _shown_default)
    return p


def resolve(argv: list[str] | None = None) -> dict:
    """Flags (and --config YAML) -> the validated configuration."""
    values = flags.given(build_parser(), {**FLAGS, "checkpoint": (str, "", None)}, argv)
    cfg = {**DEFAULTS, **flags.apply_mae_aliases(values)}
    flags.check_ranges(cfg, positive=("input_size", "epochs", "batch_size", "head_batch_size", "blr", "lr",
                                      "logreg_c", "nb_classes"),
                       non_negative=("weight_decay", "warmup_epochs", "num_workers", "threads"),
                       fractions=("max_unreadable",))
    if cfg["warmup_epochs"] >= cfg["epochs"]:
        raise ConfigError(f"--warmup_epochs ({cfg['warmup_epochs']}) must be below --epochs ({cfg['epochs']})")
    if cfg["random_inits"] < 2:
        raise ConfigError(f"--random_inits must be at least 2 (a spread needs several), got {cfg['random_inits']}")
    return cfg


# ---------------------------------------------------------------------------------------------- features
def encoder_digest(clf: EncoderClassifier) -> str:
    """A digest of the encoder's tensor names, shapes and values (the head, freshly initialised, left out)."""
    state = {k: v for k, v in clf.state_dict().items() if not k.startswith("head.")}
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """A digest of what a labelled split holds: its description, every item's label, and its file (path, size and
    modification time) or its pixels."""
    h = hashlib.blake2b(digest_size=16)
    h.update(dataset.describe().encode())
    h.update(np.asarray(labels_of(dataset), dtype=np.int64).tobytes())
    if hasattr(dataset, "samples"):
        for path, _ in dataset.samples:
            stat = os.stat(path) if os.path.exists(path) else None
            h.update(f"{path}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}\n".encode())
    else:
        h.update(dataset.data.contiguous().numpy().tobytes())
    return h.hexdigest()


def extract_features(clf: EncoderClassifier, dataset, cfg: dict, device: torch.device, amp: torch.dtype | None,
                     what: str, warn) -> dict:
    """Features of every readable image of ``dataset``, in order: {'features' float32 (M, d), 'labels' int64 (M,),
    'indices' int64 (M,) of the items kept, 'unreadable' [(path, reason)]}. Unreadable images are skipped and
    counted; past --max_unreadable of the reads, a DatasetError stops the probe."""
    from tqdm import tqdm

    workers = default_num_workers() if cfg["num_workers"] is None else cfg["num_workers"]
    loader = torch.utils.data.DataLoader(LabelledViews(dataset), batch_size=cfg["batch_size"], shuffle=False,
                                         num_workers=workers, collate_fn=collate_labelled,
                                         pin_memory=device.type == "cuda")
    tally = UnreadableImages(cfg["max_unreadable"], warn, outcome="left out with its label")
    feats, labels, indices, unreadable = [], [], [], []
    clf.to(device).eval()
    with torch.no_grad(), tqdm(total=len(dataset), desc=what, unit="img", disable=None, leave=False) as bar:
        for imgs, target, index, failures in loader:
            tally.add(failures, len(target))
            unreadable += failures
            bar.update(len(target) + len(failures))
            if imgs is None:
                continue
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                feats.append(clf.pooled(normalize(imgs.to(device, non_blocking=True)), cfg["layer"]).float().cpu())
            labels.append(target)
            indices.append(index)
    if not feats:
        raise DatasetError(f"no readable image in {dataset.describe()}")
    return {"features": torch.cat(feats), "labels": torch.cat(labels), "indices": torch.cat(indices),
            "unreadable": [list(f) for f in unreadable]}


def cached_features(clf: EncoderClassifier, splits: dict, cfg: dict, device, amp, stem: str,
                    log) -> tuple[dict, str]:
    """Features of the train and test splits from ``<output_dir>/<stem>-<key>.pt`` when its key matches (model
    weights, architecture, data, input size, pooling, layer, precision), else extracted and written atomically.
    Returns ({split: extract_features result}, path)."""
    key_fields = {
        "format": FORMAT, "encoder": encoder_digest(clf), "architecture": type(clf).__name__,
        "data": {split: dataset_fingerprint(ds) for split, ds in splits.items()},
        "input_size": cfg["input_size"], "pool": cfg["pool"], "layer": cfg["layer"], "amp": str(amp),
    }
    key = hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(), digest_size=8).hexdigest()
    path = os.path.join(cfg["output_dir"], f"{stem}-{key}.pt")
    if os.path.isfile(path) and not cfg["recompute"]:
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key_fields:
                log(f"  features: cached {path}")
                return cached["splits"], path
        except Exception as e:  # a truncated or foreign file: extract again and replace it
            log(f"  note: cannot use cached features {path} ({e}); extracting again")
    out, start = {}, time.perf_counter()
    for split, dataset in splits.items():
        out[split] = extract_features(clf, dataset, cfg, device, amp, f"{stem} {split}", _warn)
    checkpoint.make_output_dir(cfg["output_dir"])  # only now: a probe that fails writes nothing
    checkpoint.save({"key": key_fields, "splits": out}, path)
    dims = out["train"]["features"].shape[1]
    log(f"  features: {dims}-d, extracted in {time.perf_counter() - start:.1f} s -> {path}")
    return out, path


# ---------------------------------------------------------------------------------------------- classifiers
def fit_torch_head(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   num_classes: int, cfg: dict, device: torch.device, topk: bool = True) -> dict:
    """MAE's linear-probe head (BatchNorm1d without affine, then Linear with std 0.01) trained on the features:
    SGD (momentum 0.9, --weight_decay), per-step linear warmup then half-cycle cosine, --epochs of shuffled batches of
    --head_batch_size; returns top-1 (and top-5) on the test features, in percent."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    head = make_head(x_train.shape[1], num_classes, linear_probe=True).to(device)
    batch = min(cfg["head_batch_size"], len(x_train))
    lr = cfg["lr"] if cfg["lr"] is not None else cfg["blr"] * batch / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=cfg["weight_decay"])
    x_train, y_train = x_train.to(device), y_train.to(device)
    steps_per_epoch = len(x_train) // batch
    total, warmup = cfg["epochs"] * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    step = 0
    for _ in range(cfg["epochs"]):
        order = torch.randperm(len(x_train), generator=gen).to(device)
        for i in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, 0.0, warmup, total)
            chosen = order[i * batch:(i + 1) * batch]
            loss = torch.nn.functional.cross_entropy(head(x_train[chosen]), y_train[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    head.eval()
    with torch.no_grad():
        scores = head(x_test.to(device)).float().cpu().numpy()
    classes, labels = np.arange(num_classes), y_test.numpy()
    return {"classifier": "torch linear-probe head", "top1": 100 * topk_accuracy(scores, labels, classes, 1),
            **({"top5": 100 * topk_accuracy(scores, labels, classes, 5)} if topk else {}),
            "lr": lr, "epochs": cfg["epochs"], "batch": batch, "final_train_loss": loss.item()}


def choose_classifier(cfg: dict, samples: int, dim: int, num_classes: int) -> str:
    if cfg["classifier"] != "auto":
        return cfg["classifier"]
    return "sklearn" if samples * max(dim, num_classes) <= SKLEARN_LIMIT else "torch"


# ---------------------------------------------------------------------------------------------- run
def load_splits(cfg: dict, input_size: int) -> dict:
    """The train and test splits at ``input_size``; a test class absent from training is an error."""
    transform = EvalTransform(input_size)
    splits = {split: build_labelled(cfg["dataset"], cfg["data_path"], transform, split) for split in ("train", "test")}
    train_classes = set(labels_of(splits["train"]))
    unseen = sorted(set(labels_of(splits["test"])) - train_classes)
    if unseen:
        names = [splits["train"].classes[c] for c in unseen[:10]]
        raise DatasetError(f"{splits['test'].describe()} holds classes with no training image: {', '.join(names)}")
    if len(train_classes) < 2:
        raise DatasetError(f"{splits['train'].describe()} needs at least 2 classes with images")
    return splits


def probe_model(clf: EncoderClassifier, source: str, stem: str, splits: dict, cfg: dict, device, amp, log) -> dict:
    """Features (cached) and the linear classifier for one model (``source`` describes it); writes
    ``<stem>-<key>.json`` beside the features."""
    data, features_path = cached_features(clf, splits, cfg, device, amp, stem, log)
    train, test = data["train"], data["test"]
    num_classes = len(splits["train"].classes)
    kind = choose_classifier(cfg, len(train["labels"]), train["features"].shape[1], num_classes)
    topk = num_classes > 5
    start = time.perf_counter()
    if kind == "sklearn":
        size = train["features"].numel()
        try:
            result = fit_logistic(train["features"].numpy(), train["labels"].numpy(), test["features"].numpy(),
                                  test["labels"].numpy(), cfg["logreg_c"], cfg["seed"], topk,
                                  cfg["threads"] or (1 if size <= SMALL_FIT else None))
        except ImportError as e:
            raise TrainError(f"--classifier sklearn: {e} (or use --classifier torch)") from e
    else:
        result = fit_torch_head(train["features"], train["labels"], test["features"], test["labels"], num_classes,
                                cfg, device, topk)
    result.update({
        "model": source, "dataset": f"{splits['train'].describe()}; {splits['test'].describe()}",
        "input_size": cfg["input_size"], "pool": cfg["pool"], "layer": cfg["layer"],  # 0-based, as --layer
        "seed": cfg["seed"], "fit_seconds": round(time.perf_counter() - start, 2), "features": features_path,
        "train_images": len(train["labels"]), "test_images": len(test["labels"]), "classes": num_classes,
        "feature_dim": int(train["features"].shape[1]),
        "unreadable_skipped": len(train["unreadable"]) + len(test["unreadable"]),
    })
    results_path = features_path[:-len(".pt")] + ".json"
    checkpoint.save_json(result, results_path)
    result["results"] = results_path
    return result


def _line(name: str, result: dict) -> str:
    top5 = f", top-5 {result['top5']:.1f}%" if "top5" in result else ""
    chosen = f" (C={result['C']:g})" if "C" in result else ""
    return f"{name}: top-1 {result['top1']:.1f}%{top5}  [{result['classifier']}{chosen}] -> {result['results']}"


def run(cfg: dict, log=print) -> dict:
    """Probe the checkpoint (and, with --compare_random, a random model of its architecture); returns
    {'pretrained': result, 'random': result?} as written to the JSON files."""
    if distributed.world_size_from_env() > 1:
        raise TrainError("the probe runs in one process: start it without torchrun")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    pretrained = load_pretrained(cfg["checkpoint"], cfg["model"])
    own_pool = pretrained.pool if pretrained.family == "supervised" else None
    cfg = {**cfg, "input_size": cfg["input_size"] or pretrained.img_size, "pool": cfg["pool"] or own_pool or "cls",
           "dataset": resolve_labelled(cfg["dataset"], cfg["data_path"])}
    if cfg["input_size"] % pretrained.patch_size:
        raise ConfigError(f"--input_size ({cfg['input_size']}) must be a multiple of the checkpoint's patch size "
                          f"({pretrained.patch_size})")
    device = distributed.resolve_device(cfg["device"], 0)
    amp = amp_dtype(cfg["amp"], device, auto_fp16=False)
    splits = load_splits(cfg, cfg["input_size"])
    num_classes = len(splits["train"].classes)
    flags.check_nb_classes(cfg["nb_classes"], num_classes, splits["train"].describe())
    clf = frozen_encoder(pretrained, num_classes, cfg["pool"], cfg["input_size"], cfg["backend"])
    depth = len(clf.blocks)
    if not -depth <= cfg["layer"] < depth:
        raise ConfigError(f"--layer must lie in [{-depth}, {depth}) for this {depth}-layer encoder, got {cfg['layer']}")
    cfg["layer"] %= depth
    cfg["output_dir"] = cfg["output_dir"] or checkpoint.folder_beside(cfg["checkpoint"], "probe")
    mean = "mean token ([CLS] included)" if pretrained.family == "supervised" else "mean patch token"
    log(f"crate-probe: {pretrained.describe()}\n  data: {splits['train'].describe()}; {splits['test'].describe()}\n"
        f"  {cfg['input_size']}px, feature: {'[CLS]' if cfg['pool'] == 'cls' else mean} of encoder "
        f"layer {cfg['layer'] + 1} of {depth} (--layer {cfg['layer']}), on {device}, amp {amp or 'off'}; "
        f"output: {cfg['output_dir']}")
    tag = f"{cfg['dataset']}-{cfg['pool']}-layer{cfg['layer']}-{cfg['input_size']}px"
    results = {"pretrained": probe_model(clf, pretrained.describe(), f"{pretrained.model}-{tag}", splits, cfg,
                                         device, amp, log)}
    log(_line("  pretrained", results["pretrained"]))
    if cfg["compare_random"]:
        results["random"], seeds = [], list(range(cfg["seed"], cfg["seed"] + cfg["random_inits"]))
        for seed in seeds:
            random_clf = random_classifier(pretrained, num_classes, cfg["pool"], seed, cfg["backend"],
                                           cfg["input_size"])
            result = probe_model(random_clf, f"{pretrained.model}, random initialisation (seed {seed})",
                                 f"{pretrained.model}-random{seed}-{tag}", splits, cfg, device, amp, log)
            log(_line(f"  random init (seed {seed})", result))
            results["random"].append(result)
        summary = random_spread(results["pretrained"]["top1"], [r["top1"] for r in results["random"]])
        summary.update(seeds=seeds, results=[r["results"] for r in results["random"]])
        log(summary["verdict"])
        results["pretrained"]["compare_random"] = summary
        checkpoint.save_json({k: v for k, v in results["pretrained"].items() if k != "results"},
                             results["pretrained"]["results"])
    return results


def random_spread(pretrained_top1: float, random_top1: list[float]) -> dict:
    """Where the pretrained probe's top-1 lies against those of several random initialisations: their mean, sample
    standard deviation (ddof 1), min and max, and ``position``: 'above' (> max), 'within' ([min, max]) or 'below'
    (< min); ``verdict`` says it in one line. Percentages in, percentages out."""
    if len(random_top1) < 2:
        raise ValueError(f"random_top1 needs at least 2 values for a spread, got {len(random_top1)}")
    values = np.asarray(random_top1, dtype=np.float64)
    mean, std, low, high = float(values.mean()), float(values.std(ddof=1)), float(values.min()), float(values.max())
    position = "above" if pretrained_top1 > high else "below" if pretrained_top1 < low else "within"
    meaning = {"above": "above every random initialisation: pretraining helps this probe beyond the seed-to-seed "
                        "spread",
               "within": "within the random initialisations' range: no difference beyond the seed-to-seed spread",
               "below": "below every random initialisation: pretraining does not help this probe here"}[position]
    verdict = (f"  random init, {len(values)} seeds: top-1 mean {mean:.1f}%, std {std:.1f}, range {low:.1f}-{high:.1f}%"
               f"\n  pretrained {pretrained_top1:.1f}% lies {meaning} ({pretrained_top1 - mean:+.1f} points from the "
               f"random mean)")
    return {"pretrained_top1": pretrained_top1, "random_top1": values.tolist(), "mean": mean, "std": std,
            "min": low, "max": high, "position": position, "difference_from_mean": pretrained_top1 - mean,
            "verdict": verdict}


def frozen_encoder(pretrained: Pretrained, num_classes: int, pool: str, input_size: int,
                   backend: str | None) -> EncoderClassifier | CRATE:
    """The model whose ``pooled(imgs, layer)`` features are probed: a masked autoencoder's encoder with MAE's
    pooling and linear-probe head, or a supervised CRATE at ``input_size`` (its own head kept, unused: the feature
    is what the head's linear map would see)."""
    if pretrained.family == "supervised":
        return supervised_classifier(pretrained, None if pretrained.state else num_classes, input_size, pool, backend,
                                     log=None).eval()
    return EncoderClassifier.from_pretrained(pretrained, num_classes, pool == "mean", True, backend=backend, log=None)


def random_classifier(pretrained: Pretrained, num_classes: int, pool: str, seed: int, backend: str | None,
                      input_size: int | None = None) -> EncoderClassifier | CRATE:
    """The same architecture with its initialisation from ``seed`` (what training starts from: MAE's, or the
    supervised CRATE release's)."""
    torch.manual_seed(seed)
    if pretrained.family == "supervised":
        init = Pretrained.from_scratch(pretrained.model, pretrained.img_size, pretrained.patch_size)
    else:
        mae = pretrained.build(backend, weights=False)
        init = Pretrained(pretrained.model, pretrained.img_size, pretrained.patch_size, pretrained.norm_pix_loss,
                          mae.state_dict(), f"random initialisation (seed {seed})")
    return frozen_encoder(init, num_classes, pool, input_size or pretrained.img_size, backend)


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m crate_kernels.probe``: 0 done, 1 failed, 2 bad arguments; errors are one line."""
    return flags.command_main("crate-probe", resolve, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
