"""Backend selection shared by every operator.

A backend names an implementation of the same function:

    reference  the release's eager math, autograd through it (ground truth)
    torch      the fused algorithm in plain PyTorch with a hand-written backward
    triton     Triton kernels forward and backward
    cuda       Triton forward, CUDA-extension backward
    auto       the fastest correct one for the tensor's device (default)

The process-wide default comes from ``set_backend`` or the environment variable
``CRATE_KERNELS_BACKEND``; a per-call or per-model ``backend=`` overrides it. ``auto`` is safe: where it picks
the Triton kernels and they fail to compile or launch for a shape, it warns once (operator, shape, dtype, error)
and runs ``torch`` for that shape from then on; an explicit ``triton`` raises instead.

Each operator's modules register what a concrete backend runs for its forward and backward (``register_launcher``,
read with ``launcher(kind, backend)``): its PyTorch launchers, and where triton imports its Triton modules, which
also register their kernel variants (``register_variant``) and the backends on them (``register_triton_backends``).

Kernel variants are alternative algorithms inside ``triton`` (``kernel_variants()``): chosen with
``set_variant(kind, name)`` or ``CRATE_KERNELS_VARIANTS="mssa_backward=symmetric,ista_backward=v1"``, else the
GPU generation's entry in ``AUTO_VARIANTS`` (filled from committed GPU reports), else ``v1``.

Triton autotuning follows ``CRATE_KERNELS_AUTOTUNE``: ``full`` (default) times every config the
pruning keeps, once per tuning key; ``first`` keeps only the first of them (tests, dry runs: quick to
compile, and no timing worth caching).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
_ENV_VAR = "CRATE_KERNELS_BACKEND"
AUTOTUNE_MODES = ("full", "first")
_AUTOTUNE_ENV_VAR = "CRATE_KERNELS_AUTOTUNE"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_default_backend: str | None = None


def check_backend_name(name: str, argument: str = "backend") -> str:
    """``name`` when it is one of BACKENDS, else a ValueError naming ``argument``."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend; ``None`` restores the environment/``auto`` default."""
    global _default_backend
    _default_backend = None if name is None else check_backend_name(name)


def get_backend() -> str:
    """The process-wide default backend (``set_backend``, else ``$CRATE_KERNELS_BACKEND``, else ``auto``)."""
    if _default_backend is not None:
        return _default_backend
    return check_backend_name(os.environ.get(_ENV_VAR, "auto"), f"${_ENV_VAR}")


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
    """What the autotuner tries of the configs the pruning kept: all of them, or the first (autotune mode
    ``first``, or ``torch.use_deterministic_algorithms(True)``: a timed choice may differ from run to run, and with
    it the order of the sums, so deterministic runs take the first config the pruning kept)."""
    first = autotune_mode() == "first" or torch.are_deterministic_algorithms_enabled()
    return configs[:1] if first else configs


