"""The training engine shared by pretraining (``crate_kernels.train``) and fine-tuning (``crate_kernels.finetune``).

``Run`` owns what every training command needs: the sharded, seeded data order and its loader, AdamW with per-group
lr scales under warmup + cosine, AMP and loss scaling, gradient accumulation under DDP, the step loop that never
waits for the device between reports, atomic checksummed checkpoints with exact resume (model, optimizer, scaler,
step, RNG states and data position), stop signals that save the step, non-finite-loss checks, the logs. A command
subclasses it and supplies the model, the data, the loss of a batch, its evaluation and its final outputs.
``launch(cfg, RunClass)`` runs one with the output directory locked; ``flags.command_main`` is a command's entry
point.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch

from .. import checkpoint
from ..errors import DatasetError, StopRequested, TrainError
from ..models.hub import hub_available
from ..models.pretrained import load_checkpoint
from ..ops import tuning
from ..ops.backend import get_backend, resolve_backend
from . import distributed
from .data import ShardedBatchSampler, UnreadableImages, counted, default_num_workers, normalize, stop_workers
from .monitor import Monitor


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from 0, then half-cycle cosine to min_lr."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def amp_dtype(amp: str, device: torch.device, auto_fp16: bool = True) -> torch.dtype | None:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs (off with ``auto_fp16=False``: what runs without
    a loss scaler, e.g. the probe's feature extraction), off (None) elsewhere."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16" if auto_fp16 else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


# Dense bf16/fp16 tensor-core peaks (FLOP/s, datasheets) of the GPUs MFU is reported for, by name fragment.
_PEAK_FLOPS = (("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
               ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12))


def peak_flops(device: torch.device, amp: torch.dtype | None) -> float | None:
    """The datasheet bf16/fp16 dense peak of ``device`` when training in mixed precision, else None."""
    if device.type != "cuda" or amp is None:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in _PEAK_FLOPS if fragment in name), None)


class LossMeter:
    """Step losses kept on the device: sums over the reporting window and the epoch, and the first step whose
    loss was not finite (inf when none). Nothing is read back until a report asks (``take_window``)."""

    def __init__(self, device: torch.device):
        self.window = torch.zeros((), device=device)
        self.epoch = torch.zeros((), device=device)
        self.window_steps = self.epoch_steps = 0
        self.first_bad = torch.full((), math.inf, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        self.window += loss
        self.epoch += loss
        self.window_steps += 1
        self.epoch_steps += 1
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp(max=float(step)))

    def take_window(self, dist: distributed.Dist) -> tuple[int, float]:
        """(steps, mean loss over them and over ranks) of the window, which restarts."""
        steps, mean = self.window_steps, dist.mean(self.window / max(1, self.window_steps)).item()
        self.window.zero_()
        self.window_steps = 0
        return steps, mean

    def epoch_mean(self, dist: distributed.Dist) -> float:
        mean = dist.mean(self.epoch / max(1, self.epoch_steps)).item()
        self.epoch.zero_()
        self.epoch_steps = 0
        return mean


def leave_stop_signals_to_the_main(worker_id: int) -> None:
    """Data-loading workers ignore SIGTERM and SIGINT, which schedulers and terminals send to every process of a
    job: the main process finishes its step, saves, and then ends the workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Run:
    """One training run (one process of it under torchrun). Subclasses provide:

    ``build_data()``: the training set, through ``make_loader(views, collate)``, whose batches are tuples
    ``(uint8 images (B, 3, S, S) or None, *tensors, failed reads)``; ``build_model()``: the module to train;
    ``param_groups()``: optimizer groups (each may carry ``lr_scale``); ``make_optimizer(groups)`` (AdamW unless
    overridden); ``batch_loss(model, imgs, *tensors)``: the loss of one normalised batch on the device;
    ``evaluate(epoch_end, final)``; ``finish()``: final outputs and the summary; ``banner()``;
    ``save_config(path, header)``. Class attributes: ``program`` (message prefix),
    ``recipe_keys`` (settings a resume compares), ``strict_recipe`` (a changed recipe on resume is an error instead
    of a note), ``betas`` (AdamW's).
    """

    program = "crate-run"
    recipe_keys: tuple[str, ...] = ()
    strict_recipe = False
    betas = (0.9, 0.999)

    def __init__(self, cfg: dict, dist: distributed.Dist):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.out = cfg["output_dir"]
        self.step, self.last_saved, self.base_lr = 0, None, 0.0
        self.monitor = None
        self.build_data()
        self._build_model()
        self.amp = amp_dtype(cfg["amp"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.losses = LossMeter(self.device)
        self.data_wait, self.last_loss, self.first_step_seconds, self.first_step_logged = 0.0, float("nan"), None, False
        self.flops_per_image = self.train_flops_per_image() if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ hooks
    def build_data(self) -> None:
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def batch_loss(self, model, imgs: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The optimizer over ``groups`` at lr ``cfg['lr']``: AdamW with ``betas`` (fused on CUDA)."""
        return torch.optim.AdamW(groups, lr=self.cfg["lr"], betas=self.betas, fused=self.device.type == "cuda")

    def evaluate(self, epoch_end: bool, final: bool) -> None:
        """Called after every step, before any checkpoint of that step is written; by default nothing."""

    def finish(self) -> dict:
        return {"step": self.step, "loss": self.last_loss}

    def banner(self) -> str:
        return f"{self.program}: {counted(self.total_steps, 'step')}"

    def save_config(self, path: str, header: str) -> None:
        raise NotImplementedError

    def train_flops_per_image(self) -> float | None:
        return None

    def extra_state(self) -> dict:
        """More to keep in each checkpoint (restored by ``load_extra_state``)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ------------------------------------------------------------------ set-up
    def make_loader(self, views: torch.utils.data.Dataset, collate, description: str) -> None:
        """The training loader over ``views`` (indexed by (item, sample seed) pairs from the sharded sampler), the
        unreadable-image tally, and the schedule's lengths."""
        cfg, dist = self.cfg, self.dist
        self.data_desc = description
        stream = isinstance(views, torch.utils.data.IterableDataset)  # WebDataset shards: the stream is its own order
        self.sampler = views if stream else ShardedBatchSampler(len(views), cfg["batch_size"], dist.world_size,
                                                                dist.rank, cfg["seed"], cfg["accum_iter"])
        self.global_batch = cfg["batch_size"] * cfg["accum_iter"] * dist.world_size
        if self.sampler.num_batches == 0:
            raise DatasetError(
                f"the dataset, {description}, is smaller than one optimizer step: "
                f"batch_size x accum_iter x processes = {self.global_batch} images"
            )
        self.num_workers = default_num_workers() if cfg["num_workers"] is None else cfg["num_workers"]
        if stream:  # at most one worker per shard of this process; each epoch starts them anew with its order
            self.num_workers = views.set_workers(self.num_workers)
        batching = {"batch_size": cfg["batch_size"]} if stream else {"batch_sampler": self.sampler}
        self.loader = torch.utils.data.DataLoader(
            views, **batching, num_workers=self.num_workers, collate_fn=collate,
            pin_memory=cfg["pin_mem"] and self.device.type == "cuda",
            persistent_workers=self.num_workers > 0 and not stream,
            generator=torch.Generator().manual_seed(cfg["seed"]), worker_init_fn=leave_stop_signals_to_the_main,
        )
        self.unreadable = UnreadableImages(cfg["max_unreadable"], self.warn)
        self.steps_per_epoch = self.sampler.num_batches // cfg["accum_iter"]
        self.total_steps = cfg["max_steps"] or cfg["epochs"] * self.steps_per_epoch
        self.warmup_steps = (cfg["warmup_steps"] if cfg["warmup_steps"] is not None
                             else round(cfg["warmup_epochs"] * self.steps_per_epoch))

    def _build_model(self) -> None:
        cfg = self.cfg
        seed_everything(cfg["seed"])  # identical initial weights on every rank
        self.model = self.build_model().to(self.device)
        self.optimizer = self.make_optimizer(self.param_groups())
        self.ddp = self.model
        if self.dist.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # what the step calls: under --compile the (DDP-wrapped) model compiled as one graph per bucket
        self.step_model = torch.compile(self.ddp) if cfg.get("compile") else self.ddp
        seed_everything(cfg["seed"] + self.dist.rank)

    def warn(self, text: str) -> None:
        if self.monitor is not None:
            self.monitor.say(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def say(self, text: str) -> None:
        if self.dist.is_main:
            (self.monitor.say if self.monitor else print)(text)

    # ------------------------------------------------------------------ resume
    def resume_source(self) -> tuple[str, dict] | None:
        """(path, checkpoint) to start from: this run's own checkpoint-last.pth (with --auto_resume), else
        --resume, else None. An unreadable or corrupted checkpoint-last.pth gives way to --resume when one is
        given; otherwise the error names the newest readable numbered checkpoint to continue from."""
        last, asked = os.path.join(self.out, "checkpoint-last.pth"), self.cfg["resume"]
        if self.cfg["auto_resume"] and os.path.isfile(last):
            try:
                ckpt = checkpoint.load(last)
            except TrainError as e:
                if asked:
                    self.warn(f"warning: {e}; continuing from --resume {asked} instead")
                    return asked, checkpoint.load(asked)
                older = self._newest_readable_numbered_checkpoint()
                offer = (f"the newest readable earlier checkpoint is {older}: to continue from it, run the same "
                         f"command with --resume {older}" if older else "no earlier numbered checkpoint is readable")
                raise TrainError(f"{e}; {offer}") from e
            if asked and os.path.abspath(asked) != os.path.abspath(last):
                self.warn(f"note: --resume {asked} is not used: {last} continues this output directory's own run "
                          "(--auto_resume); to start from the --resume file, use a new --output_dir")
            return last, ckpt
        return (asked, checkpoint.load(asked)) if asked else None

    def _newest_readable_numbered_checkpoint(self) -> str | None:
        numbered = []
        for name in os.listdir(self.out):
            stem = name[len("checkpoint-"):-len(".pth")] if name.startswith("checkpoint-") else ""
            if name.endswith(".pth") and stem.isdigit():
                numbered.append((int(stem), os.path.join(self.out, name)))
        for _, path in sorted(numbered, reverse=True):
            try:
                checkpoint.load(path)
                return path
            except TrainError:
                continue
        return None

    def load_weights(self, ckpt: dict) -> None:
        load_checkpoint(self.model, ckpt)

    def resume(self, path: str, ckpt: dict) -> None:
        """Restore model, optimizer, scaler, step and RNG states from the checkpoint ``ckpt`` read from ``path``;
        a weights-only file just initialises the model. A changed recipe is noted (or, with ``strict_recipe``,
        refused before anything is written)."""
        saved = ckpt.get("args", {}) if isinstance(ckpt.get("args"), dict) else {}
        changed = [f"{k} {saved[k]!r} -> {self.cfg[k]!r}" for k in self.recipe_keys
                   if k in saved and saved[k] != self.cfg[k]]
        if "optimizer" in ckpt and saved.get("world_size", self.dist.world_size) != self.dist.world_size:
            changed.append(f"processes {saved['world_size']} -> {self.dist.world_size}")
        if changed and self.strict_recipe and "optimizer" in ckpt:
            raise TrainError(f"cannot resume from {path}: it was trained with other settings ({', '.join(changed)}); "
                             "run the original command to continue it, or choose a new --output_dir for a new run")
        try:
            self.load_weights(ckpt)
        except (ValueError, RuntimeError) as e:
            hint = ("" if path == self.cfg["resume"]
                    else " (found by --auto_resume: use another --output_dir for a new run)")
            raise TrainError(f"cannot resume from {path}{hint}: {e}") from e
        if "optimizer" not in ckpt:
            self.say(f"initialised the model from {path} (no training state in it): starting at step 0")
            return
        self._load_optimizer(ckpt["optimizer"], path)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = self.last_saved = int(ckpt["step"])
        rng = ckpt["rng"]
        checkpoint.set_rng_state(rng[self.dist.rank % len(rng)])
        counts = ckpt["data"].get("unreadable", [])
        if counts:
            self.unreadable.failed, self.unreadable.reads = counts[self.dist.rank % len(counts)]
        self.load_extra_state(ckpt.get("extra", {}))
        self.say(f"resumed from {path} at step {self.step}"
                 + (f"; changed settings (the run will not replay the original exactly): {', '.join(changed)}"
                    if changed else ""))

    def _load_optimizer(self, state: dict, path: str) -> None:
        own = [g["param_names"] for g in self.optimizer.param_groups]
        saved = [g.get("param_names") for g in state["param_groups"]]
        if own != saved:
            diff = sorted(set(sum((s or [] for s in saved), [])) ^ set(sum(own, [])))
            raise TrainError(
                f"cannot resume from {path}: its optimizer state does not fit this model's parameter groups "
                f"(groups of {[len(s or []) for s in saved]} vs {[len(g) for g in own]} parameters"
                + (f"; parameters in only one of them: {', '.join(diff)}" if diff else "; same names, other grouping")
                + ")"
            )
        self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    def save(self, numbered: bool) -> None:
        """checkpoint-last.pth (and checkpoint-<epoch>.pth when ``numbered``), written by rank 0 only, after
        checking that no step since the last check had a non-finite loss."""
        self.check_finite()
        # collective: every rank calls save at the same steps
        per_rank = self.dist.gather((checkpoint.rng_state(), (self.unreadable.failed, self.unreadable.reads)))
        self.on_main(lambda: self._write_checkpoints(per_rank, numbered))
        self.last_saved = self.step

    def _write_checkpoints(self, per_rank: list, numbered: bool) -> None:
        epoch = self.step // self.steps_per_epoch
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "epoch": epoch,
            "lr": self.lr(),
            "data": {"seed": self.cfg["seed"], "epoch": epoch,
                     "batches_done": self.step % self.steps_per_epoch * self.cfg["accum_iter"],
                     "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
                     "unreadable": [counts for _, counts in per_rank]},  # (failed reads, reads) per rank
            "rng": [rng for rng, _ in per_rank],
            "args": {**self.cfg, "world_size": self.dist.world_size},
            "extra": self.extra_state(),
        }
        self.write(checkpoint.save, state, os.path.join(self.out, "checkpoint-last.pth"))
        if numbered:
            self.write(checkpoint.save, state,
                       os.path.join(self.out, f"checkpoint-{(self.step - 1) // self.steps_per_epoch}.pth"))

    def publish(self, config: dict | None = None) -> None:
        """Collective: rank 0 writes the model as a save_pretrained folder, output_dir/hf (config.json updated with
        ``config``, model.safetensors, a model card naming the command and the data), and pushes it to
        --push_to_hub REPO when given. Without huggingface_hub (the extra hub) there is no folder, only a note."""
        if not hub_available():
            self.say("no Hugging Face folder (output_dir/hf): huggingface_hub is not installed "
                     "(pip install 'crate_kernels[hub]')")
            return
        repo, folder = self.cfg.get("push_to_hub"), os.path.join(self.out, "hf")
        card = {"command": f"`{self.cfg.get('command') or 'not recorded'}`", "data": self.data_desc, "repo_id": repo}

        def write():
            self.write(lambda model, path: model.save_pretrained(path, config=config, model_card_kwargs=card),
                       self.model, folder)
            if repo:
                try:
                    url = self.model.push_to_hub(repo, config=config, model_card_kwargs=card)
                except Exception as e:  # network, authentication, a repo of someone else's: one line, folder kept
                    raise TrainError(f"--push_to_hub {repo} failed ({type(e).__name__}: {e}); {folder} holds the "
                                     f"model: push it later with `hf upload {repo} {folder}`") from None
                self.say(f"pushed {folder} to the Hugging Face Hub: {url}")

        self.on_main(write)

    def agree(self, error: Exception | None) -> None:
        """Collective: when any rank passes an error, every rank raises (the failing rank its own error, the others
        the first failing rank's message), so no process is left waiting in a collective for one that stopped."""
        if self.dist.all_true(error is None):
            return
        found = self.dist.gather(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        kind, message = next(e for e in found if e is not None)
        raise (DatasetError if kind == "DatasetError" else TrainError)(message)

    def on_main(self, action) -> None:
        """Collective: ``action()`` (a write) on rank 0; a ``TrainError`` it raises stops every rank."""
        error = None
        if self.dist.is_main:
            try:
                action()
            except TrainError as e:
                error = e
        self.agree(error)

    def write(self, save, obj, path: str, **kwargs) -> None:
        """``save(obj, path)``; a failed write (a full disk, a lost mount) stops the run with one message, and the
        previous file at ``path`` is intact (writes are atomic)."""
        try:
            save(obj, path, **kwargs)
        except OSError as e:
            kept = (f"checkpoint-last.pth (step {self.last_saved}) is intact" if self.last_saved
                    else "no checkpoint was written before")
            raise TrainError(f"cannot write {path}: {e.strerror or e}; {kept}; free space (or fix the output "
                             "directory) and run the same command again to continue") from e

    # ------------------------------------------------------------------ steps
    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over ``accum_iter`` batches; returns this rank's mean loss as a device scalar.

        Nothing here waits for the device: the loss stays on it (``self.losses`` sums it and notes the first
        non-finite step), and ``report``/``save`` read it."""
        cfg, accum = self.cfg, self.cfg["accum_iter"]
        self.base_lr = lr_at(self.step, cfg["lr"], cfg["min_lr"], self.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * group.get("lr_scale", 1.0)
        total = torch.zeros((), device=self.device)
        for i in range(accum):
            waited = time.perf_counter()
            imgs, *tensors, failures = next(batches)
            self.data_wait += time.perf_counter() - waited
            error = None
            try:
                self.unreadable.add(failures, None if imgs is None else len(imgs))
            except DatasetError as e:
                error = e
            self.agree(error)  # before any backward: DDP's would wait for a rank that stopped
            imgs = normalize(imgs.to(self.device, non_blocking=True))
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
            sync = self.ddp.no_sync() if self.dist.active and i < accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    loss = self.batch_loss(self.step_model, imgs, *tensors)
                self.scaler.scale(loss / accum).backward()
            total += loss.detach().float()
        if cfg["clip_grad"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.add(total / accum, self.step)
        return total / accum

    def check_finite(self) -> None:
        """Stop, naming the first step whose loss was NaN or inf on any rank, before anything is written after it."""
        first_bad = self.dist.minimum(self.losses.first_bad).item()
        if math.isfinite(first_bad):
            where = (f"the last good checkpoint, {os.path.join(self.out, 'checkpoint-last.pth')} (step "
                     f"{self.last_saved}), was kept" if self.last_saved is not None
                     else "no checkpoint had been written")
            raise TrainError(f"training diverged: the loss is not finite at step {int(first_bad)} "
                             f"(epoch {(int(first_bad) - 1) // self.steps_per_epoch}); stopped without saving; {where}")

    def close(self) -> None:
        """End the data-loading workers and close the logs (every way a run ends goes through here)."""
        if hasattr(self, "loader"):
            stop_workers(self.loader, getattr(self, "batches", None))
        if self.monitor is not None:
            self.monitor.close()

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Train to the end, or until SIGTERM or SIGINT: then finish the step, save checkpoint-last.pth and stop
        (a second SIGINT stops at once, keeping the last checkpoint)."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return self._run()

        def request_stop(signum, frame):
            if signum == signal.SIGINT and self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            if signum == signal.SIGINT and self.dist.is_main:
                print(f"{self.program}: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr,
                      flush=True)

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM or SIGINT (a collective, so every rank stops at the same step)."""
        return not self.dist.all_true(self.stop_signal is None)

    def on_start(self) -> None:
        """After resuming and opening the logs, before the first step."""

    def _run(self) -> dict:
        cfg, dist = self.cfg, self.dist
        source = self.resume_source()
        if source:
            self.resume(*source)
        if dist.is_main:
            self.write_config()
        self.monitor = Monitor(self.out, cfg["log_dir"] or self.out, cfg["tensorboard"], self.total_steps,
                               self.step, dist.is_main, wandb_config=cfg if cfg.get("log_wandb") else None)
        if dist.is_main:
            self.say(self.banner())
            if self.warmup_steps >= self.total_steps:
                self.say(self.warmup_note())
        self.on_start()
        spe = self.steps_per_epoch
        self.window_start = self.epoch_start = time.perf_counter()
        while self.step < self.total_steps:
            epoch = self.step // spe
            self.sampler.set_epoch(epoch, self.step % spe * cfg["accum_iter"])
            batches = self.batches = iter(self.loader)  # kept: close() ends its workers (a stream's are not persistent)
            while self.step < self.total_steps:
                first = self.first_step_seconds is None
                if first:
                    self.say(f"first step: operators under backend auto are tuned on it ({tuning.cache_note()})")
                started = time.perf_counter()
                with tuning.agreeing() if first else contextlib.nullcontext():  # ranks take rank 0's choices
                    self.train_step(batches)
                if first:
                    self.first_step_seconds = time.perf_counter() - started
                    if cfg.get("compile"):
                        self.say(f"torch.compile: the first step (compiling the model) took "
                                 f"{self.first_step_seconds:.1f} s")
                    self.say(f"first step took {self.first_step_seconds:.1f} s ({tuning.stats_note()})")
                    self.window_start = time.perf_counter()  # img/s counts trained steps, not compiling or tuning
                self.monitor.advance()
                epoch_end, final = self.step % spe == 0, self.step == self.total_steps
                if self.step % cfg["log_every"] == 0 or final:
                    self.report(epoch)
                if epoch_end:
                    self.check_finite()
                    self.monitor.epoch(epoch, self.step, self.losses.epoch_mean(self.dist), self.lr(),
                                       time.perf_counter() - self.epoch_start)
                    self.epoch_start = time.perf_counter()
                paused = time.perf_counter()
                self.evaluate(epoch_end, final)
                if epoch_end or final or self.step % cfg["save_every"] == 0:
                    self.save(numbered=final or (epoch_end and (epoch + 1) % cfg["save_every_epochs"] == 0))
                self.window_start += time.perf_counter() - paused  # img/s counts training only
                if self._stop_requested():
                    if self.last_saved != self.step:
                        self.save(numbered=False)
                    signum = self.stop_signal or signal.SIGTERM
                    message = (f"stopped by {signal.Signals(signum).name} at step {self.step}; "
                               f"{os.path.join(self.out, 'checkpoint-last.pth')} holds it: run the same command "
                               "again to continue")
                    self.say(message)
                    raise StopRequested(signum, message)
                if epoch_end:
                    break
        self.check_finite()
        summary = self.finish()
        skipped = (f"; skipped {self.unreadable.failed} unreadable image reads ({len(self.unreadable.seen)} files "
                   "in this session)" if self.unreadable.failed else "")
        self.say(f"done: {self.step} steps; outputs in {self.out}{skipped}")
        return summary

    def lr(self) -> float:
        """The lr of the last step (groups with an ``lr_scale`` took that fraction of it)."""
        return self.base_lr

    def report(self, epoch: int) -> None:
        """A log line for the steps since the last one: mean loss over ranks (the one point where the host waits
        for the device), img/s, the fraction of the time spent waiting for data, and on CUDA peak memory and
        model FLOPs utilisation."""
        self.check_finite()
        steps, loss = self.losses.take_window(self.dist)
        self.last_loss = loss
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        img_s = steps * self.global_batch / seconds
        extra = {"data_wait": round(min(1.0, self.data_wait / seconds), 3)}
        if not self.first_step_logged:  # the first step's latency (tuning, compiling) on the first log line
            extra["first_step_s"], self.first_step_logged = round(self.first_step_seconds, 2), True
        if self.device.type == "cuda":
            extra["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
            peak = peak_flops(self.device, self.amp)
            if peak and self.flops_per_image:
                extra["mfu"] = round(self.flops_per_image * img_s / self.dist.world_size / peak, 4)
        self.monitor.train(self.step, epoch, loss, self.lr(), img_s, self.unreadable.failed, **extra)
        self.window_start, self.data_wait = time.perf_counter(), 0.0

    def warmup_note(self) -> str:
        """One line for a run that ends inside its lr warmup (``warmup_steps >= total_steps``)."""
        top = lr_at(self.total_steps - 1, self.cfg["lr"], self.cfg["min_lr"], self.warmup_steps, self.total_steps)
        return (f"  note: the run ends inside the lr warmup: {counted(self.total_steps, 'step')}"
                f"{' (--max_steps)' if self.cfg['max_steps'] else ''}, warmup {self.warmup_steps}; the lr only "
                f"rises, to {top:.3g} of {self.cfg['lr']:.3g}, and the cosine decay never starts")

    def write_config(self) -> None:
        header = (f"# {self.program} resolved configuration ({time.strftime('%Y-%m-%d %H:%M:%S')}); processes: "
                  f"{self.dist.world_size}, effective batch: {self.global_batch}, steps per epoch: "
                  f"{self.steps_per_epoch}, total steps: {self.total_steps}, warmup steps: {self.warmup_steps}\n")
        self.save_config(os.path.join(self.out, "args.yaml"), header)


def check_backend(backend: str | None, device: torch.device) -> None:
    """Refuse, before any output is written, an operator backend that cannot run on ``device``."""
    try:
        name = get_backend() if backend is None else backend
    except ValueError as e:  # a misspelt $CRATE_KERNELS_BACKEND
        raise TrainError(str(e)) from e
    probe = torch.empty(0, device=device)
    try:
        resolve_backend(name, probe, ("reference", "torch", "triton", "cuda"))
    except (RuntimeError, NotImplementedError) as e:
        raise TrainError(f"--backend {name} cannot run on {device}: {e}") from e


def _missing_folders(path: str) -> list[str]:
    """The folders of ``path`` (itself and its parents) that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def launch(cfg: dict, run_class: type[Run]) -> dict:
    """Run ``run_class`` with a resolved configuration; returns its summary.

    Holds an exclusive lock on the output directory for the whole run (its ``.lock`` file removed at the end); a start
    that wrote nothing leaves nothing.
    Errors meant for the user are ``TrainError``/``DatasetError``/``ConfigError``.
    """
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    dist = distributed.init(cfg["device"], cfg["dist_backend"])
    lock = checkpoint.OutputLock(cfg["output_dir"])
    created = _missing_folders(cfg["output_dir"])
    job = None
    try:
        check_backend(cfg["backend"], dist.device)
        error = None
        if dist.is_main:
            try:
                os.makedirs(cfg["output_dir"], exist_ok=True)
                if not lock.acquire():
                    error = (f"output directory {cfg['output_dir']} is in use by another run (process "
                             f"{lock.holder()} holds {lock.path}); wait for it to finish or choose another "
                             "--output_dir")
            except OSError as e:
                error = f"cannot use output directory {cfg['output_dir']}: {e}"
        if not dist.all_true(error is None):
            raise TrainError(error or f"rank 0 could not lock the output directory {cfg['output_dir']}")
        if dist.is_main:
            checkpoint.remove_stale_temporaries(cfg["output_dir"])
        job = run_class(cfg, dist)
        summary = job.run()
        dist.barrier()  # all ranks done (rank 0 writes last) before the process group goes away
        return summary
    finally:
        if job is not None:
            job.close()
        job = None  # its DDP wrapper holds the process group: shutdown() below frees both
        if lock.file is not None:  # however the run ended; a start that wrote nothing leaves no folder it made
            lock.release(remove=True)
            for folder in created:
                if os.listdir(folder):
                    break
                os.rmdir(folder)
        distributed.shutdown()
