"""Where training reports go (rank 0 only): log.txt (JSON lines), a progress bar or plain lines, TensorBoard, and
Weights & Biases with --log_wandb (the same scalars and reconstruction images as TensorBoard; the run's id is kept in
output_dir/wandb-run-id, so a resumed run continues the same W&B run).

log.txt holds one JSON object per line with a ``type``: ``train`` (every --log_every steps: step, epoch,
loss, lr, img_s, elapsed, unreadable_reads: image reads that failed so far and were replaced, data_wait: the
fraction of the time the step waited for the data loader, and on CUDA peak_mem_gib and mfu: model FLOPs
utilisation against the GPU's datasheet bf16/fp16 peak), ``eval`` (every --eval_every steps: eval_loss and
per-layer coding_rate/sparsity with their std; fine-tuning: top1, top5, eval_loss) or ``epoch`` (epoch-end summary).
A resumed run first drops the lines past its checkpoint, so the log reads as if the run had never stopped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys
import time

from ..checkpoint import atomic_write

_LABELS = {"data_wait": "data wait", "peak_mem_gib": "peak mem GiB", "mfu": "MFU", "first_step_s": "first step s"}
_FORMATS = {"data_wait": ".0%", "peak_mem_gib": ".1f", "mfu": ".1%", "first_step_s": ".1f"}


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _terminal() -> bool:
    """stderr is a terminal of known width (so a progress bar can be drawn)."""
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError):
        return False


def read_log(path: str) -> list[dict]:
    """The records of a log.txt (missing file: none)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Monitor:
    """Reports of one run; every method is a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(self, output_dir: str, log_dir: str, tensorboard: bool, total_steps: int, start_step: int,
                 enabled: bool, wandb_config: dict | None = None):
        self.enabled, self.total, self.start_step = enabled, total_steps, start_step
        self.path = os.path.join(output_dir, "log.txt")
        self.evals, self.losses = [], []
        self.bar = self.tb = self.file = self.wandb = None
        if not enabled:
            return
        kept = [r for r in read_log(self.path) if r.get("step", 0) <= start_step]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        self.evals = [r for r in kept if r["type"] == "eval"]
        self.losses = [(r["step"], r["loss"]) for r in kept if r["type"] == "train"]
        self.file = open(self.path, "a")
        if _terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir, purge_step=start_step or None)
        if wandb_config is not None:
            self.wandb = _start_wandb(output_dir, log_dir, wandb_config)
        self.tensorboard = ("off" if not tensorboard else f"events in {log_dir}" if self.tb is not None
                            else "no events, the tensorboard package is not installed (pip install tensorboard)")
        self.t0 = time.perf_counter()

    def say(self, text: str) -> None:
        """A message that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def advance(self) -> None:
        """One optimizer step done."""
        if self.bar is not None:
            self.bar.update(1)

    def train(self, step: int, epoch: int, loss: float, lr: float, img_s: float, unreadable: int = 0,
              **extra: float) -> None:
        """A log line; ``unreadable``: failed image reads so far (skipped and replaced); ``extra``: further
        figures (data_wait, and on CUDA peak_mem_gib and mfu), logged and sent to TensorBoard as they are."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        self._write({"type": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                     "img_s": round(img_s, 1), "elapsed": round(elapsed, 1), "unreadable_reads": unreadable, **extra})
        self.losses.append((step, loss))
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/img_per_s", img_s, step)
            for key, value in extra.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({"train/loss": loss, "train/lr": lr, "train/img_per_s": img_s,
                            **{f"train/{key}": value for key, value in extra.items()}}, step=step)
        figures = f"loss {loss:.4f} lr {lr:.2e} {img_s:.0f} img/s" + "".join(
            f" {_LABELS[key]} {value:{_FORMATS[key]}}" for key, value in extra.items() if key in _LABELS)
        if self.bar is not None:
            self.bar.set_postfix_str(figures, refresh=False)
        else:
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total} epoch {epoch} {figures} elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}",
                  flush=True)

    def epoch(self, epoch: int, step: int, train_loss: float, lr: float, seconds: float) -> None:
        if self.enabled:
            self._write({"type": "epoch", "epoch": epoch, "step": step, "train_loss": train_loss, "lr": lr,
                         "epoch_time": round(seconds, 1)})

    def eval(self, step: int, epoch: int, eval_loss: float, stats: dict, grid) -> None:
        if not self.enabled:
            return
        record = {"type": "eval", "step": step, "epoch": epoch, "eval_loss": eval_loss, **stats}
        self._write(record)
        self.evals.append(record)
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", eval_loss, step)
            for key in ("coding_rate", "sparsity"):
                for layer, value in enumerate(stats[key], start=1):
                    self.tb.add_scalar(f"eval/{key}/layer{layer:02d}", value, step)
            self.tb.add_image("eval/reconstruction", grid, step)
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            image = (grid.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()  # (3, H, W) in [0, 1] -> HWC
            self.wandb.log({"eval/loss": eval_loss, "eval/reconstruction": wandb.Image(image),
                            **{f"eval/{key}/layer{layer:02d}": value for key in ("coding_rate", "sparsity")
                               for layer, value in enumerate(stats[key], start=1)}}, step=step)
        rates = " ".join(f"{v:.1f}" for v in stats["coding_rate"])
        sparse = " ".join(f"{v:.3f}" for v in stats["sparsity"])
        self.say(f"eval step {step}: loss {eval_loss:.4f} | coding rate per layer {rates} | "
                 f"non-zero fraction per layer {sparse}")

    def figure(self, name: str, path: str, step: int) -> None:
        """An image file (the white-box curves.png) to W&B, when logging there."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(path)}, step=step)

    def scores(self, step: int, epoch: int, scores: dict, text: str) -> None:
        """An ``eval`` record of figures (e.g. top1, top5, eval_loss), sent to TensorBoard under eval/, and
        ``text`` printed."""
        if not self.enabled:
            return
        record = {"type": "eval", "step": step, "epoch": epoch, **scores}
        self._write(record)
        self.evals.append(record)
        if self.tb is not None:
            for key, value in scores.items():
                self.tb.add_scalar(f"eval/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"eval/{key}": value for key, value in scores.items()}, step=step)
        self.say(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.bar = self.tb = self.file = self.wandb = None


def _start_wandb(output_dir: str, log_dir: str, config: dict):
    """A W&B run (project $WANDB_PROJECT, else crate_kernels; files under $WANDB_DIR, else ``log_dir``) named after
    the output directory, resumed by the id kept in output_dir/wandb-run-id."""
    import wandb

    id_path = os.path.join(output_dir, "wandb-run-id")
    if os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B's id form: 8 lowercase letters and digits
        atomic_write(id_path, lambda f: f.write(run_id.encode()))
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "crate_kernels"), id=run_id, resume="allow",
                      name=os.path.basename(os.path.abspath(output_dir)), config=config,
                      dir=os.environ.get("WANDB_DIR", log_dir))
