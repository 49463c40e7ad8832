"""ISTA's first Triton kernels ("v1") and their launchers; they register themselves as the "v1" variants and the
"triton" and "cuda" backends (crate_kernels.ops imports this module where triton is installed).

Forward: one kernel, out = relu(x + eta x M - eta lambda) with the activation mask packed to bits in its epilogue.
Backward: dx = G + eta G M^T and dM = eta x^T G (row chunks, summed), G = dOut * mask unpacked on load.
Tiles, grids, the tuning key and the limits: triton_common.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import cuda_ext
from ..backend import device_guard, fp32_dot_precision, register_triton_backends, register_variant, tuning_bucket
from .triton_common import autotune_args, check_launch, check_triton_dtype, launch_dm, load_mt, tiles_grid, upcast

__all__ = ["forward_v1", "backward_v1", "TRITON_KERNELS", "aot_launches"]

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): tensor-core products (bf16, fp16, TF32), and exact fp32
# products, which run on FMA units and spill registers (and take seconds to compile) with larger tiles.
_TILES = ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
          (64, 128, 64, 4, 4), (64, 64, 64, 4, 4))
_EXACT_FP32_TILES = ((64, 64, 32, 8, 3),)
_AUTOTUNE = autotune_args(_TILES, _EXACT_FP32_TILES)


@triton.jit
def _load_g(dout_ptr, mask_ptr, offs_r, offs_c, rows, d, stride_gr, stride_gc, stride_mask):
    """Tile G[r, c] = dOut[r, c] * bit (c % 8) of packed_mask[r, c // 8]; zero outside (rows, d)."""
    valid = (offs_r[:, None] < rows) & (offs_c[None, :] < d)
    g = tl.load(dout_ptr + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc, mask=valid, other=0.0)
    byte = tl.load(mask_ptr + offs_r[:, None] * stride_mask + (offs_c // 8)[None, :], mask=valid, other=0)
    bit = (byte >> (offs_c % 8)[None, :]) & 1
    return tl.where(bit != 0, g, 0.0)


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=["rows", "stride_mask", "ROWS_BUCKET"])
def _ista_fwd_kernel(
    x_ptr, m_ptr, out_ptr, mask_ptr, rows, d, eta, eta_lambd, ROWS_BUCKET,
    stride_xr, stride_xc, stride_mk, stride_mn, stride_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = relu(x + eta * x M - eta * lambda) and its packed mask [pre > 0] for one (BLOCK_M, BLOCK_N) tile.

    Grid: cdiv(rows, BLOCK_M) * cdiv(d, BLOCK_N) programs, column tiles of one row block adjacent.
    """
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(d, BLOCK_N)
    offs_m = (pid // n_col_tiles * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid % n_col_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok, col_ok = offs_m < rows, offs_n < d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, d, BLOCK_K):
        kk = k + offs_k
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xr + kk[None, :] * stride_xc,
            mask=row_ok[:, None] & (kk[None, :] < d), other=0.0,
        )
        b = tl.load(
            m_ptr + kk[:, None] * stride_mk + offs_n[None, :] * stride_mn,
            mask=(kk[:, None] < d) & col_ok[None, :], other=0.0,
        )
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xr + offs_n[None, :] * stride_xc, mask=tile_ok, other=0.0)
    pre = x_tile.to(tl.float32) + eta * acc - eta_lambd
    out = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + offs_m[:, None] * d + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_ok)

    active = ((pre > 0) & tile_ok).to(tl.uint8)
    bits = tl.reshape(active, (BLOCK_M, BLOCK_N // 8, 8)) << tl.arange(0, 8)[None, None, :]
    packed = tl.sum(bits, axis=2).to(tl.uint8)
    offs_b = pid % n_col_tiles * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    tl.store(
        mask_ptr + offs_m[:, None] * stride_mask + offs_b[None, :], packed,
        mask=row_ok[:, None] & (offs_b[None, :] < tl.cdiv(d, 8)),
    )


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=["rows", "stride_mask", "ROWS_BUCKET"])
def _ista_dx_kernel(
    dout_ptr, mask_ptr, m_ptr, dx_ptr, rows, d, eta, ROWS_BUCKET,
    stride_gr, stride_gc, stride_mask, stride_mr, stride_mc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dx = G + eta * G M^T for one (BLOCK_M, BLOCK_N) tile, G = dOut * mask unpacked on load.

    Grid: cdiv(rows, BLOCK_M) * cdiv(d, BLOCK_N) programs, as in the forward.
    """
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(d, BLOCK_N)
    offs_m = (pid // n_col_tiles * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid % n_col_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, d, BLOCK_K):
        kk = k + offs_k
        a = _load_g(dout_ptr, mask_ptr, offs_m, kk, rows, d, stride_gr, stride_gc, stride_mask)
        b = load_mt(m_ptr, kk, offs_n, d, stride_mr, stride_mc)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    g = _load_g(dout_ptr, mask_ptr, offs_m, offs_n, rows, d, stride_gr, stride_gc, stride_mask)
    dx = g.to(tl.float32) + eta * acc
    tile_ok = (offs_m[:, None] < rows) & (offs_n[None, :] < d)
    tl.store(dx_ptr + offs_m[:, None] * d + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=["rows", "chunk", "stride_mask", "ROWS_BUCKET"])
def _ista_dm_kernel(
    x_ptr, dout_ptr, mask_ptr, part_ptr, rows, d, chunk, eta, ROWS_BUCKET,
    stride_xr, stride_xc, stride_gr, stride_gc, stride_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[s, i, j] = eta * sum over rows r of chunk s of x[r, i] G[r, j], for one (BLOCK_M, BLOCK_N) block.

    Grid: (cdiv(d, BLOCK_M) * cdiv(d, BLOCK_N), n_chunks); chunk s holds rows [s * chunk, (s + 1) * chunk).
    Every program writes its own block of part (fp32), so the sum over chunks is race-free.
    """
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    n_col_tiles = tl.cdiv(d, BLOCK_N)
    offs_i = pid // n_col_tiles * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid % n_col_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, rows)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(start, end, BLOCK_K):
        rr = (r + offs_k).to(tl.int64)
        a = tl.load(  # (x^T)[i, r] = x[r, i]
            x_ptr + rr[None, :] * stride_xr + offs_i[:, None] * stride_xc,
            mask=(rr[None, :] < end) & (offs_i[:, None] < d), other=0.0,
        )
        b = _load_g(dout_ptr, mask_ptr, rr, offs_j, end, d, stride_gr, stride_gc, stride_mask)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(
        part_ptr + pid_s.to(tl.int64) * d * d + offs_i[:, None] * d + offs_j[None, :], eta * acc,
        mask=(offs_i[:, None] < d) & (offs_j[None, :] < d),
    )


def forward_v1(x, m, step_size, lambd):
    """x (rows, d), M (d, d) fp32 -> relu(x + eta x M - eta lambda) in x's dtype, packed mask (rows, ceil(d/8))."""
    check_triton_dtype(x)
    rows, d = x.shape
    mc = m.to(x.dtype)
    out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    packed = torch.empty((rows, triton.cdiv(d, 8)), dtype=torch.uint8, device=x.device)
    if out.numel():
        check_launch(rows, d)
        with device_guard(x):
            _ista_fwd_kernel[tiles_grid(rows, d)](
                x, mc, out, packed, rows, d, step_size, step_size * lambd, tuning_bucket(rows),
                x.stride(0), x.stride(1), mc.stride(0), mc.stride(1), packed.stride(0),
                UPCAST=upcast(x.dtype), PRECISION=fp32_dot_precision(x),
            )
    return out, packed


def backward_v1(dout, x, m, packed_mask, step_size, need_dx, need_dm):
    """dx = G + eta G M^T (x's dtype) and dM = eta x^T G (fp32), G = dOut * mask; None where not needed."""
    check_triton_dtype(x)
    rows, d = x.shape
    dout = dout.to(x.dtype)
    check_launch(rows, d)
    dx = dm = None
    with device_guard(x):
        if need_dx:
            mc = m.to(x.dtype)
            dx = torch.empty((rows, d), dtype=x.dtype, device=x.device)
            if dx.numel():
                _ista_dx_kernel[tiles_grid(rows, d)](
                    dout, packed_mask, mc, dx, rows, d, step_size, tuning_bucket(rows),
                    dout.stride(0), dout.stride(1), packed_mask.stride(0), mc.stride(0), mc.stride(1),
                    UPCAST=upcast(x.dtype), PRECISION=fp32_dot_precision(x),
                )
        if need_dm:
            dm = launch_dm(_ista_dm_kernel, dout, x, m, packed_mask, step_size)
    return dx, dm


def _backward_cuda(dout, x, m, packed_mask, step_size, need_dx, need_dm, kernel=None):
    """The CUDA-extension backward (csrc/, built on first use); ``kernel``: its csrc/ kernel (None: the extension's
    pick)."""
    return cuda_ext.ista_backward(dout, x, m, packed_mask, step_size, need_dx, need_dm, kernel=kernel)


register_variant("ista_forward", "v1", forward_v1)
register_variant("ista_backward", "v1", backward_v1)
# "cuda": this forward with the CUDA-extension backward; each csrc/ kernel a candidate of auto
register_triton_backends("ista", _backward_cuda, tuple(k for k in cuda_ext.ISTA_KERNELS if k != "auto"))

INT32_INDEXED = ("m_ptr",)  # pointers the kernels index with int32 offsets: M (d x d), d^2 < 2^31 checked
# Every Triton kernel of this module, and launcher calls that reach each one: what crate_kernels.ops.aot
# compiles for GPU targets in CI (a kernel added here without a launch that reaches it fails there).
TRITON_KERNELS = {"ista_fwd": _ista_fwd_kernel, "ista_dx": _ista_dx_kernel, "ista_dm": _ista_dm_kernel}


def aot_launches(dtype: torch.dtype, head_dim: int) -> None:
    """Run the forward and both backward launchers on CPU tensors, d = 12 heads x head_dim, 2 images."""
    rows, d = 2 * 197, 12 * head_dim
    x = torch.randn(rows, d, dtype=dtype)
    m = torch.randn(d, d)
    _, packed = forward_v1(x, m, 0.1, 0.5)
    backward_v1(torch.randn_like(x), x, m, packed, 0.1, True, True)
