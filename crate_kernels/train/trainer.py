"""MAE pretraining on the shared engine (``crate_kernels.pipeline.run``): the masked autoencoder, its data, its
white-box evaluation (eval loss, per-layer coding rate and sparsity, reconstructions) and its outputs."""
from __future__ import annotations

import importlib.util
import os

import torch

from .. import checkpoint, whitebox
from ..models.crate import CRATEMAE
from ..models.registry import build_mae
from ..ops.backend import get_backend
from ..pipeline import distributed, flags, run
from ..pipeline.data import (
    EvalTransform,
    MaskedViews,
    ShardStream,
    TrainTransform,
    build_dataset,
    collate_views,
    counted,
    first_samples,
    fixed_batch,
    normalize,
    resolve_dataset,
)
from .config import resolve, save_yaml

NO_WEIGHT_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")

# Settings whose change on resume means the run no longer continues the interrupted one exactly.
RESUME_KEYS = ("model", "input_size", "patch_size", "mask_ratio", "norm_pix_loss", "batch_size", "accum_iter",
                "epochs", "max_steps", "warmup_epochs", "warmup_steps", "blr", "lr", "min_lr", "weight_decay",
                "clip_grad", "data_path", "dataset", "epoch_size", "seed", "amp")


def build_model(cfg: dict):
    """The ``--model`` architecture (CRATE-MAE or ViT-MAE) at ``--input_size``/``--patch_size``, with ``--backend``."""
    return build_mae(cfg["model"], cfg["input_size"], cfg["patch_size"], cfg["norm_pix_loss"], cfg["backend"])


