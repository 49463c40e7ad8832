"""White-box measurements and visual probes of a CRATE-MAE model (the paper's layer-wise compression and sparsity),
and the same measurements of a ViT-MAE baseline for comparison.

    coding_rate_and_sparsity(model, imgs)   per encoder layer: compression R^c and ISTA sparsity (mean, std)
    attention_maps(model, imgs, layer)      [CLS] attention over the patch grid, per head
    pca_maps(model, imgs)                   4 PCA components of the last layer's qkv(LN(z)) patch features
    patch_pca(model, imgs)                  the same, and the variance each component explains
    reconstruct(model, imgs, ...)           original, masked, prediction, pasted images and the loss per image
    reconstruction_grid(model, imgs, ...)   original | masked | prediction | prediction with visible patches
    save_image_grid(images, path)           PNG through PIL
    plot_whitebox_curves(evals, path)       coding rate / sparsity per layer (needs matplotlib)
    linear_probe(model, train, test)        logistic regression on [CLS] features (needs scikit-learn)
    fit_logistic(x_train, y_train, ...)     that logistic regression on given features (crate-probe's classifier)

Measurements run in float32 without gradients and accept a DDP-wrapped model. Images are normalised
(B, 3, H, W) tensors with H and W multiples of the patch size.

A library at the pipeline's level: it takes the ImageNet normalisation from ``pipeline.data``, and the commands
(train's evaluation, analyze) use it. ``crate_kernels.analysis`` re-exports its public names under the earlier name.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write
from .pipeline.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "encoder_activations", "coding_rate", "sparsity", "coding_rate_and_sparsity", "attention_maps", "pca_maps",
    "patch_pca", "reconstruct", "reconstruction_grid", "save_image_grid", "plot_whitebox_curves", "extract_features",
    "linear_probe", "fit_logistic", "topk_accuracy",
]


def _unwrap(model):
    return getattr(model, "module", model)


class _Measuring:
    """Context: model in eval mode, no autograd, no autocast, images on the model's device; restores the mode."""

    def __init__(self, model, imgs: torch.Tensor):
        self.model = _unwrap(model)
        param = next(self.model.parameters())
        self.imgs = imgs.to(param.device, torch.float32)
        self._grad = torch.no_grad()
        self._cast = torch.autocast(param.device.type, enabled=False)

    def __enter__(self):
        self._training = self.model.training
        self.model.eval()
        self._grad.__enter__()
        self._cast.__enter__()
        return self.model, self.imgs

    def __exit__(self, *exc):
        self._cast.__exit__(*exc)
        self._grad.__exit__(*exc)
        self.model.train(self._training)


def _grid(model, imgs: torch.Tensor) -> tuple[int, int]:
    p = model.patch_size
    ph, pw = p if isinstance(p, tuple) else (p, p)
    return imgs.shape[-2] // ph, imgs.shape[-1] // pw


def _layer_taps(block):
    """(module giving the attention's projections, module giving the layer's output, function from that projection
    output to (q, k, v) of shape (B, H, n, p), attention scale) for one encoder layer of CRATE-MAE, ViT-MAE or
    supervised CRATE (whose layer is the pair [PreNorm(MSSA), PreNorm(ISTA)] itself)."""
    if hasattr(block, "attn"):  # ViT-MAE: timm's block; qkv holds q | k | v
        return block.attn.qkv, block, block.attn.split_heads, block.attn.scale
    attn, ista = block.layers[0] if hasattr(block, "layers") else block
    mssa = attn.fn

    def heads(w: torch.Tensor):
        b, n, _ = w.shape
        w = w.view(b, n, mssa.heads, mssa.dim_head).transpose(1, 2)
        return w, w, w  # MSSA: query, key and value are the same projection

    return mssa.qkv, ista, heads, mssa.scale


