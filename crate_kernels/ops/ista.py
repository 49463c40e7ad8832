"""ISTA: one proximal-gradient step of non-negative sparse coding against a dictionary W (d x d).

    out = relu(x + eta * (x W - x W^T W) - eta * lambda) = relu(x + eta * x M - eta * lambda)

with M = W - W^T W formed once per call, so the token work is ONE matrix product (rows x d x d).
With G = dOut * [out > 0] the backward is two token products plus d x d work:

    dx = G + eta * G M^T,     dM = eta * x^T G,     dW = dM - W (dM + dM^T)

The autograd.Function saves x, W, M and the activation mask packed to bits (one byte per eight
outputs); every backend shares it, backends differ in the launchers below.
"""
from __future__ import annotations

import torch

from .backend import resolve_backend

__all__ = ["ista_step", "ista_reference", "ISTAFunction", "pack_mask", "unpack_mask"]

_BACKENDS = ("reference", "torch")


def ista_reference(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    """The release's eager math: three products, autograd through every intermediate."""
    x1 = torch.nn.functional.linear(x, weight)
    grad_1 = torch.nn.functional.linear(x1, weight.t())
    grad_2 = torch.nn.functional.linear(x, weight.t())
    grad_update = step_size * (grad_2 - grad_1) - step_size * lambd
    return torch.nn.functional.relu(x + grad_update)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


_BIT_WEIGHTS = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    if device not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[device]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(rows, d) bool -> (rows, ceil(d / 8)) uint8; bit j of byte k holds column 8k + j."""
    rows, d = mask.shape
    if d % 8:
        mask = torch.nn.functional.pad(mask, (0, 8 - d % 8))
    bits = mask.view(rows, -1, 8).to(torch.uint8) * _bit_weights(mask.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: (rows, ceil(d / 8)) uint8 -> (rows, d) bool."""
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0
    return bits.view(packed.shape[0], -1)[:, :d]


def dictionary_matrix(weight: torch.Tensor) -> torch.Tensor:
    """M = W - W^T W, accumulated in fp32 (fp64 for fp64 W)."""
    wc = weight.to(_compute_dtype(weight.dtype))
    return wc - wc.t() @ wc


def dictionary_grad(weight: torch.Tensor, grad_m: torch.Tensor) -> torch.Tensor:
    """dW = dM - W (dM + dM^T) for M = W - W^T W."""
    wc = weight.to(grad_m.dtype)
    return (grad_m - wc @ (grad_m + grad_m.t())).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# torch launchers: the fused algorithm in plain PyTorch (the CPU path)
# ----------------------------------------------------------------------------------------------
def _forward_torch(x, m, step_size, lambd):
    pre = torch.addmm(x, x, m.to(x.dtype), alpha=step_size).sub_(step_size * lambd)
    mask = pre > 0
    return pre.clamp_(min=0), pack_mask(mask)


def _backward_torch(dout, x, m, packed_mask, step_size, need_dx, need_dm):
    g = dout * unpack_mask(packed_mask, dout.shape[1])
    dx = torch.addmm(g, g, m.to(g.dtype).t(), alpha=step_size) if need_dx else None
    dm = torch.mm(x.t().to(m.dtype), g.to(m.dtype)).mul_(step_size) if need_dm else None
    return dx, dm


_FORWARD = {"torch": _forward_torch}
_BACKWARD = {"torch": _backward_torch}


# ----------------------------------------------------------------------------------------------
# torch.library registration: torch.compile sees each launcher as one opaque op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("crate_kernels::ista_forward", mutates_args=())
def ista_forward(
    x: torch.Tensor, m: torch.Tensor, step_size: float, lambd: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, d), M (d, d) -> out (rows, d) in x's dtype, packed mask (rows, ceil(d/8)) uint8."""
    return _FORWARD[backend](x, m, step_size, lambd)


@ista_forward.register_fake
def _(x, m, step_size, lambd, backend):
    return torch.empty_like(x), x.new_empty((x.shape[0], (x.shape[1] + 7) // 8), dtype=torch.uint8)


@torch.library.custom_op("crate_kernels::ista_backward", mutates_args=())
def ista_backward(
    dout: torch.Tensor, x: torch.Tensor, m: torch.Tensor, packed_mask: torch.Tensor,
    step_size: float, need_dx: bool, need_dm: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx = G + eta G M^T (x's dtype) and dM = eta x^T G (M's dtype) with G = dOut * mask.

    A gradient that is not needed comes back as an empty tensor."""
    dx, dm = _BACKWARD[backend](dout, x, m, packed_mask, step_size, need_dx, need_dm)
    return (x.new_empty(0) if dx is None else dx), (m.new_empty(0) if dm is None else dm)


@ista_backward.register_fake
def _(dout, x, m, packed_mask, step_size, need_dx, need_dm, backend):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(m) if need_dm else m.new_empty(0))


class ISTAFunction(torch.autograd.Function):
    """One ISTA step on 2-D x; saves x, W, M and the bit-packed activation mask for every backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float, backend: str):
        m = dictionary_matrix(weight)
        out, packed_mask = ista_forward(x, m, step_size, lambd, backend)
        ctx.save_for_backward(x, weight, m, packed_mask)
        ctx.step_size, ctx.backend = step_size, backend
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x, weight, m, packed_mask = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dm = ista_backward(dout.contiguous(), x, m, packed_mask, ctx.step_size, need_dx, need_dw, ctx.backend)
        dw = dictionary_grad(weight, dm) if need_dw else None
        return (dx if need_dx else None), dw, None, None, None


def _check_inputs(x, weight, step_size, lambd):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"weight must be a square (d, d) dictionary, got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"x must have shape (..., d) with d = {weight.shape[0]} (the dictionary size), got shape {tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if not lambd >= 0:
        raise ValueError(f"lambd must be non-negative, got {lambd}")


def ista_step(
    x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.5, backend: str | None = None
) -> torch.Tensor:
    """relu(x + step_size * (x W - x W^T W) - step_size * lambd) for x (..., d) and W (d, d)."""
    _check_inputs(x, weight, step_size, lambd)
    name = resolve_backend(backend, x, _BACKENDS + tuple(_FORWARD))
    if name == "reference":
        return ista_reference(x, weight, step_size, lambd)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = ISTAFunction.apply(rows, weight, float(step_size), float(lambd), name)
    return out.view(x.shape)
