"""The CUDA-extension backward kernels (csrc/), built on first use with torch.utils.cpp_extension.load.

    mssa_backward(dout, w, out, lse, scale) -> dw
    ista_backward(dout, x, m, packed_mask, step_size, need_dx, need_dm) -> (dx | None, dm | None)

take and return exactly what the library backward launchers (mssa/library.py, ista/library.py) do, for
CUDA tensors of dtype float32, float16 or bfloat16 (head dim p <= 128 for MSSA). Arithmetic is fp32 throughout.
``kernel`` picks the csrc/ kernel (MSSA_KERNELS, ISTA_KERNELS; csrc/crate_kernels.h):
  ``mma``        ldmatrix + mma.sync tensor-core tiles fed by cp.async (float16/bfloat16, compute capability
                 >= 8.0, 16-byte aligned rows); MSSA runs one block per (batch, head) for N <= 256 that visits
                 each pair of 64-row tiles once (S = S^T), and the tiled form above that
  ``mma-tiled``  MSSA only: the tiled mma form for every N
  ``wmma``       nvcuda::wmma tensor-core tiles (float16/bfloat16, compute capability >= 8.0)
  ``fma``        fp32 FMA tiles (exact fp32 products, any dtype)
  ``auto``       float32 or compute capability < 8.0: fma; else mma where its alignment holds, else wmma
The default (None) is the kernel ``pinned_kernels`` set, else ``auto``; backend 'cuda' calls the default.

The build needs a CUDA build of torch, the CUDA toolkit (nvcc; ``$CUDA_HOME`` or found through nvcc on PATH,
wrapper scripts included) and ninja. It lands in torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``) and is reused while sources and flags are unchanged.
``python -m crate_kernels.ops.cuda_ext --build`` builds it and prints where; ``--remove-stale-lock`` first removes
the lock file a killed build leaves in its build folder (torch's loader would otherwise wait on it forever).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

__all__ = ["available", "why_unavailable", "load", "cuda_home", "csrc_dir", "mssa_backward", "ista_backward",
           "remove_stale_lock", "MSSA_KERNELS", "ISTA_KERNELS", "pinned_kernels"]

_NAME = "crate_kernels_cuda"
_SOURCES = ("bindings.cpp", "mssa_backward.cu", "ista_backward.cu")
MSSA_KERNELS = ("auto", "mma", "mma-tiled", "wmma", "fma")
ISTA_KERNELS = ("auto", "mma", "wmma", "fma")
_pinned = {"mssa": None, "ista": None}
_CUDA_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128
_module = None


def csrc_dir() -> Path:
    """The extension's sources: ``$CRATE_KERNELS_CSRC``, else csrc/ of a source checkout, else the installed copy."""
    if os.environ.get("CRATE_KERNELS_CSRC"):
        return Path(os.environ["CRATE_KERNELS_CSRC"])
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "csrc"
    return checkout if checkout.is_dir() else package / "csrc"


def _toolkit_root(nvcc: Path) -> Path | None:
    """The toolkit root of an nvcc, following symlinks and wrapper scripts that exec the real one."""
    nvcc = nvcc.resolve()
    try:
        head = nvcc.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b"#!"):  # a wrapper script: find the real nvcc it runs
        for match in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
            root = Path(match.group(1).decode())
            if (root / "bin" / "nvcc").is_file() and (root / "bin" / "nvcc").resolve() != nvcc:
                return _toolkit_root(root / "bin" / "nvcc")
        return None
    return nvcc.parent.parent


def cuda_home() -> str | None:
    """The CUDA toolkit root: ``$CUDA_HOME``/``$CUDA_PATH``, else the one behind nvcc on PATH, else /usr/local/cuda.

    A root counts when it has bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root(Path(nvcc))
        candidates.append(str(root) if root else None)
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        if cand and (Path(cand) / "bin" / "nvcc").is_file() and (Path(cand) / "include" / "cuda_runtime.h").is_file():
            return str(Path(cand))
    return None


def _missing_for_build() -> str | None:
    """Why the extension cannot be built here, or None."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; the CUDA extension needs a CUDA build of torch"
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return ("no CUDA device is visible to choose the GPU architecture from; to build for GPUs elsewhere, "
                "set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0')")
    missing = [name for name in _SOURCES if not (csrc_dir() / name).is_file()]
    if missing:
        return (f"its sources {missing} are not in {csrc_dir()} (install crate_kernels from a source checkout, "
                "e.g. pip install -e ., or point $CRATE_KERNELS_CSRC at csrc/)")
    if cuda_home() is None:
        return "the CUDA toolkit was not found (no nvcc): install it, or set $CUDA_HOME to its root"
    if shutil.which("ninja") is None:
        return "ninja was not found on PATH (pip install ninja)"
    return None


def why_unavailable() -> str | None:
    """Why the extension cannot build and run here, or None (checks CUDA torch, a GPU, the toolkit and ninja;
    builds nothing): lets a caller refuse backend 'cuda' before any work is done."""
    if torch.version.cuda is not None and not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return _missing_for_build()


def available() -> bool:
    """Whether the extension can build and run here (see why_unavailable)."""
    return why_unavailable() is None


