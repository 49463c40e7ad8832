"""Fused CRATE operators: MSSA (shared-projection attention) and one ISTA step.

Each public function takes ``backend=`` (see ``crate_kernels.ops.backend``); every backend computes
the same function through the same autograd.Function and saved tensors.
"""
from .backend import BACKENDS, get_backend, get_variant, kernel_variants, set_backend, set_variant
from .ista import ista_reference, ista_step
from .mssa import mssa_attention, mssa_reference

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "kernel_variants", "set_variant", "get_variant",
    "mssa_attention", "mssa_reference", "ista_step", "ista_reference",
]