def config_pruning(rule: Callable) -> dict:
    """``prune_configs_by`` for ``triton.autotune``: the configs ``rule(configs, named_args, **kwargs)`` keeps, cut
    to what the autotuner tries (``autotune_space``). The rule itself stays reachable as ``.rule`` (the
    ahead-of-time compile takes every config it keeps)."""

    def prune(configs, named_args, **kwargs):
        return autotune_space(rule(configs, named_args, **kwargs))

    prune.rule = rule
    return {"early_config_prune": prune}


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

    ``has`` lists the concrete backends the operator provides. ``auto`` picks the Triton kernels for CUDA
    tensors of the kernels' dtypes (fp32, bf16, fp16) when the operator has them, as ``AUTO_TRITON`` (the
    Triton launchers behind ``with_fallback``), else ``torch``. An explicit choice that cannot run raises.
    """
    name = check_backend_name(get_backend() if backend is None else backend)
    if name == "auto":
        if tensor.is_cuda and tensor.dtype in KERNEL_DTYPES and AUTO_TRITON in has and triton_available():
            return AUTO_TRITON
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


# ----------------------------------------------------------------------------------------------------------------
# auto's fallback
# ----------------------------------------------------------------------------------------------------------------
AUTO_TRITON = "auto-triton"  # the internal backend name of auto's Triton choice
_fell_back: set[tuple] = set()


def _shape_key(kind: str, args: tuple) -> tuple:
    return (kind, *((tuple(a.shape), a.dtype, a.device.type) for a in args if isinstance(a, torch.Tensor)))


def with_fallback(kind: str, fast: Callable, safe: Callable) -> Callable:
    """``fast(*args)`` (the Triton launcher of ``kind``, e.g. "mssa_forward"), or ``safe(*args)`` (the torch
    launcher, same arguments and results) for shapes where ``fast`` raised: the first failure warns once, naming
    the operator, the shapes, the dtype and the error; that shape then goes straight to ``safe``."""

    def launch(*args):
        key = _shape_key(kind, args)
        if key not in _fell_back:
            try:
                return fast(*args)
            except Exception as error:  # a compile or launch failure of a kernel: the torch path still works
                _fell_back.add(key)
                shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in args if isinstance(a, torch.Tensor))
                warnings.warn(f"crate_kernels: backend 'auto' could not run the Triton kernel for {kind} on {shapes}"
                              f" ({type(error).__name__}: {str(error)[:300]}); using backend 'torch' for this shape "
                              "from now on", RuntimeWarning, stacklevel=2)
        return safe(*args)

    return launch


# ----------------------------------------------------------------------------------------------------------------
# kernel variants
# ----------------------------------------------------------------------------------------------------------------
KERNEL_KINDS = ("mssa_forward", "mssa_backward", "ista_forward", "ista_backward")
_VARIANTS_ENV_VAR = "CRATE_KERNELS_VARIANTS"
_variants: dict[str, dict[str, Callable]] = {kind: {} for kind in KERNEL_KINDS}
_chosen: dict[str, str] = {}
# What ``auto`` runs per GPU generation (compute capability major) where a committed GPU report
# (benchmarks/results/) measured a variant faster than "v1": {9: {"mssa_backward": "name"}}. Empty: no GPU run yet.
AUTO_VARIANTS: dict[int, dict[str, str]] = {}


def register_variant(kind: str, name: str, launcher: Callable) -> None:
    """Make ``launcher`` the Triton implementation ``name`` of ``kind`` (operator modules call this at import)."""
    _variants[kind][name] = launcher


def kernel_variants() -> dict[str, list[str]]:
    """{kind: [variant names]} of the Triton kernels, "v1" first."""
    return {kind: list(names) for kind, names in _variants.items()}


def _check_variant(kind: str, name: str, argument: str) -> str:
    if kind not in _variants:
        raise ValueError(f"{argument}: kind must be one of {KERNEL_KINDS}, got {kind!r}")
    if name not in _variants[kind]:
        raise ValueError(f"{argument}: {kind} variant must be one of {list(_variants[kind])}, got {name!r}")
    return name


def set_variant(kind: str, name: str | None) -> None:
    """Run variant ``name`` for ``kind`` process-wide (``None``: back to $CRATE_KERNELS_VARIANTS, AUTO_VARIANTS,
    "v1")."""
    if name is None:
        _chosen.pop(kind, None)
    else:
        _chosen[kind] = _check_variant(kind, name, "set_variant")


def _env_variants() -> dict[str, str]:
    return _parse_variants(os.environ.get(_VARIANTS_ENV_VAR, "").strip())


@functools.lru_cache(maxsize=8)
def _parse_variants(text: str) -> dict[str, str]:
    """$CRATE_KERNELS_VARIANTS parsed (once per distinct value: launchers ask at every call)."""
    chosen = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"${_VARIANTS_ENV_VAR} must be kind=name pairs separated by commas, got {item!r}")
        chosen[kind.strip()] = _check_variant(kind.strip(), name.strip(), f"${_VARIANTS_ENV_VAR}")
    return chosen


def get_variant(kind: str, tensor: torch.Tensor | None = None) -> str:
    """The variant ``kind`` runs for ``tensor``'s device: set_variant, else $CRATE_KERNELS_VARIANTS, else the GPU
    generation's AUTO_VARIANTS entry, else "v1"."""
    if kind in _chosen:
        return _chosen[kind]
    from_env = _env_variants()
    if kind in from_env:
        return from_env[kind]
    if AUTO_VARIANTS and tensor is not None and tensor.is_cuda:
        name = AUTO_VARIANTS.get(torch.cuda.get_device_capability(tensor.device)[0], {}).get(kind)
        if name in _variants[kind]:
            return name
    return "v1"


def variant_launcher(kind: str) -> Callable:
    """A launcher of ``kind`` that runs the chosen variant (read at every call), given its first tensor argument."""

    def launch(*args):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return _variants[kind][get_variant(kind, tensor)](*args)

    return launch


# ----------------------------------------------------------------------------------------------------------------
# launchers: what each backend runs for an operator's forward and backward
# ----------------------------------------------------------------------------------------------------------------
_launchers: dict[str, dict[str, Callable]] = {kind: {} for kind in KERNEL_KINDS}


def register_launcher(kind: str, backend: str, launcher: Callable) -> None:
    """Make ``launcher`` what backend ``backend`` runs for ``kind`` (e.g. "mssa_forward"); the operator's modules
    call this at import: its PyTorch launchers, then, where triton imports, its Triton modules."""
    _launchers[kind][backend] = launcher


def launcher(kind: str, backend: str) -> Callable:
    """The launcher registered for ``kind`` and the concrete backend ``backend``."""
    try:
        return _launchers[kind][backend]
    except KeyError:
        raise ValueError(f"no launcher of {kind!r} is registered for backend {backend!r} "
                         f"(registered: {tuple(_launchers.get(kind, ()))})") from None


def launcher_backends(kind: str) -> tuple[str, ...]:
    """The backends with a launcher for ``kind``, in the order they were registered."""
    return tuple(_launchers[kind])


def register_triton_backends(op: str, cuda_backward: Callable) -> None:
    """Register the backends that run ``op``'s Triton kernels ("mssa", "ista"), once its "v1" variants and torch
    launchers are registered: "triton" (the chosen variant), auto's Triton choice (``with_fallback`` to "torch"),
    and "cuda" (the Triton forward with ``cuda_backward``, the CUDA extension's)."""
    for direction in ("forward", "backward"):
        kind = f"{op}_{direction}"
        register_launcher(kind, "triton", variant_launcher(kind))
        register_launcher(kind, AUTO_TRITON, with_fallback(kind, launcher(kind, "triton"), launcher(kind, "torch")))
    register_launcher(f"{op}_forward", "cuda", launcher(f"{op}_forward", "triton"))
    register_launcher(f"{op}_backward", "cuda", cuda_backward)


class Candidate(NamedTuple):
    """One implementation of a kernel kind (e.g. "mssa_forward") that a measured choice may run: ``fn`` takes the
    kind's launcher arguments; ``supports(*same arguments)`` is None where ``fn`` can run them, else a short reason."""

    fn: Callable
    supports: Callable[..., str | None]


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
