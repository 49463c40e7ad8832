"""The error rule of every kernel-equivalence test (FlashAttention's convention).

A kernel's result ``got`` is compared with float64 math on the same inputs (``truth``), and so is PyTorch's own
computation of the same math in the kernel's dtype on the same inputs (``baseline``: the release's eager math and
its autograd gradients, in fp32 on CPU, in bf16/fp16 on CUDA). The kernel passes when, measured both ways,

    rel(got)    <= K * rel(baseline)    + floor                              rel(t) = ||t - truth|| / ||truth||
    maxabs(got) <= K * maxabs(baseline) + (floor + eps(got)) * max|truth|    maxabs(t) = max |t - truth|
    floor = FLOOR_ULPS * eps(float32) * cond

K = 2: the kernel may round in another order than PyTorch but may not lose more than one bit more than it does.
The floor covers results PyTorch computes exactly or nearly so (an N = 1 softmax is exactly 1; a saturated
softmax's gradient cancels exactly in autograd) while the kernel's other order of operations still rounds: FLOOR_ULPS
= 4 units in the last place of float32, the kernels' accumulation dtype (float64 inputs too keep MSSA's lse in
float32), times ``cond``, how much larger than the result the terms are that the kernel's algorithm subtracts (1
unless the caller states it: ``mssa_cond`` for MSSA's backward). For bf16/fp16 results this floor lies far below
the result's own rounding, so K times PyTorch's error decides alone, except that a max-abs error comes in whole
units in the last place of the result's dtype: max-abs allows one more, eps(got) * max|truth| (FlashAttention's
atol; negligible for fp32). Each tolerance so follows the case's conditioning: a nearly one-hot softmax, or an
output that is a small difference of large terms, loosens it by as much as it costs PyTorch's own computation.
"""
import torch

from crate_kernels import ops

K = 2.0
FLOOR_ULPS = 4


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """||x - truth|| / ||truth|| in float64 (0 where both are zero)."""
    return ((x.double() - truth.double()).norm() / truth.double().norm().clamp_min(1e-300)).item()


def max_abs_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item() if x.numel() else 0.0


def assert_close(got: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, name: str = "", k: float = K,
                 cond: float = 1.0):
    """``got`` (a kernel's result) against ``truth`` (float64 math) within k times the error of ``baseline``
    (PyTorch's computation in got's dtype on the same inputs) plus the floor; relative-norm and max-abs error."""
    assert got.shape == truth.shape == baseline.shape, (name, got.shape, truth.shape, baseline.shape)
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite values"
    if not got.numel():
        return
    floor = FLOOR_ULPS * torch.finfo(torch.float32).eps * cond
    rel, rel_base = rel_err(got, truth), rel_err(baseline, truth)
    assert rel <= k * rel_base + floor, (f"{name}: relative error {rel:.3e} > {k:g} x torch's {rel_base:.3e} "
                                         f"+ {FLOOR_ULPS} fp32 ulp x {cond:.3g} ({floor:.1e})")
    scale = truth.double().abs().max().item()
    mx, mx_base = max_abs_err(got, truth), max_abs_err(baseline, truth)
    ulp = torch.finfo(got.dtype).eps
    assert mx <= k * mx_base + (floor + ulp) * scale, (
        f"{name}: max-abs error {mx:.3e} > {k:g} x torch's {mx_base:.3e} + ({FLOOR_ULPS} fp32 ulp x {cond:.3g} "
        f"+ 1 ulp of {got.dtype}) x max |truth| {scale:.3e}")


def mssa_math(w: torch.Tensor, dout: torch.Tensor, scale: float, dtype: torch.dtype):
    """out, dw (autograd) and lse of the release's math softmax(w w^T scale) w, evaluated in ``dtype``."""
    x = w.detach().to(dtype).requires_grad_()
    out = ops.mssa_reference(x, scale)
    (dw,) = torch.autograd.grad(out, x, dout.to(dtype))
    with torch.no_grad():
        lse = torch.logsumexp(x @ x.transpose(-1, -2) * scale, dim=-1)
    return out.detach(), dw, lse


def ista_math(x: torch.Tensor, weight: torch.Tensor, eta: float, lambd: float, dout: torch.Tensor,
              dtype: torch.dtype):
    """out, dx, dW of the release's three-product math (autograd), evaluated in ``dtype``."""
    xd = x.detach().to(dtype).requires_grad_()
    wd = weight.detach().to(dtype).requires_grad_()
    out = ops.ista_reference(xd, wd, eta, lambd)
    dx, dw = torch.autograd.grad(out, (xd, wd), dout.to(dtype))
    return out.detach(), dx, dw


def mssa_cond(w: torch.Tensor, dout: torch.Tensor, scale: float) -> float:
    """How much larger than dw the terms are that a backward subtracts (at least 1), the larger of two measures:
    the largest logit, max_i scale |w_i|^2 (a flash backward forms dS = P (dP - delta) with delta =
    rowsum(dOut * out), a difference of terms of size |dOut_i| |w_i|, which PyTorch's autograd instead subtracts
    from the same dP, exactly where the softmax saturates), and ||T|| / ||dw|| for T = |P|^T |dOut| + scale (A + A^T)
    |w|, A = P (|dP| + |delta|), the magnitudes dw sums (a nearly uniform softmax makes P^T dOut a mean of larger
    terms)."""
    if not w.numel():
        return 1.0
    w64, g64 = w.detach().double(), dout.detach().double()
    s = w64 @ w64.transpose(-1, -2) * scale
    p = s.softmax(-1)
    dp = g64 @ w64.transpose(-1, -2)
    delta = (g64 * (p @ w64)).sum(-1, keepdim=True)
    a = p * (dp.abs() + delta.abs())
    terms = p.transpose(-1, -2) @ g64.abs() + scale * (a + a.transpose(-1, -2)) @ w64.abs()
    dw = p.transpose(-1, -2) @ g64 + scale * ((p * (dp - delta)) + (p * (dp - delta)).transpose(-1, -2)) @ w64
    ratio = (terms.norm() / dw.norm().clamp_min(1e-300)).item()
    return max(1.0, s.diagonal(dim1=-2, dim2=-1).abs().max().item(), ratio)


def assert_mssa_close(w: torch.Tensor, dout: torch.Tensor, scale: float, out=None, dw=None, lse=None, name="",
                      k: float = K):
    """A kernel's out, dw, lse (those given) for inputs w, dout against float64 math, within assert_close of the
    reference math in w's dtype (dw's floor scaled by mssa_cond)."""
    truth, base = mssa_math(w, dout, scale, torch.float64), mssa_math(w, dout, scale, w.dtype)
    conds = (1.0, mssa_cond(w, dout, scale), 1.0)
    for label, got, t, b, c in zip(("out", "dw", "lse"), (out, dw, lse), truth, base, conds):
        if got is not None:
            assert_close(got, t, b, f"{name} {label}".strip(), k, c)


def assert_ista_close(x, weight, eta: float, lambd: float, dout, out=None, dx=None, dw=None, name=""):
    """A kernel's out, dx, dW (those given) for inputs x, weight, dout against float64 math, within assert_close
    of the release's math in x's dtype."""
    truth, base = ista_math(x, weight, eta, lambd, dout, torch.float64), ista_math(x, weight, eta, lambd, dout, x.dtype)
    for label, got, t, b in zip(("out", "dx", "dW"), (out, dx, dw), truth, base):
        if got is not None:
            assert_close(got, t, b, f"{name} {label}".strip())
