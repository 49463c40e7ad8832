"""ISTA kernel variants: alternative Triton kernels for triton_v1's backward (same math and launcher signature,
registered with ``register_variant``; ``crate_kernels.ops.kernel_variants()`` lists them). A variant kernel takes its
v1 counterpart's arguments, so its signature repeats v1's.

    backward "bytemask"  v1's dx and dM kernels with the packed mask read as a (rows, cols / 8) uint8 tile per
                         K step, an operand the pipeliner loads ahead like the others, and expanded to bits in
                         registers (v1 gathers one mask byte per element: eight loads of each byte).
    backward "gstore"    the "bytemask" dx kernel also writes G = dOut * mask (x's dtype) from its epilogue, and
                         dM = eta x^T G is one cuBLAS product with fp32 output.

Backward (crate_kernels.ops.ista): G = dOut * [out > 0], dx = G + eta G M^T, dM = eta x^T G.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import device_guard, fp32_dot_precision, register_variant, tuning_bucket
from .torch_impl import unpack_mask
from .triton_common import autotune_args, check_launch, check_triton_dtype, launch_dm, load_mt, tiles_grid, upcast

__all__: list[str] = []

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): v1's best-placed tensor-core tiles, and its FMA tile for exact fp32
_TILES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4))
_EXACT_FP32_TILES = ((64, 64, 32, 8, 3),)
_AUTOTUNE = autotune_args(_TILES, _EXACT_FP32_TILES)


@triton.jit
def _mask_bytes(mask_ptr, offs_r, col0, rows, d, stride_mask, COLS: tl.constexpr):
    """The packed mask bytes of columns [col0, col0 + COLS) (col0 % 8 == 0): an (R, COLS / 8) uint8 tile."""
    offs_b = col0 // 8 + tl.arange(0, COLS // 8)
    return tl.load(mask_ptr + offs_r[:, None] * stride_mask + offs_b[None, :],
                   mask=(offs_r < rows)[:, None] & (offs_b < tl.cdiv(d, 8))[None, :], other=0)


@triton.jit
def _masked(g, byte, ROWS: tl.constexpr, COLS: tl.constexpr):
    """G = g * bits of ``byte`` (bit c % 8 of byte c // 8 masks column c), the bits expanded in registers."""
    bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.where(tl.reshape(bits, (ROWS, COLS)) != 0, g, 0.0)


@triton.jit
def _load_cols(ptr, offs_r, col0, rows, d, stride_r, stride_c, COLS: tl.constexpr):
    """Columns [col0, col0 + COLS) of rows offs_r of a (rows, d) matrix, zero outside."""
    offs_c = col0 + tl.arange(0, COLS)
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=(offs_r < rows)[:, None] & (offs_c < d)[None, :], other=0.0)


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=["rows", "stride_mask", "ROWS_BUCKET"])
def _ista_dx_bytemask_kernel(
    dout_ptr, mask_ptr, m_ptr, dx_ptr, g_ptr, rows, d, eta, ROWS_BUCKET,
    stride_gr, stride_gc, stride_mask, stride_mr, stride_mc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WRITE_G: tl.constexpr,
):
    """dx = G + eta G M^T for one (BLOCK_M, BLOCK_N) tile (v1's grid), G's mask read as byte tiles; with WRITE_G
    also G itself (rows, d) contiguous in dx's dtype."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(d, BLOCK_N)
    offs_m = (pid // n_col_tiles * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = pid % n_col_tiles * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    byte = _mask_bytes(mask_ptr, offs_m, 0, rows, d, stride_mask, BLOCK_K)
    for k in range(0, d, BLOCK_K):
        kk = k + offs_k
        byte_next = _mask_bytes(mask_ptr, offs_m, k + BLOCK_K, rows, d, stride_mask, BLOCK_K)  # a step ahead
        a = _masked(_load_cols(dout_ptr, offs_m, k, rows, d, stride_gr, stride_gc, BLOCK_K), byte, BLOCK_M, BLOCK_K)
        byte = byte_next
        b = load_mt(m_ptr, kk, offs_n, d, stride_mr, stride_mc)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    g = _masked(_load_cols(dout_ptr, offs_m, col0, rows, d, stride_gr, stride_gc, BLOCK_N),
                _mask_bytes(mask_ptr, offs_m, col0, rows, d, stride_mask, BLOCK_N), BLOCK_M, BLOCK_N)
    tile_ok = (offs_m[:, None] < rows) & (offs_n[None, :] < d)
    out_offsets = offs_m[:, None] * d + offs_n[None, :]
    tl.store(dx_ptr + out_offsets, (g.to(tl.float32) + eta * acc).to(dx_ptr.dtype.element_ty), mask=tile_ok)
    if WRITE_G:
        tl.store(g_ptr + out_offsets, g.to(g_ptr.dtype.element_ty), mask=tile_ok)


@triton.autotune(**_AUTOTUNE)
@triton.jit(do_not_specialize=["rows", "chunk", "stride_mask", "ROWS_BUCKET"])
def _ista_dm_bytemask_kernel(
    x_ptr, dout_ptr, mask_ptr, part_ptr, rows, d, chunk, eta, ROWS_BUCKET,
    stride_xr, stride_xc, stride_gr, stride_gc, stride_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """part[s] = eta x_s^T G_s for the rows of chunk s (v1's grid and row chunks), computed transposed: tile
    (j, i) = sum_r G[r, j] x[r, i], so that G, masked in registers, is the product's register operand (the
    tensor cores read x from shared memory) and never goes back to shared memory; mask bytes one step ahead.
    BLOCK_N indexes G's columns j, BLOCK_M x's columns i."""
    pid, pid_s = tl.program_id(0), tl.program_id(1)
    n_col_tiles = tl.cdiv(d, BLOCK_M)
    offs_j = pid // n_col_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = pid % n_col_tiles * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = pid // n_col_tiles * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, rows)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    byte = _mask_bytes(mask_ptr, (start + offs_k).to(tl.int64), col0, end, d, stride_mask, BLOCK_N)
    for r in range(start, end, BLOCK_K):
        rr = (r + offs_k).to(tl.int64)
        byte_next = _mask_bytes(mask_ptr, rr + BLOCK_K, col0, end, d, stride_mask, BLOCK_N)  # a step ahead
        g = _masked(_load_cols(dout_ptr, rr, col0, end, d, stride_gr, stride_gc, BLOCK_N), byte, BLOCK_K, BLOCK_N)
        byte = byte_next
        x = _load_cols(x_ptr, rr, pid % n_col_tiles * BLOCK_M, end, d, stride_xr, stride_xc, BLOCK_M)
        a = tl.trans(g)
        if UPCAST:
            a, x = a.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(a, x, acc, input_precision=PRECISION)
    tl.store(  # part[s, i, j] = acc[j, i]
        part_ptr + pid_s.to(tl.int64) * d * d + offs_i[None, :] * d + offs_j[:, None], eta * acc,
        mask=(offs_i[None, :] < d) & (offs_j[:, None] < d),
    )


def _dx(dout, packed_mask, m, x, step_size, g=None):
    """dx (and G into ``g`` when given) from the bytemask dx kernel."""
    rows, d = x.shape
    mc = m.to(x.dtype)
    dx = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if dx.numel():
        _ista_dx_bytemask_kernel[tiles_grid(rows, d)](
            dout, packed_mask, mc, dx, dx if g is None else g, rows, d, step_size, tuning_bucket(rows),
            dout.stride(0), dout.stride(1), packed_mask.stride(0), mc.stride(0), mc.stride(1),
            UPCAST=upcast(x.dtype), PRECISION=fp32_dot_precision(x), WRITE_G=g is not None,
        )
    return dx


def _backward(dout, x, m, packed_mask, step_size, need_dx, need_dm, dm_of, keep_g):
    """The variants' common frame: dx from the bytemask dx kernel (which also writes G when ``keep_g`` and dM is
    needed), then dM = ``dm_of(dout, x, m, packed_mask, step_size, g)`` with that G or None."""
    check_triton_dtype(x)
    rows, d = x.shape
    dout = dout.to(x.dtype)
    check_launch(rows, d)
    dx = dm = g = None
    with device_guard(x):
        if need_dx:
            g = torch.empty((rows, d), dtype=x.dtype, device=x.device) if keep_g and need_dm else None
            dx = _dx(dout, packed_mask, m, x, step_size, g)
        if need_dm:
            dm = dm_of(dout, x, m, packed_mask, step_size, g)
    return dx, dm


def _dm_bytemask(dout, x, m, packed_mask, step_size, g):
    """dM = eta x^T G (fp32) from the bytemask dM kernel (G is formed in its registers)."""
    return launch_dm(_ista_dm_bytemask_kernel, dout, x, m, packed_mask, step_size)


def _backward_bytemask(dout, x, m, packed_mask, step_size, need_dx, need_dm):
    """dx = G + eta G M^T (x's dtype) and dM = eta x^T G (fp32), G = dOut * mask; None where not needed."""
    return _backward(dout, x, m, packed_mask, step_size, need_dx, need_dm, _dm_bytemask, keep_g=False)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: cuBLAS's fp32-output product for 16-bit CUDA operands, else in fp32."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _dm_gstore(dout, x, m, packed_mask, step_size, g):
    """dM = eta x^T G as one cuBLAS product, G the dx kernel's (or formed here when dx was not needed)."""
    if g is None:
        g = dout * unpack_mask(packed_mask, x.shape[1])
    return _mm_fp32(x.t(), g).mul_(step_size).to(m.dtype)


def _backward_gstore(dout, x, m, packed_mask, step_size, need_dx, need_dm):
    """As "bytemask", with G written by the dx kernel and dM = eta x^T G as one cuBLAS product."""
    return _backward(dout, x, m, packed_mask, step_size, need_dx, need_dm, _dm_gstore, keep_g=True)


register_variant("ista_backward", "bytemask", _backward_bytemask)
register_variant("ista_backward", "gstore", _backward_gstore)

INT32_INDEXED = ("m_ptr",)  # M (d x d), as in triton_v1
TRITON_KERNELS = {"ista_dx_bytemask": _ista_dx_bytemask_kernel, "ista_dm_bytemask": _ista_dm_bytemask_kernel}
# crate_kernels.ops.aot: every kept config for bf16 on sm_90 (the model's dtype, the GPU the variants are
# ranked on), the first kept config for every other dtype and arch
AOT_ALL_CONFIGS = (("bf16", 90),)


def aot_launches(dtype: torch.dtype, head_dim: int) -> None:
    """Both variants' launchers on CPU tensors, d = 12 heads x head_dim (48 and 64), 2 images."""
    if head_dim > 64:
        return
    rows, d = 2 * 197, 12 * head_dim
    x = torch.randn(rows, d, dtype=dtype)
    m = torch.randn(d, d)
    packed = torch.randint(0, 256, (rows, triton.cdiv(d, 8)), dtype=torch.uint8)
    _backward_bytemask(torch.randn_like(x), x, m, packed, 0.1, True, True)
    _backward_gstore(torch.randn_like(x), x, m, packed, 0.1, True, True)
