"""Crash-safe checkpoints, RNG state capture, and the output-directory lock.

Files are written to a temporary file in the destination folder, flushed, fsync'ed and renamed over the
target (``os.replace`` is atomic on POSIX), so a crash mid-write leaves the previous file intact. Checkpoints
hold only tensors, plain containers, numbers and strings, and load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import secrets

import numpy as np
import torch


class TrainError(RuntimeError):
    """A training failure reported to the user as one message (no traceback)."""


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str) -> str:
    """A fresh hidden name next to ``path`` (``.<name>.<pid>.<random>.tmp``) for writing it atomically."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then fsync and rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as any new file (umask applies)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def remove_stale_temporaries(folder: str) -> None:
    """Delete temporary files that ``atomic_write`` left behind when a process was killed mid-write.

    Only call this while holding the folder's ``OutputLock``, so no live writer owns them.
    """
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def save(obj, path: str) -> None:
    """``torch.save`` made atomic."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_safetensors(state_dict: dict, path: str, metadata: dict | None = None) -> None:
    """A state_dict as .safetensors (atomic); loadable with ``crate_kernels.load_checkpoint``."""
    from safetensors.torch import save as to_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda f: f.write(to_bytes(tensors, metadata=metadata)))


def load(path: str) -> dict:
    """Load a checkpoint on CPU as {'model': state_dict, ...}; errors name the file.

    Takes this trainer's checkpoints (``torch.load`` with ``weights_only=True``) and weights alone: a bare
    state_dict in a .pth (e.g. a release checkpoint without its wrapper) or a .safetensors file (this
    trainer's model.safetensors)."""
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return {"model": load_file(path)}
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise several types for truncated or foreign files
        raise TrainError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(ckpt, dict) and "model" not in ckpt and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # weights only
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise TrainError(f"{path} holds neither a training checkpoint nor model weights "
                         "(expected {'model': state_dict, ...} or a state_dict)")
    return ckpt


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, numpy, python) as tensors and plain lists."""
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],  # this rank's device
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---------------------------------------------------------------------------------------------- lock
class OutputLock:
    """An exclusive ``flock`` on ``<output_dir>/.lock`` held for the whole run.

    The kernel drops the lock when the process dies (even by SIGKILL), so a crashed run never blocks the next.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, ".lock")
        self.file = None

    def acquire(self) -> bool:
        import fcntl

        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            return False
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return True

    def holder(self) -> str:
        """The pid written by the run holding the lock (best effort)."""
        try:
            with open(self.path) as f:
                return f.read().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
