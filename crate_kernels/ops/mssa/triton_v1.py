"""MSSA's first Triton kernels ("v1") and their launchers; they register themselves as the "v1" variants and the
"triton" and "cuda" backends (crate_kernels.ops imports this module where triton is installed).

The forward keeps a running softmax over key blocks per row block (triton_common.softmax_step); the backward
recomputes P from lse and owns its rows of dw (no atomics). Grids, strides and the tuning key: triton_common.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import cuda_ext
from ..backend import accumulate_dtype, device_guard, register_triton_backends, register_variant, tuning_bucket
from .triton_common import (
    LN2,
    LOG2E,
    ROW_BYTES_LARGE,
    autotune_args,
    check_launch,
    exact_fp32,
    head_grid,
    head_rows,
    row_bytes,
    softmax_step,
    tile_of,
    triton_meta,
)

__all__ = ["forward_v1", "backward_v1", "TRITON_KERNELS", "aot_launches"]

# Tiles (BLOCK_M, BLOCK_N, warps, stages): tensor-core products (bf16, fp16, TF32, fp64), and exact fp32
# products, which run on FMA units and spill registers (and take seconds to compile) with larger tiles.
_FWD_TILES = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2), (32, 64, 4, 2))
_FWD_EXACT_FP32_TILES = ((64, 32, 8, 2), (32, 32, 8, 2))
_BWD_TILES = ((64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2),
              (32, 32, 4, 2))
_BWD_EXACT_FP32_TILES = ((32, 32, 8, 2),)


def _prune_fwd(configs, named_args, **kwargs):
    if exact_fp32(named_args, kwargs):
        return [c for c in configs if tile_of(c) in _FWD_EXACT_FP32_TILES]
    max_block_m = 64 if row_bytes(named_args, kwargs) > ROW_BYTES_LARGE else 128
    return [c for c in configs if tile_of(c) in _FWD_TILES and c.kwargs["BLOCK_M"] <= max_block_m]


def _prune_bwd(configs, named_args, **kwargs):
    if exact_fp32(named_args, kwargs):
        return [c for c in configs if tile_of(c) in _BWD_EXACT_FP32_TILES]
    row = row_bytes(named_args, kwargs)
    min_area, max_area = 32 * 32 + 1, 64 * 64  # every tile but the 32 x 32 fallback
    if row == ROW_BYTES_LARGE:
        min_area, max_area = 0, 64 * 32
    elif row > ROW_BYTES_LARGE:
        min_area, max_area = 0, 32 * 32
    return [c for c in configs if tile_of(c) in _BWD_TILES
            and min_area <= c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_area]


@triton.autotune(**autotune_args(_FWD_TILES + _FWD_EXACT_FP32_TILES, _prune_fwd))
@triton.jit(do_not_specialize=["BH_BUCKET"])
def _mssa_fwd_kernel(
    W, Out, Lse,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, scale, BH_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows i of one head: S_ij = scale w_i w_j^T, online softmax over key blocks j.

    Each w_j tile is loaded once and serves as key (S_ij) and value (out_i += P_ij w_j).
    Writes out_i = softmax(S_i) w (N x D, masked tails) and lse_i = logsumexp_j S_ij.
    """
    bh, b, h, row0 = head_rows(N, H, BLOCK_M)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_md = (offs_m < N)[:, None] & mask_d[None, :]
    w_head = W + b * stride_wb + h * stride_wh

    w_i = tl.load(w_head + offs_m[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask_md, other=0.0)
    if UPCAST:
        w_i = w_i.to(ACC)
    qk_scale = scale * LOG2E  # scores in log2 units, so exp(x) becomes exp2
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        w_j = tl.load(w_head + cols[:, None] * stride_wn + offs_d[None, :] * stride_wd,
                      mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            w_j = w_j.to(ACC)
        m_i, l_i, acc = softmax_step(w_i, w_j, m_i, l_i, acc, qk_scale, cols, N, True, ACC, PRECISION)

    out_head = Out + b * stride_ob + h * stride_oh
    tl.store(out_head + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=mask_md)
    tl.store(Lse + bh.to(tl.int64) * N + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < N)


@triton.jit
def _backward_rows(w_head, g_head, o_head, rows, mask_rows, offs_d, mask_d, stride_wn, stride_wd, stride_gn, stride_gd,
                   stride_on, stride_od, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` of one head's w and dO (in ACC when UPCAST), zero where masked, and delta = rowsum(dO * out) in
    ACC: what the backward reads of a row block, for i and for j alike."""
    mask = mask_rows[:, None] & mask_d[None, :]
    w = tl.load(w_head + rows[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask, other=0.0)
    g = tl.load(g_head + rows[:, None] * stride_gn + offs_d[None, :] * stride_gd, mask=mask, other=0.0)
    o = tl.load(o_head + rows[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    if UPCAST:
        w = w.to(ACC)
        g = g.to(ACC)
    return w, g, tl.sum(g.to(ACC) * o.to(ACC), 1)


@triton.autotune(**autotune_args(_BWD_TILES + _BWD_EXACT_FP32_TILES, _prune_bwd))
@triton.jit(do_not_specialize=["BH_BUCKET"])
def _mssa_bwd_kernel(
    W, Out, DOut, Lse, DW,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, N, D, scale, BH_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows i of dw = scale (dS + dS^T) w + P^T dO for one head, owned by this program (no atomics).

    Over key blocks j, with S_ij = scale w_i w_j^T (one product serves both orientations):
        query side  P_ij = exp(S_ij - lse_i),    dS_ij = P_ij (dO_i w_j^T - delta_i)
        key side    P_ji = exp(S_ij - lse_j)^T,  dS_ji = P_ji (dO_j w_i^T - delta_j)
        dw_i += scale (dS_ij + dS_ji^T) w_j + P_ji^T dO_j
    with delta = rowsum(dO * out) computed on the fly for blocks i and j.
    """
    bh, b, h, row0 = head_rows(N, H, BLOCK_M)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_m = offs_m < N
    mask_md = mask_m[:, None] & mask_d[None, :]
    w_head = W + b * stride_wb + h * stride_wh
    o_head = Out + b * stride_ob + h * stride_oh
    g_head = DOut + b * stride_gb + h * stride_gh
    lse_head = Lse + bh.to(tl.int64) * N

    w_i, g_i, delta_i = _backward_rows(w_head, g_head, o_head, offs_m, mask_m, offs_d, mask_d, stride_wn, stride_wd,
                                       stride_gn, stride_gd, stride_on, stride_od, ACC, UPCAST)
    lse_i = tl.load(lse_head + offs_m, mask=mask_m, other=0.0) * LOG2E
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        w_j, g_j, delta_j = _backward_rows(w_head, g_head, o_head, cols, mask_n, offs_d, mask_d, stride_wn, stride_wd,
                                           stride_gn, stride_gd, stride_on, stride_od, ACC, UPCAST)
        lse_j = tl.load(lse_head + cols, mask=mask_n, other=0.0) * LOG2E

        # Key-block tails need no mask: there w_j = dO_j = 0 and lse_j = 0, so every term that
        # reaches acc multiplies a zero row of w_j or dO_j, or is P_ji^T (dP_ji^T - delta_j) = 1 * 0.
        s = tl.dot(w_i, tl.trans(w_j), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        p_q = tl.exp2(s - lse_i[:, None])  # P_ij
        p_k = tl.exp2(s - lse_j[None, :])  # P_ji^T
        dp_q = tl.dot(g_i, tl.trans(w_j), input_precision=PRECISION, out_dtype=ACC)  # dP_ij
        dp_k = tl.dot(w_i, tl.trans(g_j), input_precision=PRECISION, out_dtype=ACC)  # dP_ji^T
        ds = (p_q * (dp_q - delta_i[:, None]) + p_k * (dp_k - delta_j[None, :])) * scale
        acc = tl.dot(ds.to(w_j.dtype), w_j, acc, input_precision=PRECISION, out_dtype=ACC)
        acc = tl.dot(p_k.to(g_j.dtype), g_j, acc, input_precision=PRECISION, out_dtype=ACC)

    dw_head = DW + b * stride_db + h * stride_dh
    tl.store(dw_head + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd,
             acc.to(DW.dtype.element_ty), mask=mask_md)


def launch_forward(kernel, w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward kernel of v1's signature (v1's, or a variant's) on w (B, H, N, p), any strides -> out (w's dtype
    and layout), lse (B, H, N) fp32 (fp64 for fp64 w).

    fp32 products are exact ("ieee") unless torch.set_float32_matmul_precision allows TF32."""
    meta = triton_meta(w)
    b, h, n, p = w.shape
    out = torch.empty_like(w)
    lse = torch.empty((b, h, n), dtype=accumulate_dtype(w.dtype), device=w.device)
    if out.numel():
        check_launch(w, out)
        with device_guard(w):
            kernel[head_grid(b * h, n)](
                w, out, lse, *w.stride(), *out.stride(), h, n, p, scale, tuning_bucket(b * h), **meta
            )
    return out, lse


def forward_v1(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v1's forward kernel through ``launch_forward``."""
    return launch_forward(_mssa_fwd_kernel, w, scale)


def backward_v1(dout, w, out, lse, scale):
    """dw (w's dtype and layout) from dout, w, out (any strides) and lse (B, H, N) contiguous."""
    meta = triton_meta(w)
    b, h, n, p = w.shape
    dout, out = dout.to(w.dtype), out.to(w.dtype)  # the kernel's products take one operand dtype
    dw = torch.empty_like(w)
    if dw.numel():
        check_launch(w, out, dout, dw)
        with device_guard(w):
            _mssa_bwd_kernel[head_grid(b * h, n)](
                w, out, dout, lse.contiguous(), dw,
                *w.stride(), *out.stride(), *dout.stride(), *dw.stride(), h, n, p, scale, tuning_bucket(b * h),
                **meta,
            )
    return dw


def _backward_cuda(dout, w, out, lse, scale, kernel=None):
    """The CUDA-extension backward (csrc/, built on first use); ``kernel``: its csrc/ kernel (None: the extension's
    pick)."""
    return cuda_ext.mssa_backward(dout, w, out, lse, scale, kernel=kernel)


register_variant("mssa_forward", "v1", forward_v1)
register_variant("mssa_backward", "v1", backward_v1)
# "cuda": this forward with the CUDA-extension backward; each csrc/ kernel a candidate of auto
register_triton_backends("mssa", _backward_cuda, tuple(k for k in cuda_ext.MSSA_KERNELS if k != "auto"))

# Every Triton kernel of this module, and launcher calls that reach each one: what crate_kernels.ops.aot
# compiles for GPU targets in CI (a kernel added here without a launch that reaches it fails there).
TRITON_KERNELS = {"mssa_fwd": _mssa_fwd_kernel, "mssa_bwd": _mssa_bwd_kernel}


def aot_launches(dtype: torch.dtype, head_dim: int) -> None:
    """Run both launchers on CPU tensors in the model's (B, N, H, p) -> (B, H, N, p) layout."""
    b, n, h = 2, 197, 12
    w = torch.randn(b, n, h, head_dim, dtype=dtype).transpose(1, 2)
    out, lse = forward_v1(w, head_dim ** -0.5)
    backward_v1(torch.randn_like(w), w, out, lse, head_dim ** -0.5)