def load(verbose: bool = False):
    """Build (once, cached on disk) and import the extension; RuntimeError naming what is missing otherwise."""
    global _module
    if _module is not None:
        return _module
    reason = _missing_for_build()
    if reason is not None:
        raise RuntimeError(f"crate_kernels CUDA extension unavailable: {reason}")
    home = cuda_home()
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home  # read at import time of cpp_extension, which may predate the line above
    sources = [str(csrc_dir() / name) for name in _SOURCES]
    try:
        _module = cpp_extension.load(
            name=_NAME, sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=_CUDA_FLAGS,
            extra_include_paths=[str(csrc_dir())], verbose=verbose,
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError with the log
        raise RuntimeError(f"crate_kernels CUDA extension failed to build from {csrc_dir()}: {exc}") from exc
    return _module


def remove_stale_lock() -> Path | None:
    """Remove the build lock of a build that was killed (torch waits on an existing lock without end); the path
    removed, or None. Only for when no other build of the extension can be running."""
    if torch.version.cuda is None:  # a CPU build of torch never builds it
        return None
    from torch.utils import cpp_extension

    lock = Path(cpp_extension._get_build_directory(_NAME, verbose=False)) / "lock"
    if not lock.exists():
        return None
    lock.unlink()
    return lock


def _check_cuda(t: torch.Tensor, name: str) -> None:
    if not t.is_cuda:
        raise RuntimeError(f"backend 'cuda' runs CUDA kernels, which need CUDA tensors ({name} is on {t.device})")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is unit-stride (what the kernels need), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


@contextlib.contextmanager
def pinned_kernels(*, mssa: str | None = None, ista: str | None = None):
    """Within the block, calls without ``kernel=`` (backend 'cuda' among them) run these kernels; None keeps the
    current choice. For benchmarks that rank the kernels; process-wide, not thread-local."""
    chosen = {"mssa": _kernel_name(mssa, MSSA_KERNELS, "mssa"), "ista": _kernel_name(ista, ISTA_KERNELS, "ista")}
    saved = dict(_pinned)
    _pinned.update({op: name for op, name in chosen.items() if name is not None})
    try:
        yield
    finally:
        _pinned.update(saved)


def _kernel_name(name: str | None, names: tuple, argument: str) -> str | None:
    if name is not None and name not in names:
        raise ValueError(f"{argument}: the csrc/ kernel must be one of {list(names)}, got {name!r}")
    return name


def _kernel(op: str, kernel: str | None, names: tuple) -> str:
    return _kernel_name(kernel, names, "kernel") or _pinned[op] or "auto"


def mssa_backward(dout, w, out, lse, scale, *, kernel: str | None = None):
    """dw (B, H, N, p) in w's dtype from dout, w, out (B, H, N, p) and lse (B, H, N), as the library backward launchers.

    Inputs may have any strides (a copy is made only where the head dim is not unit-stride); dw takes w's
    layout where w is dense (the model's (B, N, H, p) -> (B, H, N, p) view needs no copy).

    ``kernel``: one of MSSA_KERNELS (see the module docstring); None: the pinned one, else "auto"."""
    name = _kernel("mssa", kernel, MSSA_KERNELS)
    _check_cuda(w, "w")
    if w.dtype not in _DTYPES:
        raise TypeError(f"backend 'cuda' supports w of dtype float32, float16 or bfloat16, got {w.dtype}")
    if not 1 <= w.shape[-1] <= _MAX_HEAD_DIM:
        raise ValueError(f"backend 'cuda' supports head dims 1 to {_MAX_HEAD_DIM}, got {w.shape[-1]}")
    ext = load()
    return ext.mssa_backward(
        _unit_last(dout.to(w.dtype)), _unit_last(w), _unit_last(out.to(w.dtype)),
        lse.to(torch.float32).contiguous(), float(scale), name,
    )


def ista_backward(dout, x, m, packed_mask, step_size, need_dx, need_dm, *, kernel: str | None = None):
    """(dx in x's dtype | None, dM in M's dtype | None) with G = dout * mask, as the library backward launchers:
    dx = G + eta G M^T, dM = eta x^T G; x and dout are (rows, d), M (d, d), packed_mask (rows, ceil(d / 8)).

    ``kernel``: one of ISTA_KERNELS (see the module docstring); None: the pinned one, else "auto"."""
    name = _kernel("ista", kernel, ISTA_KERNELS)
    _check_cuda(x, "x")
    if x.dtype not in _DTYPES:
        raise TypeError(f"backend 'cuda' supports x of dtype float32, float16 or bfloat16, got {x.dtype}")
    if not (need_dx or need_dm):
        return None, None
    ext = load()
    dx, dm = ext.ista_backward(
        _unit_last(dout.to(x.dtype)), _unit_last(x), _unit_last(m.to(torch.float32)), _unit_last(packed_mask),
        float(step_size), bool(need_dx), bool(need_dm), name,
    )
    return dx, (None if dm is None else dm.to(m.dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crate_kernels.ops.cuda_ext", description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="build (or reuse) the extension and print its path")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument("--remove-stale-lock", action="store_true",
                        help="first remove the lock a killed build left (only when no other build runs)")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    if args.remove_stale_lock and (lock := remove_stale_lock()):
        print(f"removed the stale build lock {lock}")
    try:
        module = load(verbose=args.verbose)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"crate_kernels CUDA extension: {module.__file__} (CUDA_HOME={cuda_home()}, sources {csrc_dir()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