def _encoder_taps(model, imgs: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None):
    """Run the encoder once; per layer a dict: q, k, v (B, H, n, p), the layer output z (B, n, d), scale."""
    with _Measuring(model, imgs) as (model, imgs):
        outputs, hooks, taps = [], [], [_layer_taps(block) for block in model.blocks]
        for projection, layer_output, _, _ in taps:
            record = {}
            outputs.append(record)
            hooks.append(projection.register_forward_hook(lambda m, i, out, r=record: r.__setitem__("qkv", out)))
            hooks.append(layer_output.register_forward_hook(lambda m, i, out, r=record: r.__setitem__("z", out)))
        try:
            if mask_ratio > 0:
                model.forward_encoder(imgs, mask_ratio, None if noise is None else noise.to(imgs.device))
            else:
                model.forward_features(imgs)
        finally:
            for h in hooks:
                h.remove()
        layers = []
        for record, (_, _, heads, scale) in zip(outputs, taps):
            q, k, v = heads(record["qkv"])
            layers.append({"q": q, "k": k, "v": v, "z": record["z"], "scale": scale})
        return layers


def encoder_activations(model, imgs: torch.Tensor, mask_ratio: float = 0.0, noise: torch.Tensor | None = None):
    """Run the encoder once; per layer, the per-head features w (B, H, n, p) and the layer's output (B, n, d).

    CRATE-MAE: w = qkv(LN1(z^l)) (query = key = value) and the ISTA output z^{l+1}. ViT-MAE: w = the attention's
    value projection and the block's output. ``mask_ratio`` 0 (default) measures the unmasked image
    (``forward_features``); otherwise the training-time masked sequence (CRATE: mask tokens included; ViT: the visible
    tokens only), with optional fixed ``noise``.
    """
    return [(layer["v"], layer["z"]) for layer in _encoder_taps(model, imgs, mask_ratio, noise)]


