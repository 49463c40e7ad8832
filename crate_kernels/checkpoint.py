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

import argparse
import hashlib
import json
import os
import pickle
import random
import re
import secrets
import struct
import zipfile
from collections.abc import Mapping

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
    directory, beside the checkpoint file, or ./name/owner--repo for a Hub repo id (no local path)."""
    if not os.path.exists(source):
        return os.path.join(name, source.replace("/", "--"))
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


_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickle protocol 2, then torch.save's old magic number
_SIGNATURES = (  # leading bytes -> what a file starting with them is, for files that are not checkpoints
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"), (b"\x93NUMPY", "a NumPy array (.npy)"),
    (b"\x89HDF", "an HDF5 file"), (b"\x80", "a Python pickle not written by torch.save"),
)
_EXPECTED = "expected a .pth written by torch.save or a .safetensors file"
# MAE's training script (and so the CRATE-MAE release) saves its flags as an argparse.Namespace: plain data,
# allowed to weights-only loading so that such checkpoints load without unpickling anything else
torch.serialization.add_safe_globals([argparse.Namespace])


def _sniff(path: str) -> str:
    """What the file's first bytes say it is: ``zip`` (torch.save), ``torch-legacy``, ``safetensors``, or a
    description of another kind of file (``a PNG image``, ``text: '...'``)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(_TORCH_LEGACY):
        return "torch-legacy"
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:  # header length, then JSON
        return "safetensors"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    text = head.decode("utf-8", "replace").rstrip("\ufffd")  # a character cut at byte 64 is not a sign of binary
    if "\ufffd" in text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"unrecognised bytes {head[:8].hex(' ')}"
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "an HTML page: a download link that gave a web page, not the file"
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer: run git lfs pull"
    return f"text: {text.splitlines()[0][:40]!r}"


def _reason(e: Exception) -> str:
    """One line of an exception from torch.load or safetensors (the weights-only unpickler's own complaint, without
    torch's advice to load unsafely)."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = found.group(1) if found else next((t.strip() for t in text.splitlines() if t.strip()), type(e).__name__)
    return line if len(line) <= 160 else line[:157] + "..."


def _torch_load(path: str, kind: str):
    """torch.load(weights_only=True) of a file whose first bytes are torch.save's; errors are one TrainError line."""
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            raise TrainError(f"cannot read checkpoint {path}: it is truncated or damaged (a ZIP archive, as torch.save "
                             "writes, without its central directory)") from None
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise TrainError(f"cannot read checkpoint {path}: it is a ZIP archive but not a torch.save file (no "
                             f"data.pkl; it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        _verify_digest(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if refused:
            raise TrainError(f"cannot read checkpoint {path}: it holds Python objects ({', '.join(refused)}) that "
                             "weights-only loading refuses; expected tensors in plain containers, as "
                             "torch.save({'model': state_dict}) writes") from None
        raise TrainError(f"cannot read checkpoint {path}: it is damaged ({_reason(e)})") from None
    except Exception as e:  # torch raises RuntimeError, OSError, EOFError, ... for a damaged archive
        raise TrainError(f"cannot read checkpoint {path}: it is damaged ({_reason(e)})") from None


def _safetensors_load(path: str) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
        tensors = load_file(path)
    except Exception as e:  # safetensors raises SafetensorError, OSError, ... for a damaged file
        raise TrainError(f"cannot read checkpoint {path}: it is a damaged safetensors file ({_reason(e)})") from None
    if expected is not None and _tensors_digest(tensors) != expected:
        raise TrainError(f"checkpoint {path} is corrupted: its tensors no longer match the SHA-256 written with them")
    return tensors


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint on CPU as {'model': state_dict, ...}; every error is one line naming the file.

    Takes this trainer's checkpoints (``torch.load`` with ``weights_only=True``, after checking their digest)
    and weights alone: a bare state_dict in a .pth (e.g. a release checkpoint without its wrapper) or a
    .safetensors file (this trainer's model.safetensors). A checkpoint of MAE's training script (flags saved as an
    argparse.Namespace) gives its weights only. A file of another kind is named by its first bytes
    (``it starts like a PNG image``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise TrainError(f"cannot read checkpoint {path}: it is empty; {_EXPECTED}")
    kind = _sniff(path)
    if path.endswith(".safetensors"):
        if kind != "safetensors":
            raise TrainError(f"cannot read checkpoint {path}: it is not a safetensors file (it starts like "
                             f"{'a torch.save file' if kind in ('zip', 'torch-legacy') else kind})")
        return {"model": _safetensors_load(path)}
    if kind not in ("zip", "torch-legacy"):
        what = "a safetensors file: name it .safetensors" if kind == "safetensors" else kind
        raise TrainError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (it starts like {what}); "
                         f"{_EXPECTED}")
    ckpt = _torch_load(path, kind)
    if isinstance(ckpt, dict) and "model" not in ckpt and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # weights only
    if isinstance(ckpt, dict) and "model" not in ckpt and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = {"model": ckpt["state_dict"]}  # supervised CRATE's main.py: its optimizer is not this trainer's
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), Mapping):
        raise TrainError(f"{path} holds neither a training checkpoint nor model weights "
                         "(expected {'model': state_dict, ...}, {'state_dict': ...} or a state_dict)")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt = {"model": ckpt["model"]}  # MAE's training script: its optimizer and flags are not this trainer's
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
