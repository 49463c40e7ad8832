"""The paper's figures for a trained model (CRATE-MAE, ViT-MAE, or supervised CRATE: its [CLS] maps are the release's
emergent segmentation; it has no reconstructions): ``python -m crate_kernels.analyze CHECKPOINT_OR_RUN [images...]``.

Writes to ``--output_dir`` (default: ``analysis`` beside the checkpoint, inside a run directory):
  whitebox.png         (a) coding rate R^c and sparsity per encoder layer, mean and std over the image views
  attention.png        (b) per-head [CLS] attention at ``--layer`` over each image
  pca.png              (c) the top 4 principal components of the patch features, and the first 3 as RGB
  reconstructions.png  (d) masked | prediction | original, with ViT-MAE's prediction beside it (``--vit_checkpoint``)
  analysis.json        the numbers behind them
Without image arguments it uses the scikit-image photographs held out of the default pretraining. The layer-wise
statistics average over views: each image whole (centre crop) and ``--crops`` random crops of it; the other
figures show the whole images.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from . import checkpoint, whitebox
from .errors import ConfigError, DatasetError, TrainError
from .models.pretrained import load_pretrained, supervised_classifier
from .models.registry import FAMILY_NAMES, MODELS
from .pipeline import distributed, flags
from .pipeline.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SKIMAGE_HELD_OUT,
    EvalTransform,
    TrainTransform,
    normalize,
    read_image,
    seed_for,
    skimage_data_dir,
)

DEFAULTS = dict(checkpoint=None, images=[], model=None, norm_pix_loss=False, input_size=None, layer=-1,
                mask_ratio=0.75, crops=8, max_shown=6, vit_checkpoint=None, vit_model=None, output_dir=None,
                device="auto", backend=None, threads=0, seed=0)

FLAGS = {
    **flags.COMMON_FLAGS,
    **flags.CHECKPOINT_FLAGS,
    "norm_pix_loss": ("bool", "the checkpoint regresses per-patch normalised pixels (release checkpoints; a run's "
                              "own setting takes precedence)", None),
    "layer": (int, "encoder layer of the attention maps and PCA, 0-based; -1: the last", None),
    "mask_ratio": (float, "fraction of patches masked in the reconstructions", None),
    "crops": (int, "random crops per image added to the views the layer-wise statistics average over", None),
    "max_shown": (int, "images shown in the attention, PCA and reconstruction figures", None),
    "vit_checkpoint": (str, "a ViT-MAE checkpoint (or run) whose reconstructions and statistics go beside", None),
    "vit_model": (str, "architecture of --vit_checkpoint when it does not name it",
                  tuple(name for name in MODELS if name.startswith("mae_vit"))),
    "output_dir": (str, "where the figures go (unset: analysis/ beside the checkpoint: in its run directory, or "
                        "its folder)", None),
    "threads": (int, "CPU threads for compute (0: torch's default)", None),
    "seed": (int, "seed of the random crops and of the masks", None),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crate-analyze", argument_default=argparse.SUPPRESS,
        description="White-box figures of a pretrained CRATE-MAE (or ViT-MAE): layer-wise coding rate and sparsity, "
                    "attention maps, PCA maps, reconstructions.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="a crate-train or crate-finetune run directory, a checkpoint-*.pth, a model.safetensors, or a "
                        "release .pth (CRATE-MAE, ViT-MAE or supervised CRATE)")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help=f"image files (default: scikit-image's {', '.join(SKIMAGE_HELD_OUT)}, held out of the "
                        "default pretraining)")
    flags.add_flags(p, FLAGS, lambda name: "" if DEFAULTS.get(name) is None else f" (default: {DEFAULTS[name]})")
    return p


def resolve(argv: list[str] | None = None) -> dict:
    table = {**FLAGS, "checkpoint": (str, "", None)}
    cfg = flags.parse(build_parser(), table, DEFAULTS, argv)
    flags.check_ranges(cfg, positive=("input_size", "max_shown"), non_negative=("crops", "threads"))
    if not 0.0 < cfg["mask_ratio"] < 1.0:
        raise ConfigError(f"--mask_ratio must lie in (0, 1), got {cfg['mask_ratio']}")
    if cfg["vit_model"] and not cfg["vit_checkpoint"]:
        raise ConfigError("--vit_model needs --vit_checkpoint")
    return cfg


# ---------------------------------------------------------------------------------------------- inputs
def load_images(paths: list[str]) -> tuple[list[torch.Tensor], list[str]]:
    """uint8 (3, H, W) images and their names; the default photos when ``paths`` is empty. An unreadable file is an
    error naming it (nothing is skipped: every figure shows what was asked for)."""
    if not paths:
        root = skimage_data_dir()
        paths = [os.path.join(root, name) for name in SKIMAGE_HELD_OUT]
    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise DatasetError(f"image {path} does not exist")
        images.append(read_image(path))
    return images, [os.path.basename(p) for p in paths]


def views(images: list[torch.Tensor], size: int, crops: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole images: centre crops (B, 3, size, size), all views: the whole images then ``crops`` seeded random
    crops of each (B * (1 + crops), 3, size, size)), normalised."""
    pixels = [img.permute(1, 2, 0) for img in images]  # the transforms take (H, W, 3)
    whole = normalize(torch.stack([EvalTransform(size)(img) for img in pixels]))
    crop = TrainTransform(size)
    extra = [crop(img, torch.Generator().manual_seed(seed_for(seed, i, j)))
             for i, img in enumerate(pixels) for j in range(crops)]
    return whole, torch.cat([whole, normalize(torch.stack(extra))]) if extra else whole


