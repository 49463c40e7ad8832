"""ISTA through library matrix products: launchers with the signatures of the "torch" launchers.

    forward(x, m, step_size, lambd) -> (out, packed_mask)
        pre = x + eta x M - eta lambda,  out = relu(pre) in x's dtype,  packed_mask = pack_mask(pre > 0)
    backward(dout, x, m, packed_mask, step_size, need_dx, need_dm) -> (dx or None, dM or None)
        G = dOut * mask,  dx = G + eta G M^T (x's dtype),  dM = eta x^T G (M's dtype, fp32)

x is (rows, d), M (d, d) in fp32 (fp64 for fp64 x). Every product takes the activations in their own dtype (M, a
d x d matrix, is cast to it): ``cublas`` on CUDA, where cuBLAS accumulates 16-bit products in fp32 (dM straight into
fp32 through ``out_dtype`` where this torch has it), ``matmul`` on CPU. Neither makes an fp32 copy of x or G.

``CANDIDATES`` maps "ista_forward" and "ista_backward" to {name: Candidate(fn, supports)}; ``supports`` takes the
launcher's arguments and names the device or dtype that rules them out.
"""
from __future__ import annotations

import torch

from ..backend import Candidate
from .torch_impl import pack_mask, unpack_mask

__all__ = ["CANDIDATES"]

_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (CUDA only)


def _forward(x, m, step_size, lambd):
    pre = torch.addmm(x, x, m.to(x.dtype), alpha=step_size).sub_(step_size * lambd)
    mask = pre > 0
    return pre.clamp_(min=0), pack_mask(mask)


def _grad_m(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x^T G in ``dtype`` (M's), from x and G in their own dtype: accumulated in fp32 by cuBLAS, written in fp32
    where torch.mm takes out_dtype (CUDA), else rounded to x's dtype first."""
    if x.dtype == dtype:
        return torch.mm(x.t(), g)
    if x.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(x.t(), g, out_dtype=dtype)
    return torch.mm(x.t(), g).to(dtype)


def _backward(dout, x, m, packed_mask, step_size, need_dx, need_dm):
    g = dout * unpack_mask(packed_mask, dout.shape[1])
    dx = torch.addmm(g, g, m.to(g.dtype).t(), alpha=step_size) if need_dx else None
    dm = _grad_m(x, g.to(x.dtype), m.dtype).mul_(step_size) if need_dm else None
    return dx, dm


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _supports(name: str, cuda: bool, backward: bool):
    def supports(*args):
        x = args[1] if backward else args[0]
        if x.is_cuda != cuda:
            where = "CUDA tensors" if cuda else "tensors off CUDA (matmul; on CUDA: cublas)"
            return f"{name} runs on {where}, got device {x.device}"
        if x.dtype not in _DTYPES:
            return f"{name} takes {', '.join(str(d).removeprefix('torch.') for d in _DTYPES)}, got {x.dtype}"
        return None

    return supports


CANDIDATES = {
    "ista_forward": {
        "cublas": Candidate(_forward, _supports("cublas", True, False)),
        "matmul": Candidate(_forward, _supports("matmul", False, False)),
    },
    "ista_backward": {
        "cublas": Candidate(_backward, _supports("cublas", True, True)),
        "matmul": Candidate(_backward, _supports("matmul", False, True)),
    },
}
