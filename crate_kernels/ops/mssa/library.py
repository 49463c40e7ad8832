"""MSSA through PyTorch's own kernels: launchers with the signatures of the "torch" launchers, one per library path.

    forward(w, scale) -> (out, lse)                 w, out (B, H, N, p); lse (B, H, N) contiguous, natural log,
                                                    fp32 (fp64 for fp64 w)
    backward(dout, w, out, lse, scale) -> dw        P recomputed from lse, so any forward's (out, lse) will do

CUDA, with q = k = v = w and dw = dq + dk + dv from the kernels' backward:

    sdpa-flash      aten::_scaled_dot_product_flash_attention (FlashAttention-2): fp16, bf16
    sdpa-cudnn      aten::_scaled_dot_product_cudnn_attention (cuDNN): fp16, bf16
    sdpa-efficient  aten::_scaled_dot_product_efficient_attention (memory-efficient): fp16, bf16, fp32

Their backward ops take the forward's dropout state and variable-length metadata; without dropout and on dense
inputs those are neutral (a zero seed and offset, no cumulative sequence lengths, max lengths N), so each backward
runs from the saved (w, out, lse) alone. The efficient kernel's lse is padded along N to a multiple of 32 (the
padding is +inf); its launchers slice it off and put it back.

Any device: ``matmul``, the algorithm in batched products (S and dP materialised, N x N): on CUDA the products
take operands in w's dtype and accumulate in fp32 (cuBLAS), on CPU 16-bit operands are widened to fp32 first.
CPU: ``cpu-flash``, aten::_scaled_dot_product_flash_attention_for_cpu (tiled, no N x N tensor); its lse comes
(B, N, H)-strided.

``CANDIDATES`` maps "mssa_forward" and "mssa_backward" to {name: Candidate(fn, supports)}; ``supports`` takes the
launcher's arguments and names what rules them out: the device, the dtype, the head dim and shape limits of the
kernel, an aten op or argument this torch lacks, and, on a GPU, whatever torch's own checks
(``torch.backends.cuda.can_use_*_attention``) refuse, a kernel the user disabled in torch included.
"""
from __future__ import annotations

import functools
import warnings

import torch

from ..backend import Candidate, accumulate_dtype

__all__ = ["ATEN_ARGUMENTS", "CANDIDATES"]

# The aten ops the launchers call and the arguments they pass, by the schema's names.
ATEN_ARGUMENTS = {
    "_scaled_dot_product_flash_attention": (
        "query", "key", "value", "dropout_p", "is_causal", "return_debug_mask", "scale"),
    "_scaled_dot_product_flash_attention_backward": (
        "grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
        "dropout_p", "is_causal", "philox_seed", "philox_offset", "scale"),
    "_scaled_dot_product_cudnn_attention": (
        "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask",
        "scale"),
    "_scaled_dot_product_cudnn_attention_backward": (
        "grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset", "attn_bias",
        "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal", "scale"),
    "_scaled_dot_product_efficient_attention": (
        "query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale"),
    "_scaled_dot_product_efficient_attention_backward": (
        "grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed", "philox_offset",
        "dropout_p", "grad_input_mask", "is_causal", "scale"),
    "_scaled_dot_product_flash_attention_for_cpu": (
        "query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale"),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        "grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal", "attn_mask", "scale"),
}
_EFFICIENT_LSE_ALIGN = 32  # the efficient kernel's lse is (B, H, ceil(N / 32) * 32)
_GRID_LIMIT = 65535  # flash and efficient launch over batch and heads in grid dims y, z; cuDNN checks the same