def coding_rate(w: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """R^c per sample, (B,) float64: sum over heads of 0.5 logdet(I_n + p / (n eps^2) X X^T).

    X (n x p) holds the tokens of one head of ``w`` (B, H, n, p), each normalised to unit length; computed
    through the equal p x p determinant det(I_p + c X^T X).
    """
    x = F.normalize(w.double(), dim=-1)
    _, _, n, p = x.shape
    gram = x.transpose(-1, -2) @ x
    eye = torch.eye(p, dtype=torch.float64, device=x.device)
    return 0.5 * torch.logdet(eye + (p / (n * eps ** 2)) * gram).sum(dim=1)


def sparsity(z: torch.Tensor) -> torch.Tensor:
    """Fraction of non-zero entries per sample over all tokens and channels, (B,) float64 (lower is sparser)."""
    return (z != 0).flatten(1).double().mean(dim=1)


def coding_rate_and_sparsity(model, imgs: torch.Tensor, eps: float = 0.1, mask_ratio: float = 0.0,
                             noise: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Per encoder layer, mean and std over the batch (population std) of R^c and of the ISTA sparsity.

    Returns lists of length depth: ``coding_rate``, ``coding_rate_std``, ``sparsity``, ``sparsity_std``.
    """
    stats = {"coding_rate": [], "coding_rate_std": [], "sparsity": [], "sparsity_std": []}
    for w, z in encoder_activations(model, imgs, mask_ratio, noise):
        for name, values in (("coding_rate", coding_rate(w, eps)), ("sparsity", sparsity(z))):
            stats[name].append(values.mean().item())
            stats[name + "_std"].append(values.std(correction=0).item())
    return stats


def _layer(model, layer: int) -> int:
    depth = len(_unwrap(model).blocks)
    if not -depth <= layer < depth:
        raise ValueError(f"layer must lie in [{-depth}, {depth}) for this {depth}-layer encoder, got {layer}")
    return layer % depth


def attention_maps(model, imgs: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Per head, the [CLS] row of softmax(q k^T / sqrt(p)) over the patches at ``layer``: (B, H, rows, cols).

    CRATE-MAE: q = k = w, its MSSA projection; ViT-MAE: the block's own query and key."""
    taps = _encoder_taps(model, imgs)[_layer(model, layer)]
    q, k = taps["q"], taps["k"]
    attn = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * taps["scale"], dim=-1)[:, :, 0, 1:]
    return attn.reshape(*attn.shape[:2], *_grid(_unwrap(model), imgs)).float()


def pca_maps(model, imgs: torch.Tensor, n_components: int = 4, layer: int = -1) -> torch.Tensor:
    """PCA of the patch features w at ``layer`` (default last) over all patches of the batch (CRATE-MAE: qkv(LN(z));
    ViT-MAE: the value projection; see ``encoder_activations``).

    Returns the projections on the top ``n_components`` principal axes, (B, n_components, rows, cols);
    each axis's sign makes its largest loading positive.
    """
    return patch_pca(model, imgs, n_components, layer)[0]


def patch_pca(model, imgs: torch.Tensor, n_components: int = 4, layer: int = -1) -> tuple[torch.Tensor, list[float]]:
    """``pca_maps`` and the fraction of the patch features' variance each component explains."""
    w, _ = encoder_activations(model, imgs)[_layer(model, layer)]
    b, h, n, p = w.shape
    feats = w.transpose(1, 2).reshape(b, n, h * p)[:, 1:].reshape(-1, h * p).double()
    feats = feats - feats.mean(dim=0)
    _, singular, vh = torch.linalg.svd(feats, full_matrices=False)
    axes = vh[:n_components]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    proj = feats @ (axes * signs).T
    rows, cols = _grid(_unwrap(model), imgs)
    explained = (singular[:n_components] ** 2 / (singular ** 2).sum()).tolist()
    return proj.reshape(b, rows, cols, -1).permute(0, 3, 1, 2).float(), explained


def _tile(rows: list[torch.Tensor], pad: int) -> torch.Tensor:
    """Rows of (B, C, H, W) images -> one (C, H', W') image on a white background."""
    b, c, h, w = rows[0].shape
    out = torch.ones(c, len(rows) * (h + pad) + pad, b * (w + pad) + pad)
    for r, row in enumerate(rows):
        for i in range(b):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            out[:, top:top + h, left:left + w] = row[i]
    return out


def _with_row_labels(grid: torch.Tensor, labels: list[str], cell: int, pad: int) -> torch.Tensor:
    """``grid`` (C, H, W), tiled in rows of ``cell``-pixel images, with a white column of row labels on its left."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=max(9, min(24, cell // 5)))
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        font = ImageFont.load_default()
    boxes = [ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font) for text in labels]
    canvas = Image.new("L", (max(b[2] for b in boxes) + 2 * pad + 4, grid.shape[1]), 255)
    draw = ImageDraw.Draw(canvas)
    for row, (text, box) in enumerate(zip(labels, boxes)):
        top = pad + row * (cell + pad) + (cell - (box[3] - box[1])) // 2 - box[1]
        draw.text((pad + 2, top), text, fill=0, font=font)
    column = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
    return torch.cat([column.expand(grid.shape[0], -1, -1), grid], dim=2)


def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict[str, torch.Tensor]:
    """One masked forward pass, as images in [0, 1] on the CPU, each (B, 3, H, W): ``original``, ``masked`` (grey where
    masked), ``prediction`` (the decoder's output everywhere) and ``pasted`` (visible patches with the prediction in
    the masked ones); ``mask`` (B, rows, cols) with 1 = masked; ``loss`` (B,): each image's masked-patch loss.
    ``mean``/``std`` undo the input normalisation; with norm_pix_loss the prediction is un-normalised with each target
    patch's own mean and variance (MAE's visualisation)."""
    with _Measuring(model, imgs) as (model, imgs):
        _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=None if noise is None else noise.to(imgs.device))
        loss = (model.patch_loss(imgs, pred) * mask).sum(1)
        if model.norm_pix_loss:
            target = model.patchify(imgs)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        grid = _grid(model, imgs)
        m = model.unpatchify(mask.unsqueeze(-1).expand_as(pred).to(pred.dtype), grid)
        mean_t = torch.tensor(mean, device=imgs.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=imgs.device).view(1, 3, 1, 1)
        original = (imgs * std_t + mean_t).clamp(0, 1)
        prediction = (model.unpatchify(pred, grid) * std_t + mean_t).clamp(0, 1)
        out = {"original": original, "masked": original * (1 - m) + 0.5 * m, "prediction": prediction,
               "pasted": original * (1 - m) + prediction * m, "mask": mask.reshape(-1, *grid),
               "loss": loss / mask.sum(1)}
        return {k: v.float().cpu() for k, v in out.items()}


def reconstruction_grid(model, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, pad: int = 2, labels: bool = True) -> torch.Tensor:
    """A (3, H', W') image in [0, 1]; rows: original | masked | prediction | prediction with the visible patches
    pasted back; one column per image, and with ``labels`` a column naming the rows on the left (see
    ``reconstruct``)."""
    images = reconstruct(model, imgs, mask_ratio, noise, mean, std)
    grid = _tile([images[k] for k in ("original", "masked", "prediction", "pasted")], pad)
    if labels:
        names = ["original", f"masked {mask_ratio:.0%}", "prediction", "visible + pred."]
        grid = _with_row_labels(grid, names, imgs.shape[-2], pad)
    return grid


def save_image_grid(images: torch.Tensor | np.ndarray, path: str, nrow: int = 8, pad: int = 2) -> None:
    """Write an image (C, H, W), or a batch (B, C, H, W) tiled ``nrow`` per row, with values in [0, 1], as PNG.

    C is 1 or 3. The file is replaced atomically, so viewers never see a half-written PNG.
    """
    from PIL import Image

    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 4:
        rows = [x[i:i + nrow] for i in range(0, x.shape[0], nrow)]
        if rows[-1].shape[0] < nrow and len(rows) > 1:
            rows[-1] = torch.cat([rows[-1], torch.ones(nrow - rows[-1].shape[0], *x.shape[1:])])
        x = _tile(rows, pad)
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"images must be (C, H, W) or (B, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def plot_whitebox_curves(evals: list[dict], path: str, losses: list[tuple[int, float]] | None = None) -> None:
    """PNG of coding rate and sparsity per encoder layer, one line per measurement (coloured by step).

    ``evals``: dicts with ``step`` and the lists from ``coding_rate_and_sparsity`` (and optionally ``eval_loss``);
    ``losses``: optional (step, training loss) pairs drawn in a first panel, with the evaluation losses beside
    them. Needs matplotlib.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_whitebox_curves needs matplotlib: pip install 'crate_kernels[analysis]'") from e
    panels = [("coding_rate", "coding rate $R^c$ (higher: less compressed)"),
              ("sparsity", "fraction of non-zeros (lower: sparser)")]
    fig = Figure(figsize=(5 * (len(panels) + bool(losses)), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + bool(losses), squeeze=False)[0]
    if losses:
        steps, values = zip(*losses)
        axes[0].plot(steps, values, lw=1, label="training batches")
        held_out = [(e["step"], e["eval_loss"]) for e in evals if "eval_loss" in e]
        if held_out:
            axes[0].plot(*zip(*held_out), "o-", ms=3, lw=1, label="evaluation batch")
            axes[0].legend(fontsize=7)
        axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="masked-patch loss")
        axes = axes[1:]
    cmap = colormaps["viridis"]
    last = max(e["step"] for e in evals) or 1
    for ax, (key, title) in zip(axes, panels):
        for e in evals:
            layers = np.arange(1, len(e[key]) + 1)
            ax.errorbar(layers, e[key], yerr=e.get(key + "_std"), color=cmap(e["step"] / last), marker="o",
                        ms=3, lw=1, capsize=2, label=f"step {e['step']}")
        ax.set(xlabel="encoder layer", title=title)
        ax.set_xticks(np.arange(1, len(evals[0][key]) + 1))
    if len(evals) <= 8:
        axes[0].legend(fontsize=7)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def extract_features(model, batches: Iterable, device: torch.device | str | None = None):
    """[CLS] features of ``forward_features`` for batches of (images, labels): (float32 (M, d), int64 (M,)) arrays."""
    base = _unwrap(model)
    feats, labels = [], []
    for imgs, target in batches:
        if device is not None:
            imgs = imgs.to(device)
        with _Measuring(base, imgs) as (m, x):
            feats.append(m.forward_features(x)[:, 0].float().cpu())
        labels.append(torch.as_tensor(target).cpu())
    if not feats:
        raise ValueError("extract_features got no batches")
    return torch.cat(feats).numpy(), torch.cat(labels).long().numpy()


