"""Backend selection shared by every operator.

A backend names an implementation of the same function:

    reference  the release's eager math, autograd through it (ground truth)
    torch      the fused algorithm through PyTorch's own kernels (the library candidates, below)
    triton     Triton kernels forward and backward
    cuda       Triton forward, CUDA-extension backward
    auto       measured on the tensor's device (default; crate_kernels.ops.tuning)

The process-wide default comes from ``set_backend`` or the environment variable
``CRATE_KERNELS_BACKEND``; a per-call or per-model ``backend=`` overrides it. An explicit backend that cannot run
raises; nothing falls back silently.

Each operator's modules register what a concrete backend runs for its forward and backward (``register_launcher``,
read with ``launcher(kind, backend)``), and the candidates ``auto`` chooses between (``register_candidate``):

    library    PyTorch's own paths (``library=True``, each operator's library.py: SDPA with q = k = v, cuBLAS
               products, CPU flash, the matmul form); backend ``torch`` runs the first library candidate that
               supports the arguments, in registration order (``library_order``): that is also the fixed order of
               ``auto`` where it does not measure
    triton-*   every Triton kernel variant (``register_variant``), CUDA tensors only
    cuda-*     each csrc/ kernel of the CUDA-extension backward (mma, wmma, fma, ...), where the extension is built

Kernel variants are alternative algorithms inside ``triton`` (``kernel_variants()``): chosen with
``set_variant(kind, name)`` or ``CRATE_KERNELS_VARIANTS="mssa_backward=symmetric,ista_backward=v1"``, else "v1".
Pinning one also pins what ``auto`` runs for that kind where the variant supports the arguments.

Triton autotuning follows ``CRATE_KERNELS_AUTOTUNE``: ``full`` (default) times every config the
pruning keeps, once per tuning key; ``first`` keeps only the first of them (tests, dry runs: quick to
compile, and no timing worth caching).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
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
    """Turn ``backend`` (or the default) into a backend that this operator implements (``has``: its concrete
    backends); ``auto`` stays ``auto`` (its launchers choose per call). An explicit choice that cannot run raises."""
    name = check_backend_name(get_backend() if backend is None else backend)
    if name == "auto":
        return name
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
# kernel variants
# ----------------------------------------------------------------------------------------------------------------
KERNEL_KINDS = ("mssa_forward", "mssa_backward", "ista_forward", "ista_backward")
_VARIANTS_ENV_VAR = "CRATE_KERNELS_VARIANTS"
_variants: dict[str, dict[str, Callable]] = {kind: {} for kind in KERNEL_KINDS}
_chosen: dict[str, str] = {}


def register_variant(kind: str, name: str, launcher: Callable) -> None:
    """Make ``launcher`` the Triton implementation ``name`` of ``kind`` (operator modules call this at import), and
    the candidate ``triton-<name>`` of ``auto``."""
    _variants[kind][name] = launcher
    register_candidate(kind, f"triton-{name}", launcher, supports=_triton_supports)


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
    """Run variant ``name`` for ``kind`` process-wide, under ``triton`` and ``cuda`` and, where it supports the
    arguments, under ``auto`` (``None``: back to $CRATE_KERNELS_VARIANTS, else "v1")."""
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


def pinned_variant(kind: str) -> str | None:
    """The variant pinned for ``kind`` by set_variant or $CRATE_KERNELS_VARIANTS, else None."""
    return _chosen.get(kind) or _env_variants().get(kind)


def get_variant(kind: str) -> str:
    """The variant ``triton`` runs for ``kind``: set_variant, else $CRATE_KERNELS_VARIANTS, else "v1"."""
    return pinned_variant(kind) or "v1"


def variant_launcher(kind: str) -> Callable:
    """A launcher of ``kind`` that runs the chosen variant (read at every call), given its first tensor argument."""

    def launch(*args):
        return _variants[kind][get_variant(kind)](*args)

    return launch


# ----------------------------------------------------------------------------------------------------------------
# launchers: what each backend runs for an operator's forward and backward
# ----------------------------------------------------------------------------------------------------------------
_launchers: dict[str, dict[str, Callable]] = {kind: {} for kind in KERNEL_KINDS}


def register_launcher(kind: str, backend: str, launcher: Callable) -> None:
    """Make ``launcher`` what backend ``backend`` runs for ``kind`` (e.g. "mssa_forward"); the operator's modules
    call this at import (backend ``torch``'s launcher comes with its library candidates, ``register_candidates``;
    the Triton modules register "triton" and "cuda" where triton imports)."""
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


def register_triton_backends(op: str, cuda_backward: Callable, cuda_kernels: tuple[str, ...]) -> None:
    """Register the backends that run ``op``'s Triton kernels ("mssa", "ista"), once its "v1" variants are
    registered: "triton" (the chosen variant) and "cuda" (the Triton forward with ``cuda_backward``, the CUDA
    extension's, its csrc/ kernel picked by the extension). Each of ``cuda_kernels`` (csrc/ kernel names, passed as
    ``cuda_backward(..., kernel=name)``) is ``auto``'s candidate "cuda-<name>" where the extension is built."""
    for direction in ("forward", "backward"):
        kind = f"{op}_{direction}"
        register_launcher(kind, "triton", variant_launcher(kind))
    register_launcher(f"{op}_forward", "cuda", launcher(f"{op}_forward", "triton"))
    register_launcher(f"{op}_backward", "cuda", cuda_backward)
    for kernel in cuda_kernels:
        register_candidate(f"{op}_backward", f"cuda-{kernel}", functools.partial(cuda_backward, kernel=kernel),
                           supports=functools.partial(_cuda_supports, kernel))


