"""Backend selection shared by every operator.

A backend names an implementation of the same function:

    reference  the release's eager math, autograd through it (ground truth)
    torch      the fused algorithm in plain PyTorch with a hand-written backward
    triton     Triton kernels forward and backward
    cuda       Triton forward, CUDA-extension backward
    auto       the fastest correct one for the tensor's device (default)

The process-wide default comes from ``set_backend`` or the environment variable
``CRATE_KERNELS_BACKEND``; a per-call or per-model ``backend=`` overrides it.

Triton autotuning follows ``CRATE_KERNELS_AUTOTUNE``: ``full`` (default) times every config the
pruning keeps, once per tuning key; ``first`` keeps only the first of them (tests, dry runs: quick to
compile, and no timing worth caching).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
_ENV_VAR = "CRATE_KERNELS_BACKEND"
AUTOTUNE_MODES = ("full", "first")
_AUTOTUNE_ENV_VAR = "CRATE_KERNELS_AUTOTUNE"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_default_backend: str | None = None


def _check_name(name: str, argument: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend; ``None`` restores the environment/``auto`` default."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name)


def get_backend() -> str:
    """The process-wide default backend (``set_backend``, else ``$CRATE_KERNELS_BACKEND``, else ``auto``)."""
    if _default_backend is not None:
        return _default_backend
    return _check_name(os.environ.get(_ENV_VAR, "auto"), f"${_ENV_VAR}")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def autotune_mode() -> str:
    """``$CRATE_KERNELS_AUTOTUNE``: ``full`` (default) or ``first``."""
    mode = os.environ.get(_AUTOTUNE_ENV_VAR, "full") or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"${_AUTOTUNE_ENV_VAR} must be one of {AUTOTUNE_MODES}, got {mode!r}")
    return mode


def autotune_space(configs: list) -> list:
    """What the autotuner tries of the configs the pruning kept: all of them, or the first (autotune mode ``first``)."""
    return configs[:1] if autotune_mode() == "first" else configs


def tuning_bucket(n: int) -> int:
    """n rounded up to a power of two: a tuning key that a last partial batch or an eval batch shares."""
    return 1 << max(0, int(n) - 1).bit_length()


def fp32_dot_precision(tensor: torch.Tensor) -> str:
    """tl.dot's input_precision for ``tensor``'s products: "tf32" for float32 CUDA tensors where PyTorch's own
    matmuls may use TF32 (torch.set_float32_matmul_precision, or the newer torch.backends.cuda.matmul.fp32_precision),
    else "ieee" (exact float32; other dtypes ignore it)."""
    if tensor.dtype != torch.float32 or not tensor.is_cuda:
        return "ieee"
    try:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:  # the legacy and per-backend precision APIs were mixed: ask the CUDA matmul backend
        return "tf32" if getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32" else "ieee"


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s GPU current while a kernel launches (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _require_triton_package(backend: str) -> None:
    if not triton_available():
        raise RuntimeError(
            f"backend {backend!r} needs the 'triton' package, which is not installed (CUDA builds of torch bring "
            "it; otherwise pip install triton, or pip install 'crate_kernels[test]' for the interpreter tests)"
        )


def _require_triton(tensor: torch.Tensor, backend: str) -> None:
    if not tensor.is_cuda and not triton_interpreting():
        raise RuntimeError(
            f"backend {backend!r} runs Triton kernels, which need CUDA tensors (got device {tensor.device}); "
            "on CPU set TRITON_INTERPRET=1 before importing crate_kernels, or use backend 'torch'"
        )


def resolve_backend(backend: str | None, tensor: torch.Tensor, has: tuple[str, ...]) -> str:
    """Turn ``backend`` (or the default) into a concrete backend that this operator implements.

    ``has`` lists the concrete backends the operator provides. ``auto`` picks ``triton`` for CUDA
    tensors of the kernels' dtypes (fp32, bf16, fp16) when the operator has it, else ``torch``.
    An explicit choice that cannot run raises.
    """
    name = _check_name(get_backend() if backend is None else backend)
    if name == "auto":
        if tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and "triton" in has and triton_available():
            return "triton"
        return "torch"
    if name in ("triton", "cuda"):
        _require_triton_package(name)  # before ``has``: operators list their Triton backends only when it imports
    if name not in has:
        raise NotImplementedError(f"backend {name!r} is not implemented for this operator (available: {has})")
    if name == "cuda":
        _require_cuda_extension(tensor)
    if name in ("triton", "cuda"):
        _require_triton(tensor, name)
    return name


@functools.lru_cache(maxsize=None)
def _cuda_extension_problem() -> str | None:
    from . import cuda_ext

    return cuda_ext.why_unavailable()


def _require_cuda_extension(tensor: torch.Tensor) -> None:
    if not tensor.is_cuda:
        raise RuntimeError(f"backend 'cuda' runs CUDA kernels and needs CUDA tensors, got device {tensor.device}; "
                           "on CPU use backend 'torch'")
    problem = _cuda_extension_problem()
    if problem:
        raise RuntimeError(f"backend 'cuda' is unavailable: {problem}")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype operators accumulate in: fp64 for fp64, fp32 for everything else."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype products on ``tensor`` run in: autocast's where it is on for its device (as F.linear), else its own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type) and tensor.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def autocast_input(tensor: torch.Tensor) -> torch.Tensor:
    """Cast an operator input to ``autocast_dtype`` (a no-op without autocast)."""
    return tensor.to(autocast_dtype(tensor))