# The inverse L2 strengths the logistic regression chooses from when none is given.
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, classes: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores; column j of ``scores`` is class classes[j]."""
    top = classes[np.argsort(-scores, axis=1)[:, :k]]
    return float((top == labels[:, None]).any(axis=1).mean())


def fit_logistic(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 c: float | None = None, seed: int = 0, topk: bool = True, blas_threads: int | None = None,
                 max_iter: int = 2000) -> dict:
    """The linear probe: logistic regression (L2, lbfgs) on standardised (M, d) features with (M,) int labels; C from
    ``C_GRID`` by accuracy on a stratified held-out 20% of the training features when ``c`` is None (ties: the
    smaller C), then refit on all. ``blas_threads`` caps the BLAS threads (small problems run fastest on one:
    several threads on a busy machine made a 1,200 x 128 fit 40x slower here). Returns {'classifier', 'top1',
    'top5' (percent, top5 when ``topk``), 'C', 'selection': {C: held-out top-1}, 'notes'}. Needs scikit-learn
    (ImportError without it)."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
        from threadpoolctl import threadpool_limits
    except ImportError as e:
        raise ImportError("the linear probe needs scikit-learn: pip install 'crate_kernels[analysis]'") from e
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        scaler = StandardScaler().fit(x_train)
        xs_train, xs_test = scaler.transform(x_train), scaler.transform(x_test)
        selection, notes = {}, []

        def fit(x, y, c_value):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model = LogisticRegression(C=c_value, max_iter=max_iter).fit(x, y)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                notes.append(f"lbfgs did not converge in {max_iter} iterations at C={c_value:g}")
            return model

        if c is None:
            counts = np.bincount(y_train)
            if counts[counts > 0].min() < 2:
                c, notes = 1.0, ["a class has one training image: no held-out split, C fixed at 1"]
            else:
                fit_x, val_x, fit_y, val_y = train_test_split(xs_train, y_train, test_size=0.2, stratify=y_train,
                                                              random_state=seed)
                for value in C_GRID:
                    selection[value] = 100 * float(fit(fit_x, fit_y, value).score(val_x, val_y))
                c = max(C_GRID, key=lambda v: (selection[v], -v))
                if c in (C_GRID[0], C_GRID[-1]):
                    notes.append(f"C={c:g} is at the edge of the searched range {C_GRID[0]:g}-{C_GRID[-1]:g}")
        model = fit(xs_train, y_train, c)
        scores = model.predict_proba(xs_test)
    return {"classifier": "sklearn logistic regression", "top1": 100 * topk_accuracy(scores, y_test, model.classes_, 1),
            **({"top5": 100 * topk_accuracy(scores, y_test, model.classes_, 5)} if topk else {}),
            "C": c, "selection": {f"{k:g}": v for k, v in selection.items()}, "notes": notes}


def linear_probe(model, train: Iterable, test: Iterable, C: float = 1.0, max_iter: int = 1000) -> float:
    """Test accuracy (a fraction) of ``fit_logistic`` at ``C`` on the [CLS] features (the paper's linear probe).

    ``train`` and ``test`` yield (images, labels) batches, e.g. DataLoaders over a dataset with
    ``crate_kernels.pipeline.data.EvalTransform``. Needs scikit-learn.
    """
    x_train, y_train = extract_features(model, train)
    x_test, y_test = extract_features(model, test)
    return fit_logistic(x_train, y_train, x_test, y_test, c=C, topk=False, max_iter=max_iter)["top1"] / 100