# ----------------------------------------------------------------------------------------------------------------
# candidates: what ``auto`` measures (crate_kernels.ops.tuning), and what backend ``torch`` runs
# ----------------------------------------------------------------------------------------------------------------
class Candidate(NamedTuple):
    """One implementation of a kind: ``fn`` takes that kind's launcher arguments; ``supports(*args)`` returns None
    where it can run them, else the reason it cannot (None: it runs everything)."""

    fn: Callable
    supports: Callable | None = None


class Entry(NamedTuple):
    fn: Callable
    supports: Callable | None
    library: bool


_candidates: dict[str, dict[str, Entry]] = {kind: {} for kind in KERNEL_KINDS}


def _check_kind(kind: str, argument: str) -> str:
    if kind not in KERNEL_KINDS:
        raise ValueError(f"{argument}: kind must be one of {KERNEL_KINDS}, got {kind!r}")
    return kind


def register_candidate(kind: str, name: str, fn: Callable, supports: Callable | None = None,
                       library: bool = False) -> None:
    """Make ``fn`` (the signature of ``kind``'s launchers) a candidate ``name`` of ``auto`` for ``kind``;
    ``supports(*args)`` returns None or why it cannot run those arguments; ``library=True`` marks PyTorch's own
    paths (what backend ``torch`` runs and what ``auto`` keeps unless another is faster by the margin)."""
    _candidates[_check_kind(kind, "register_candidate")][name] = Entry(fn, supports, library)


def register_candidates(table: dict[str, dict[str, Candidate]], library: bool = True) -> None:
    """Register ``{kind: {name: Candidate(fn, supports)}}`` (the operators' library.py ``CANDIDATES``); library
    candidates also make backend ``torch``'s launcher of their kind: the first of them that supports the
    arguments (``library_launcher``)."""
    for kind, named in table.items():
        for name, candidate in named.items():
            register_candidate(kind, name, candidate.fn, candidate.supports, library)
        if library:
            _launchers[kind].setdefault("torch", library_launcher(kind))


def candidates(kind: str) -> dict[str, Entry]:
    """``kind``'s candidates in the fixed order: library ones (``library_order``), then the others as registered
    (Triton variants, v1 first, then the CUDA backward)."""
    entries = _candidates[_check_kind(kind, "candidates")]
    order = library_order(kind) + sorted((n for n, e in entries.items() if not e.library),
                                         key=lambda n: n.startswith("cuda"))
    return {name: entries[name] for name in order}