@functools.cache
def _schema_problem(name: str) -> str | None:
    """None where this torch has aten::``name`` taking exactly the arguments its launcher passes, else why not."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return f"torch {torch.__version__} has no aten::{name}"
    have = tuple(a.name for a in packet.default._schema.arguments)
    if set(have) != set(ATEN_ARGUMENTS[name]):
        return f"aten::{name} of torch {torch.__version__} takes {have}, not the {ATEN_ARGUMENTS[name]} passed here"
    return None


@functools.cache
def _signature(name: str) -> tuple:
    problem = _schema_problem(name)
    if problem:
        raise RuntimeError(f"crate_kernels: {problem}")
    op = getattr(torch.ops.aten, name).default
    arguments = op._schema.arguments
    return op, [a.name for a in arguments if not a.kwarg_only], [a.name for a in arguments if a.kwarg_only]


def _call(name: str, **named):
    """aten::``name`` with its arguments given by schema name (positional and keyword-only as the schema has them)."""
    op, positional, keyword = _signature(name)
    return op(*(named[a] for a in positional), **{a: named[a] for a in keyword})


def _no_rng(w: torch.Tensor) -> torch.Tensor:
    """A philox seed or offset for a call without dropout (read only where dropout_p > 0)."""
    return torch.zeros((), dtype=torch.int64, device=w.device)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` where its last dim has unit stride and its start is 16-byte aligned (the kernels' loads), else a copy."""
    if t.stride(-1) == 1 and (t.storage_offset() * t.element_size()) % 16 == 0:
        return t
    return t.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# sdpa-flash
# ----------------------------------------------------------------------------------------------------------------
def _flash_forward(w, scale):
    w = _unit_stride(w)
    out, lse = _call("_scaled_dot_product_flash_attention", query=w, key=w, value=w, dropout_p=0.0,
                     is_causal=False, return_debug_mask=False, scale=scale)[:2]
    return out, lse.contiguous()


def _flash_backward(dout, w, out, lse, scale):
    w, n, rng = _unit_stride(w), w.shape[2], _no_rng(w)
    dq, dk, dv = _call(
        "_scaled_dot_product_flash_attention_backward", grad_out=_unit_stride(dout), query=w, key=w, value=w,
        out=_unit_stride(out), logsumexp=lse.contiguous(), cum_seq_q=None, cum_seq_k=None, max_q=n, max_k=n,
        dropout_p=0.0, is_causal=False, philox_seed=rng, philox_offset=rng, scale=scale,
    )
    return dq.add_(dk).add_(dv)


# ----------------------------------------------------------------------------------------------------------------
# sdpa-cudnn
# ----------------------------------------------------------------------------------------------------------------
def _cudnn_forward(w, scale):
    w = _unit_stride(w)
    out, lse = _call("_scaled_dot_product_cudnn_attention", query=w, key=w, value=w, attn_bias=None,
                     compute_log_sumexp=True, dropout_p=0.0, is_causal=False, return_debug_mask=False,
                     scale=scale)[:2]
    return out, lse.reshape(w.shape[:3]).contiguous()  # cuDNN's softmax statistics are (B, H, N, 1)


def _cudnn_backward(dout, w, out, lse, scale):
    w, n, rng = _unit_stride(w), w.shape[2], _no_rng(w)
    out = _unit_stride(out)
    if dout.stride() != out.stride():  # cuDNN's backward reads dO in O's layout
        dout = torch.empty_like(out).copy_(dout)
    dq, dk, dv = _call(
        "_scaled_dot_product_cudnn_attention_backward", grad_out=dout, query=w, key=w, value=w, out=out,
        logsumexp=lse.contiguous().unsqueeze(-1), philox_seed=rng, philox_offset=rng, attn_bias=None,
        cum_seq_q=None, cum_seq_k=None, max_q=n, max_k=n, dropout_p=0.0, is_causal=False, scale=scale,
    )
    return dq.add_(dk).add_(dv)


# ----------------------------------------------------------------------------------------------------------------
# sdpa-efficient
# ----------------------------------------------------------------------------------------------------------------
def _efficient_forward(w, scale):
    w = _unit_stride(w)
    out, lse = _call("_scaled_dot_product_efficient_attention", query=w, key=w, value=w, attn_bias=None,
                     compute_log_sumexp=True, dropout_p=0.0, is_causal=False, scale=scale)[:2]
    return out, lse.narrow(-1, 0, w.shape[2]).contiguous()


