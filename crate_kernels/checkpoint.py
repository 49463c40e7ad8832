"""Crash-safe, checksummed checkpoints, RNG state capture, and the output-directory lock.

Files are written to a temporary file in the destination folder, flushed, fsync'ed and renamed over the
target (``os.replace`` is atomic on POSIX), so a crash mid-write leaves the previous file intact. Checkpoints
hold only tensors, plain containers, numbers and strings, and load with ``torch.load(weights_only=True)``.
A ``.pth`` written here carries the SHA-256 of its bytes in the ZIP archive's comment (torch.save writes ZIP
archives; any ZIP reader, torch.load included, ignores the comment), so ``load`` refuses a corrupted file
instead of returning wrong weights; a ``.safetensors`` carries the digest of its tensors in its metadata.

It sits below the models (``models.pretrained`` reads checkpoints with ``load``) and imports only ``errors``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import struct

import numpy as np
import torch

from .errors import TrainError


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


def save_json(obj, path: str) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def folder_beside(source: str, name: str) -> str:
    """The folder ``name`` where a command's outputs about ``source`` go by default: inside it when it is a run
    directory, else beside the checkpoint file."""
    return os.path.join(source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)), name)


def make_output_dir(path: str) -> None:
    """Create ``path`` (and its parents); a failure is a ``TrainError`` naming --output_dir."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create --output_dir {path}: {e}") from e


def remove_stale_temporaries(folder: str) -> None:
    """Delete temporary files that ``atomic_write`` left behind when a process was killed mid-write.

    Only call this while holding the folder's ``OutputLock``, so no live writer owns them.
    """
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


_EOCD = b"PK\x05\x06"  # the ZIP end-of-central-directory record: 22 bytes, then a comment of up to 65535
_DIGEST_TAG = b"crate_kernels sha256 "


class _DigestWriter:
    """A file wrapper for torch.save that hashes what is written, except the archive's final 22-byte record,
    and at ``close`` stores the digest as that record's comment."""

    def __init__(self, file):
        self.file, self.sha, self.tail = file, hashlib.sha256(), b""

    def write(self, data) -> int:
        data = bytes(data)
        pending = self.tail + data
        self.file.write(pending[:-22])
        self.sha.update(pending[:-22])
        self.tail = pending[-22:]
        return len(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if not self.tail.startswith(_EOCD):
            raise ValueError("torch.save did not end with a ZIP end-of-central-directory record")
        comment = _DIGEST_TAG + self.sha.hexdigest().encode()
        self.file.write(self.tail[:20] + struct.pack("<H", len(comment)) + comment)


def _verify_digest(path: str) -> None:
    """Raise TrainError when a .pth written by ``save`` no longer matches its digest (files without one pass)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 22 - len(_DIGEST_TAG) - 64))
        end = f.read()
        start = end.rfind(_EOCD)
        if start < 0 or not end[start + 22:].startswith(_DIGEST_TAG):
            return
        expected = end[start + 22 + len(_DIGEST_TAG):].decode(errors="replace")
        body = size - len(end) + start
        sha, done = hashlib.sha256(), 0
        f.seek(0)
        while done < body:
            chunk = f.read(min(1 << 24, body - done))
            if not chunk:
                break
            sha.update(chunk)
            done += len(chunk)
    if sha.hexdigest() != expected:
        raise TrainError(f"checkpoint {path} is corrupted: its contents no longer match the SHA-256 written with it")


def save(obj, path: str) -> None:
    """``torch.save`` made atomic and checksummed (see the module docstring)."""

    def write(f):
        writer = _DigestWriter(f)
        torch.save(obj, writer)
        writer.close()

    atomic_write(path, write)


def _tensors_digest(tensors: dict) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        sha.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()


def save_safetensors(state_dict: dict, path: str, metadata: dict | None = None) -> None:
    """A state_dict as .safetensors (atomic, with the SHA-256 of its tensors in the metadata); loadable with
    ``crate_kernels.load_checkpoint``."""
    from safetensors.torch import save as to_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {**(metadata or {}), "sha256": _tensors_digest(tensors)}
    atomic_write(path, lambda f: f.write(to_bytes(tensors, metadata=metadata)))


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint on CPU as {'model': state_dict, ...}; errors name the file.

    Takes this trainer's checkpoints (``torch.load`` with ``weights_only=True``, after checking their digest)
    and weights alone: a bare state_dict in a .pth (e.g. a release checkpoint without its wrapper) or a
    .safetensors file (this trainer's model.safetensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                expected = (f.metadata() or {}).get("sha256")
            tensors = load_file(path)
            if expected is not None and _tensors_digest(tensors) != expected:
                raise TrainError(f"checkpoint {path} is corrupted: its tensors no longer match the SHA-256 "
                                 "written with them")
            return {"model": tensors}
        _verify_digest(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except TrainError:
        raise
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
    """An exclusive ``flock`` on ``<output_dir>/.lock`` held for the whole run; the file is removed when the run
    ends (``release(remove=True)``).

    The kernel drops the lock when the process dies (even by SIGKILL), so a crashed run never blocks the next.
    A lock taken on a file that its holder removed meanwhile is retried on the new file.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, ".lock")
        self.file = None

    def acquire(self) -> bool:
        import fcntl

        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.close()
                self.file = None
                return False
            try:
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.file.close()  # the previous holder removed this file as we opened it
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

    def release(self, remove: bool = False) -> None:
        """Drop the lock; ``remove``: delete the file first, while still holding it."""
        if self.file is not None:
            if remove and os.path.exists(self.path):
                os.remove(self.path)
            self.file.close()
            self.file = None