def library_order(kind: str) -> list[str]:
    """The library candidates of ``kind`` in registration order."""
    return [n for n, e in _candidates[kind].items() if e.library]


def why_not(entry: Entry, args: tuple) -> str | None:
    """None where ``entry`` supports ``args``, else the reason."""
    return None if entry.supports is None else entry.supports(*args)


def library_choice(kind: str, args: tuple) -> str:
    """The first library candidate of ``kind`` (``library_order``) that supports ``args``."""
    entries = _candidates[kind]
    for name in library_order(kind):
        if why_not(entries[name], args) is None:
            return name
    raise RuntimeError(f"no library candidate of {kind} supports these inputs "
                       f"({', '.join(f'{n}: {why_not(entries[n], args)}' for n in library_order(kind))})")


def library_launcher(kind: str) -> Callable:
    """Backend ``torch``'s launcher of ``kind``: the first library candidate that supports the arguments."""

    def launch(*args):
        return _candidates[kind][library_choice(kind, args)].fn(*args)

    return launch


def _first_tensor(args: tuple) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def _triton_supports(*args) -> str | None:
    """The Triton variants run CUDA tensors of KERNEL_DTYPES. Not CPU tensors, even under TRITON_INTERPRET: the
    interpreter is a test tool, not a device, so ``auto`` never measures interpreted kernels."""
    tensor = _first_tensor(args)
    if not tensor.is_cuda:
        return f"Triton kernels need CUDA tensors, got device {tensor.device}"
    if tensor.dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take {KERNEL_DTYPES}, got {tensor.dtype}"
    return None


_TENSOR_CORE_KERNELS = ("mma", "mma-tiled", "wmma")


def _cuda_supports(kernel: str, *args) -> str | None:
    """The CUDA-extension backward's csrc/ ``kernel`` runs CUDA tensors where the extension is already built
    (``auto`` does not start a build of minutes: ``python -m crate_kernels.ops.cuda_ext --build`` makes its kernels
    candidates); the tensor-core kernels take fp16/bf16 on compute capability 8.0 and above, and mma 16-byte aligned
    rows of its 16-bit operands (the extension's own checks, csrc/bindings.cpp)."""
    tensor = _first_tensor(args)
    if not tensor.is_cuda:
        return f"the CUDA extension needs CUDA tensors, got device {tensor.device}"
    problem = _cuda_extension_problem()
    if problem is None and not _cuda_extension_built():
        problem = "the CUDA extension is not built (python -m crate_kernels.ops.cuda_ext --build)"
    if problem is None and kernel in _TENSOR_CORE_KERNELS:
        if tensor.dtype not in (torch.float16, torch.bfloat16):
            problem = f"csrc kernel {kernel} takes float16 or bfloat16, got {tensor.dtype}"
        elif torch.cuda.get_device_capability(tensor.device) < (8, 0):
            problem = f"csrc kernel {kernel} needs compute capability 8.0 or above"
    if problem is None and kernel.startswith("mma"):
        rows = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == tensor.dtype and a.dim() >= 2]
        if any(a.data_ptr() % 16 or a.stride(-1) != 1 or any(s % 8 for s in a.stride()[:-1])
               or a.shape[-1] % 8 for a in rows):
            problem = f"csrc kernel {kernel} needs 16-byte aligned rows (unit-stride rows of multiples of 8 elements)"
    return problem


def _cuda_extension_built() -> bool:
    """Whether the extension is loaded, or its library sits in torch's extension cache (load() then only loads)."""
    from torch.utils import cpp_extension

    from . import cuda_ext

    if cuda_ext._module is not None:
        return True
    folder = Path(cpp_extension._get_build_directory(cuda_ext._NAME, verbose=False))
    return any(folder.glob(f"{cuda_ext._NAME}*.so"))


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