def _efficient_lse(lse: torch.Tensor) -> torch.Tensor:
    """(B, H, N) lse padded with +inf to the efficient kernel's (B, H, ceil(N / 32) * 32), as its forward leaves it."""
    n = lse.shape[-1]
    padded = -(-n // _EFFICIENT_LSE_ALIGN) * _EFFICIENT_LSE_ALIGN
    if padded == n:
        return lse.contiguous()
    full = lse.new_full((*lse.shape[:-1], padded), float("inf"))
    full.narrow(-1, 0, n).copy_(lse)
    return full


def _efficient_backward(dout, w, out, lse, scale):
    w, rng = _unit_stride(w), _no_rng(w)
    dq, dk, dv, _ = _call(
        "_scaled_dot_product_efficient_attention_backward", grad_out_=_unit_stride(dout), query=w, key=w, value=w,
        attn_bias=None, out=_unit_stride(out), logsumexp=_efficient_lse(lse), philox_seed=rng, philox_offset=rng,
        dropout_p=0.0, grad_input_mask=[True, True, True, False], is_causal=False, scale=scale,
    )
    return dq.add_(dk).add_(dv)


# ----------------------------------------------------------------------------------------------------------------
# cpu-flash
# ----------------------------------------------------------------------------------------------------------------
def _cpu_flash_forward(w, scale):
    w = _unit_stride(w)  # the CPU kernel reads rows as contiguous: a strided head dim gives wrong values silently
    out, lse = _call("_scaled_dot_product_flash_attention_for_cpu", query=w, key=w, value=w, dropout_p=0.0,
                     is_causal=False, attn_mask=None, scale=scale)
    return out, lse.to(accumulate_dtype(w.dtype)).contiguous()  # lse comes (B, N, H)-strided


def _cpu_flash_backward(dout, w, out, lse, scale):
    w = _unit_stride(w)
    dq, dk, dv = _call("_scaled_dot_product_flash_attention_for_cpu_backward", grad_out=_unit_stride(dout),
                       query=w, key=w, value=w, out=_unit_stride(out), logsumexp=lse, dropout_p=0.0,
                       is_causal=False, attn_mask=None, scale=scale)
    return dq.add_(dk).add_(dv)


# ----------------------------------------------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------------------------------------------
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()  # torch.bmm(..., out_dtype=) (CUDA only)


def _product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b over the (B, H) batch in ``dtype``'s accumulate dtype (fp32 for 16-bit): on CUDA from operands in
    ``dtype`` (cuBLAS accumulates in fp32; no fp32 copy of activations), elsewhere from fp32 operands."""
    acc = accumulate_dtype(dtype)
    if dtype == acc:
        return torch.matmul(a, b)
    if not a.is_cuda:
        return torch.matmul(a.to(acc), b.to(acc))
    a, b = a.to(dtype), b.to(dtype)
    if not _BMM_OUT_DTYPE:
        return torch.matmul(a, b).to(acc)
    batch = a.shape[:-2]
    flat = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out_dtype=acc)
    return flat.view(*batch, *flat.shape[-2:])


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rowsum(a * b) (..., 1) in the accumulate dtype; on CUDA the products stay in a's dtype, the sum in fp32."""
    acc = accumulate_dtype(a.dtype)
    if a.is_cuda or a.dtype == acc:
        return (a * b).sum(dim=-1, keepdim=True, dtype=acc)
    return (a.to(acc) * b.to(acc)).sum(dim=-1, keepdim=True)


def _matmul_forward(w, scale):
    scores = _product(w, w.transpose(-1, -2), w.dtype).mul_(scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    return _product(probs, w, w.dtype).to(w.dtype), lse


def _matmul_backward(dout, w, out, lse, scale):
    wt = w.transpose(-1, -2)
    probs = _product(w, wt, w.dtype).mul_(scale).sub_(lse.unsqueeze(-1)).exp_()
    dscores = _product(dout, wt, w.dtype).sub_(_row_dot(dout, out)).mul_(probs).mul_(scale)
    dw = _product(dscores + dscores.transpose(-1, -2), w, w.dtype)
    return dw.add_(_product(probs.transpose(-1, -2), dout, w.dtype)).to(w.dtype)


# ----------------------------------------------------------------------------------------------------------------
# what each candidate can run
# ----------------------------------------------------------------------------------------------------------------
_HALF = (torch.float16, torch.bfloat16)
_SDPA = {  # name: (forward op, dtypes, head-dim multiple in 16-bit, max head dim, torch's check)
    "sdpa-flash": ("_scaled_dot_product_flash_attention", _HALF, 8, 256, "can_use_flash_attention"),
    "sdpa-cudnn": ("_scaled_dot_product_cudnn_attention", _HALF, 8, 256, "can_use_cudnn_attention"),
    "sdpa-efficient": ("_scaled_dot_product_efficient_attention", (*_HALF, torch.float32), 8, None,
                       "can_use_efficient_attention"),
}


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _sdpa_params(w: torch.Tensor):
    sdpa_params = torch.backends.cuda.SDPAParams
    try:
        return sdpa_params(w, w, w, None, 0.0, False, False)
    except TypeError:  # before enable_gqa
        return sdpa_params(w, w, w, None, 0.0, False)


def _torch_refuses(check_name: str, w: torch.Tensor, backward: bool) -> str | None:
    """What torch's own kernel choice (sdp_utils) says against running ``w`` through this kernel, or None."""
    check = getattr(torch.backends.cuda, check_name, None)
    if check is None:
        return None  # this torch has no such check: the aten op raises where it cannot run
    probe = _unit_stride(w)
    probe = probe.detach().requires_grad_(True) if backward else probe
    params = _sdpa_params(probe)
    if check(params, False):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check(params, True)
    reasons = "; ".join(str(c.message) for c in caught)
    return f"torch.backends.cuda.{check_name} refuses it" + (f": {reasons}" if reasons else "")


def _sdpa_problem(name: str, op: str, w: torch.Tensor, backward: bool) -> str | None:
    _, dtypes, multiple, max_dim, check_name = _SDPA[name]
    problem = _schema_problem(op)
    if problem:
        return problem
    if not w.is_cuda:
        return f"{name} runs on CUDA tensors, got device {w.device}"
    if w.dtype not in dtypes:
        return f"{name} takes {_dtype_names(dtypes)}, got {w.dtype}"
    batch, heads, n, p = w.shape
    multiple = 4 if w.dtype == torch.float32 else multiple  # 16-byte rows of the kernels' loads
    if p % multiple:
        return f"{name} needs a head dim that is a multiple of {multiple} for {w.dtype}, got {p}"
    if max_dim and p > max_dim:
        return f"{name} takes head dims up to {max_dim}, got {p}"
    if batch > _GRID_LIMIT or heads > _GRID_LIMIT:
        return f"{name} takes batch and heads up to {_GRID_LIMIT} each, got {batch} and {heads}"
    if name == "sdpa-cudnn" and n == 1:
        return "sdpa-cudnn does not take a sequence of length 1"
    return _torch_refuses(check_name, w, backward)


def _sdpa_supports(name: str, backward: bool):
    op = _SDPA[name][0] + ("_backward" if backward else "")

    def supports(*args):
        return _sdpa_problem(name, op, args[1] if backward else args[0], backward)

    return supports


_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_flash_supports(backward: bool):
    op = "_scaled_dot_product_flash_attention_for_cpu" + ("_backward" if backward else "")

    def supports(*args):
        w = args[1] if backward else args[0]
        problem = _schema_problem(op)
        if problem:
            return problem
        if w.device.type != "cpu":
            return f"cpu-flash runs on CPU tensors, got device {w.device}"
        if w.dtype not in _CPU_FLASH_DTYPES:
            return f"cpu-flash takes {_dtype_names(_CPU_FLASH_DTYPES)}, got {w.dtype}"
        return None

    return supports


_MATMUL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _matmul_supports(backward: bool):
    def supports(*args):
        w = args[1] if backward else args[0]
        if w.dtype not in _MATMUL_DTYPES:
            return f"matmul takes {_dtype_names(_MATMUL_DTYPES)}, got {w.dtype}"
        return None

    return supports


# name: (forward, backward, supports(backward) -> the check of one direction), in the order backend torch tries them
_LAUNCHERS = {
    "sdpa-flash": (_flash_forward, _flash_backward, functools.partial(_sdpa_supports, "sdpa-flash")),
    "sdpa-cudnn": (_cudnn_forward, _cudnn_backward, functools.partial(_sdpa_supports, "sdpa-cudnn")),
    "sdpa-efficient": (_efficient_forward, _efficient_backward, functools.partial(_sdpa_supports, "sdpa-efficient")),
    "cpu-flash": (_cpu_flash_forward, _cpu_flash_backward, _cpu_flash_supports),
    "matmul": (_matmul_forward, _matmul_backward, _matmul_supports),
}
CANDIDATES = {
    f"mssa_{direction}": {name: Candidate(launchers[backward], supports(bool(backward)))
                          for name, (*launchers, supports) in _LAUNCHERS.items()}
    for backward, direction in enumerate(("forward", "backward"))
}