# ---------------------------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise TrainError("analyze needs matplotlib: pip install 'crate_kernels[analysis]'") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    checkpoint.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _rgb(img: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image -> (H, W, 3) in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_layerwise(stats: dict[str, dict], views_count: int, path: str) -> None:
    """(a): per model, coding rate and fraction of non-zeros per encoder layer with std error bars."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    for (label, s), colour in zip(stats.items(), ("tab:blue", "tab:orange")):
        layers = np.arange(1, len(s["coding_rate"]) + 1)
        axes[0].errorbar(layers, s["coding_rate"], yerr=s["coding_rate_std"], marker="o", capsize=3, color=colour,
                         label=label)
        axes[1].errorbar(layers, s["sparsity"], yerr=s["sparsity_std"], marker="o", capsize=3, color=colour,
                         label=label)
    axes[0].set(xlabel="encoder layer", ylabel="$R^c$ (lower: more compressed)",
                title="compression: coding rate of the per-head features")
    axes[1].set(xlabel="encoder layer", ylabel="fraction of non-zero entries (lower: sparser)",
                title="sparsity of each layer's output")
    for ax in axes:
        ax.set_xticks(np.arange(1, max(len(s["coding_rate"]) for s in stats.values()) + 1))
        ax.legend(fontsize=8)
    fig.suptitle(f"Layer-wise compression and sparsity (mean and std over {views_count} image views)")
    _save(fig, path)


def plot_attention(imgs: torch.Tensor, maps: torch.Tensor, names: list[str], layer: int, depth: int, label: str,
                   path: str):
    """(b): each image, then each head's [CLS] attention over it (bilinearly upsampled, colour over a grey copy);
    a row's heads share one colour scale, 0 to the row's largest weight, shown by the colour bar at its end."""
    b, heads = maps.shape[:2]
    fig = _figure(1.7 * (heads + 1) + 0.8, 1.8 * b + 0.4)
    axes = fig.subplots(b, heads + 1, squeeze=False)
    size = imgs.shape[-2:]
    up = torch.nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    for i in range(b):
        rgb = _rgb(imgs[i])
        axes[i, 0].imshow(rgb)
        axes[i, 0].set_title(names[i], fontsize=8)
        grey = rgb.mean(axis=2)
        top = maps[i].max().item() or 1.0  # the largest weight itself: bilinear upsampling lowers isolated peaks
        for h in range(heads):
            ax = axes[i, h + 1]
            ax.imshow(grey, cmap="gray")
            shown = ax.imshow(up[i, h].numpy(), cmap="inferno", alpha=0.6, vmin=0.0, vmax=top)
            if i == 0:
                ax.set_title(f"head {h + 1}", fontsize=8)
        bar = fig.colorbar(shown, ax=axes[i, 1:], shrink=0.9, pad=0.02)
        bar.set_label("[CLS] attention weight", fontsize=7)
        bar.ax.tick_params(labelsize=6)
        for ax in axes[i]:
            _bare(ax)
    fig.suptitle(f"{label}: [CLS] attention per head at layer {layer + 1} of {depth}", fontsize=10)
    _save(fig, path)
    return fig


def plot_pca(imgs: torch.Tensor, pcs: torch.Tensor, explained: list[float], names: list[str], layer: int,
             depth: int, label: str, path: str):
    """(c): each image, its 4 principal-component maps (each component on one colour scale over the images, shown by
    the colour bar under its column), and the first three as RGB."""
    b, k = pcs.shape[:2]
    fig = _figure(1.7 * (k + 2), 1.8 * b + 1.0)
    axes = fig.subplots(b, k + 2, squeeze=False)
    low = pcs[:, :3].amin(dim=(0, 2, 3), keepdim=True)
    high = pcs[:, :3].amax(dim=(0, 2, 3), keepdim=True)
    rgb_pcs = ((pcs[:, :3] - low) / (high - low).clamp_min(1e-12)).permute(0, 2, 3, 1).numpy()
    for i in range(b):
        axes[i, 0].imshow(_rgb(imgs[i]))
        axes[i, 0].set_title(names[i], fontsize=8)
        for c in range(k):
            limit = pcs[:, c].abs().max().item() or 1.0
            shown = axes[i, c + 1].imshow(pcs[i, c].numpy(), cmap="coolwarm", vmin=-limit, vmax=limit)
            if i == 0:
                axes[i, c + 1].set_title(f"PC {c + 1} ({explained[c]:.0%} var.)", fontsize=8)
            if i == b - 1:
                bar = fig.colorbar(shown, ax=axes[:, c + 1], location="bottom", shrink=0.9, pad=0.02)
                bar.set_label(f"PC {c + 1} score", fontsize=7)
                bar.ax.tick_params(labelsize=6)
        axes[i, k + 1].imshow(rgb_pcs[i])
        if i == 0:
            axes[i, k + 1].set_title("PCs 1-3 as RGB", fontsize=8)
        for ax in axes[i]:
            _bare(ax)
    fig.suptitle(f"{label}: PCA of the patch features at layer {layer + 1} of {depth} (shared axes over the images)",
                 fontsize=10)
    _save(fig, path)
    return fig


def plot_reconstructions(recons: dict[str, dict], names: list[str], mask_ratio: float, path: str):
    """(d): per image, masked input | each model's prediction (visible patches kept; its masked-patch MSE under
    the panel) | original."""
    columns = []
    first = next(iter(recons.values()))
    for i, (label, r) in enumerate(recons.items()):
        same_mask = i > 0 and torch.equal(r["mask"], first["mask"])
        if not same_mask:
            columns.append((f"masked {mask_ratio:.0%}" + (f" ({label})" if len(recons) > 1 else ""), r["masked"], None))
        columns.append((f"{label} prediction", r["pasted"], r["loss"]))
    columns.append(("original", first["original"], None))
    b = len(names)
    fig = _figure(2.0 * len(columns), 2.0 * b + 0.5)
    axes = fig.subplots(b, len(columns), squeeze=False)
    for i in range(b):
        for c, (title, images, loss) in enumerate(columns):
            ax = axes[i, c]
            ax.imshow(images[i].permute(1, 2, 0).numpy())
            if i == 0:
                ax.set_title(title, fontsize=8)
            if loss is not None:  # this image's own number, under its panel
                ax.set_xlabel(f"MSE on masked patches: {loss[i]:.3f}", fontsize=7)
            _bare(ax)
        axes[i, 0].set_ylabel(names[i], fontsize=8)
    fig.suptitle("Reconstructions: masked patches predicted, visible patches kept", fontsize=10)
    _save(fig, path)
    return fig


# ---------------------------------------------------------------------------------------------- run
def _label(pretrained) -> str:
    return f"{FAMILY_NAMES[pretrained.family]} ({pretrained.model})"


def run(cfg: dict, log=print) -> dict:
    """Write the four figures and analysis.json; returns the numbers."""
    if distributed.world_size_from_env() > 1:
        raise TrainError("analyze runs in one process: start it without torchrun")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    main = load_pretrained(cfg["checkpoint"], cfg["model"], cfg["norm_pix_loss"])
    vit = load_pretrained(cfg["vit_checkpoint"], cfg["vit_model"]) if cfg["vit_checkpoint"] else None
    if vit is not None and vit.family != "vit":
        raise TrainError(f"--vit_checkpoint {cfg['vit_checkpoint']} holds a {FAMILY_NAMES[vit.family]} checkpoint, "
                         "not a ViT-MAE one")
    size = cfg["input_size"] or main.img_size
    for p in (main, vit):
        if p is not None and size % p.patch_size:
            raise ConfigError(f"--input_size ({size}) must be a multiple of the patch size {p.patch_size} of "
                              f"{p.source}")
    images, names = load_images(cfg["images"])
    device = distributed.resolve_device(cfg["device"], 0)
    built = (supervised_classifier(main, None, size, backend=cfg["backend"], log=None).eval()
             if main.family == "supervised" else main.build(cfg["backend"]))
    models = {_label(main): built.to(device)}
    if vit is not None:
        label = _label(vit) + (" (--vit_checkpoint)" if _label(vit) in models else "")
        models[label] = vit.build().to(device)
    depth = len(models[_label(main)].blocks)
    if not -depth <= cfg["layer"] < depth:
        raise ConfigError(f"--layer must lie in [{-depth}, {depth}) for this {depth}-layer encoder, got {cfg['layer']}")
    no_decoder = [label for label, p in zip(models, (main, vit)) if p is not None and not p.has_decoder]
    out = cfg["output_dir"] or checkpoint.folder_beside(cfg["checkpoint"], "analysis")
    whole, all_views = views(images, size, cfg["crops"], cfg["seed"])
    shown, shown_names = whole[: cfg["max_shown"]], names[: cfg["max_shown"]]
    log(f"crate-analyze: {main.describe()}" + (f"\n  beside: {vit.describe()}" if vit else "")
        + f"\n  images: {', '.join(names)} at {size}px; statistics over {len(all_views)} views "
        f"({len(images)} whole + {cfg['crops']} crops each); on {device}\n  output: {out}")
    layer = cfg["layer"] % depth
    stats = {label: whitebox.coding_rate_and_sparsity(m, all_views) for label, m in models.items()}
    label, model = next(iter(models.items()))
    maps = whitebox.attention_maps(model, shown, layer).cpu()
    pcs, explained = whitebox.patch_pca(model, shown, 4, layer)
    recons = {}
    for name, m in models.items():
        if name in no_decoder:
            continue
        grid = (size // m.patch_size) ** 2
        noise = torch.rand(len(shown), grid, generator=torch.Generator().manual_seed(cfg["seed"]))
        recons[name] = whitebox.reconstruct(m, shown, cfg["mask_ratio"], noise)
    files = {"whitebox": "whitebox.png", "attention": "attention.png", "pca": "pca.png",
             "reconstructions": "reconstructions.png"}
    _figure(1, 1)  # without matplotlib: its error comes before the output folder is made
    checkpoint.make_output_dir(out)
    plot_layerwise(stats, len(all_views), os.path.join(out, files["whitebox"]))
    plot_attention(shown, maps, shown_names, layer, depth, label, os.path.join(out, files["attention"]))
    plot_pca(shown, pcs.cpu(), explained, shown_names, layer, depth, label, os.path.join(out, files["pca"]))
    if recons:
        plot_reconstructions(recons, shown_names, cfg["mask_ratio"], os.path.join(out, files["reconstructions"]))
    else:
        del files["reconstructions"]
    for label, p in zip(models, (main, vit)):
        if label in no_decoder:
            log(f"  note: no reconstructions for {label}: " + (
                "a supervised model has no decoder" if p.family == "supervised"
                else "its checkpoint holds no decoder (FAIR's mae_visualize_*.pth releases hold one)"))
    numbers = {
        "models": {label: p.describe() for label, p in zip(models, (main, vit)) if p is not None},
        "images": names, "input_size": size, "views": len(all_views), "crops_per_image": cfg["crops"],
        "layerwise": stats, "attention_layer": layer, "pca_layer": layer, "pca_explained_variance": explained,
        "mask_ratio": cfg["mask_ratio"], "seed": cfg["seed"],
        "reconstruction_loss": {label: dict(zip(shown_names, r["loss"].tolist())) for label, r in recons.items()},
        "figures": files,
    }
    checkpoint.save_json(numbers, os.path.join(out, "analysis.json"))
    for label, s in stats.items():
        log(f"  {label}: coding rate per layer {' '.join(f'{v:.1f}' for v in s['coding_rate'])}; non-zero "
            f"fraction {' '.join(f'{v:.3f}' for v in s['sparsity'])}")
    log(f"  wrote {', '.join(files.values())} and analysis.json")
    return numbers


def main(argv: list[str] | None = None) -> int:
    """``python -m crate_kernels.analyze``: 0 done, 1 failed, 2 bad arguments; errors are one line."""
    return flags.command_main("crate-analyze", resolve, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
