"""Fused CRATE operators: MSSA (shared-projection attention) and one ISTA step.

Each public function takes ``backend=`` (see ``crate_kernels.ops.backend``); every backend computes
the same function through the same autograd.Function and saved tensors. One package per operator
(``mssa/``, ``ista/``): dispatch, custom ops and Function in its ``__init__``, the reference math in
``torch_impl``, PyTorch's own kernels in ``library``, the Triton kernels in ``triton_v1`` and ``triton_variants``
on the helpers of ``triton_common``.
The Triton modules are imported here, and only here, where triton is installed: each registers its launchers and
variants with ``backend`` (v1 before the variants, so "v1" comes first). ``tuning`` registers ``auto``: the
measured choice between every registered candidate (``tuning_table()`` lists what it measured).
``python -m crate_kernels.ops.tune`` tunes a model's shapes ahead of training: a command (it builds models), the one
module of this package above the operators; nothing here imports it.
"""
from .backend import BACKENDS, get_backend, get_variant, kernel_variants, set_backend, set_variant, triton_available
from .ista import ista_reference, ista_step
from .mssa import mssa_attention, mssa_reference

if triton_available():
    from .ista import triton_v1 as _ista_triton_v1  # noqa: F401
    from .ista import triton_variants as _ista_triton_variants  # noqa: F401
    from .mssa import triton_v1 as _mssa_triton_v1  # noqa: F401
    from .mssa import triton_variants as _mssa_triton_variants  # noqa: F401
from .tuning import tune_step, tuning_table

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "kernel_variants", "set_variant", "get_variant",
    "mssa_attention", "mssa_reference", "ista_step", "ista_reference", "tune_step", "tuning_table",
]