def freeze_unused(model) -> None:
    """Exclude the release's never-called ``decoder_embed`` from training.

    DDP expects a gradient for every parameter that requires one and fails at the second step otherwise
    (find_unused_parameters=True would instead search the autograd graph every step). decoder_embed never
    gets a gradient, so freezing it changes nothing else; it stays in the state_dict, so checkpoints keep the
    release's layout. pos_embed and decoder_pos_embed are fixed tables and are frozen already. ViT-MAE uses its
    decoder_embed and freezes nothing.
    """
    if isinstance(model, CRATEMAE):
        model.decoder_embed.requires_grad_(False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on biases, norms, other 1-D parameters and cls/mask tokens.

    Frozen parameters are left out. Each group carries ``param_names`` (checked when resuming).
    """
    groups = {"decay": ([], []), "no_decay": ([], [])}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or name.endswith(".bias") or name in NO_WEIGHT_DECAY
        names, params = groups["no_decay" if plain else "decay"]
        names.append(name)
        params.append(p)
    return [
        {"params": groups["no_decay"][1], "param_names": groups["no_decay"][0], "weight_decay": 0.0},
        {"params": groups["decay"][1], "param_names": groups["decay"][0], "weight_decay": weight_decay},
    ]


def train_flops_per_image(model: CRATEMAE, cfg: dict, device: torch.device, amp: torch.dtype | None) -> float:
    """FLOPs of one training image, forward and backward, counted by FlopCounterMode (the fused operators count
    as the reference's products; recomputation under --grad_checkpointing is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    grid = cfg["input_size"] // cfg["patch_size"]
    imgs = torch.zeros(1, 3, cfg["input_size"], cfg["input_size"], device=device)
    noise = torch.linspace(0, 1, grid * grid, device=device).unsqueeze(0)  # no draw from the training RNG
    recompute, model.grad_checkpointing = model.grad_checkpointing, False
    try:
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(imgs, mask_ratio=cfg["mask_ratio"], noise=noise)[0]
            loss.backward()
    finally:
        model.grad_checkpointing = recompute
        model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class Trainer(run.Run):
    """One MAE pretraining run (one process of it under torchrun)."""

    program = "crate-train"
    recipe_keys = RESUME_KEYS
    betas = (0.9, 0.95)

    # ------------------------------------------------------------------ set-up
    def build_data(self) -> None:
        cfg = self.cfg
        size, grid = cfg["input_size"], cfg["input_size"] // cfg["patch_size"]
        self.num_patches = grid * grid
        if resolve_dataset(cfg["dataset"], cfg["data_path"]) == "webdataset":
            stream = ShardStream(cfg["data_path"], TrainTransform(size), self.num_patches, cfg["batch_size"],
                                 self.dist.world_size, self.dist.rank, cfg["seed"], cfg["accum_iter"],
                                 cfg["epoch_size"])
            self.make_loader(stream, collate_views, stream.describe())
        else:
            dataset = build_dataset(cfg["dataset"], cfg["data_path"], TrainTransform(size), True, cfg["epoch_size"])
            self.make_loader(MaskedViews(dataset, self.num_patches), collate_views, dataset.describe())
        self.eval_batch, self.eval_desc = None, None
        if self.dist.is_main and cfg["eval_every"]:
            self._build_eval_batch(size)

    def _build_eval_batch(self, size: int) -> None:
        """The fixed evaluation batch: held-out images where the dataset has them (the scikit-image photos kept
        out of training, a val/ folder, CIFAR's test split), as seeded random crops when there are fewer images
        than --eval_images, else centre crops."""
        cfg = self.cfg
        kind = resolve_dataset(cfg["dataset"], cfg["data_path"])
        eval_set = (first_samples(cfg["data_path"], EvalTransform(size), cfg["eval_images"]) if kind == "webdataset"
                    else build_dataset(cfg["dataset"], cfg["data_path"], EvalTransform(size), False))
        crops = len(eval_set) < cfg["eval_images"]
        if crops:
            eval_set.transform = TrainTransform(size)
        imgs, noise, failures = fixed_batch(eval_set, cfg["eval_images"], self.num_patches, cfg["seed"])
        for path, reason in dict(failures).items():
            self.warn(f"warning: the evaluation batch skipped unreadable image {path} ({reason})")
        self.eval_batch = normalize(imgs), noise
        held_out = kind not in ("imagefolder", "webdataset") or os.path.isdir(os.path.join(cfg["data_path"], "val"))
        self.eval_desc = (f"{cfg['eval_images']} {'random crops' if crops else 'centre crops'} of "
                          f"{eval_set.describe()}" + ("" if held_out else " (no val/ split: training images)"))

    def build_model(self) -> torch.nn.Module:
        model = build_model(self.cfg)
        freeze_unused(model)
        model.set_grad_checkpointing(self.cfg["grad_checkpointing"])
        return model

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.cfg["weight_decay"])

    def train_flops_per_image(self) -> float:
        return train_flops_per_image(self.model, self.cfg, self.device, self.amp)

    def batch_loss(self, model, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return model(imgs, mask_ratio=self.cfg["mask_ratio"], noise=noise)[0]

    # ------------------------------------------------------------------ evaluation and outputs
    def on_start(self) -> None:
        if self.step == 0:
            self._evaluate()

    def evaluate(self, epoch_end: bool, final: bool) -> None:
        every = self.cfg["eval_every"]
        if every and (self.step % every == 0 or final):
            self._evaluate()

    def _evaluate(self) -> None:
        """Rank 0: eval loss, per-layer coding rate and sparsity, reconstruction grid and curves on the fixed batch."""
        if self.eval_batch is None:
            return
        imgs, noise = self.eval_batch
        with torch.no_grad():
            eval_loss = self.model(imgs.to(self.device), self.cfg["mask_ratio"], noise.to(self.device))[0].item()
        stats = whitebox.coding_rate_and_sparsity(self.model, imgs)
        grid = whitebox.reconstruction_grid(self.model, imgs, self.cfg["mask_ratio"], noise)
        for name in (f"recon-step{self.step:07d}.png", "recon-latest.png"):
            whitebox.save_image_grid(grid, os.path.join(self.out, name))
        self.monitor.eval(self.step, self.step // self.steps_per_epoch, eval_loss, stats, grid)
        if importlib.util.find_spec("matplotlib") is not None:
            whitebox.plot_whitebox_curves(self.monitor.evals, os.path.join(self.out, "curves.png"),
                                          self.monitor.losses)
            self.monitor.figure("eval/whitebox_curves", os.path.join(self.out, "curves.png"), self.step)

    def finish(self) -> dict:
        self.on_main(lambda: self.write(checkpoint.save_safetensors, self.model.state_dict(),
                                        os.path.join(self.out, "model.safetensors"),
                                        metadata={"model": self.cfg["model"], "step": str(self.step)}))
        self.publish({"model": self.cfg["model"]})
        summary = {"step": self.step, "loss": self.last_loss}
        if self.monitor.evals:
            summary.update({k: self.monitor.evals[-1][k] for k in ("eval_loss", "coding_rate", "sparsity")})
        return summary

    def save_config(self, path: str, header: str) -> None:
        save_yaml(self.cfg, path, header)

    def banner(self) -> str:
        cfg, m = self.cfg, self.model
        params = sum(p.numel() for p in m.parameters())
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp]
        return (
            f"crate-train: model {cfg['model']} ({params / 1e6:.2f}M parameters, {len(m.blocks)}+"
            f"{len(m.decoder_blocks)} layers, width {m.cls_token.shape[-1]}, {cfg['input_size']}px, "
            f"patch {cfg['patch_size']}, backend {cfg['backend'] or get_backend()})\n"
            f"  data: {self.data_desc}, {counted(self.num_workers, 'loading worker')}\n"
            f"  {counted(self.dist.world_size, 'process')} on {self.device}, amp {amp}; effective batch "
            f"{self.global_batch}, lr {cfg['lr']:.3g}, {counted(self.total_steps, 'step')} "
            f"({self.steps_per_epoch} per epoch), "
            f"warmup {self.warmup_steps}, mask ratio {cfg['mask_ratio']}\n"
            f"  eval: {self.eval_desc or 'off'}\n"
            f"  output: {self.out}" + (f" (resuming at step {self.step})" if self.step else "")
            + f"; TensorBoard: {self.monitor.tensorboard}"
        )


def train(cfg: dict) -> dict:
    """Run pretraining with a resolved configuration (``config.resolve``); returns a summary of the end state.

    Holds an exclusive lock on the output directory for the whole run. Errors meant for the user are
    ``TrainError``/``DatasetError``/``ConfigError``.
    """
    return run.launch(cfg, Trainer)


def main(argv: list[str] | None = None) -> int:
    """``python -m crate_kernels.train`` / ``crate-train``: parse flags, train, report errors as one line."""
    return flags.command_main("crate-train", lambda a: resolve(a, distributed.world_size_from_env()), train, argv,
                              flags.RESUME_HINT)
