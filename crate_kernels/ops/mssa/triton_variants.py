"""MSSA kernel variants: alternative Triton kernels for triton_v1's forward and backward (same math, same launcher
signatures, registered with ``register_variant``; ``crate_kernels.ops.kernel_variants()`` lists them). A variant
kernel takes its v1 counterpart's arguments, so its signature and the triton_common names it imports repeat v1's.

    forward  "tail"       v1's loop with tails cut to size: full BLOCK_N key blocks unmasked, then one key block of
                          TAIL_N = next_pow2(N mod BLOCK_N) (>= 16) columns; the last row block of a head runs as a
                          TAIL_M-row tile. N = 197 with 64-blocks: 3 x 64 + 16 per side, 208^2 score entries
                          instead of 256^2 (-34%).
    backward "stacked"    three products per tile pair instead of five: T = [w_j; dO_j] loaded as one tile,
                          w_i T^T = [S | dP_ji^T] in one product, dP_ij = dO_i w_j^T, and dw_i += [dS | P_ji^T] T
                          as one product with K = 2 BLOCK_N; delta = rowsum(dO * out) in a pre-pass kernel.
    backward "symmetric"  persistent programs, one (batch, head) at a time, over unordered tile pairs I <= J
                          (S_IJ = S_JI^T computed once: half the exponentials), with "stacked"'s products: dw_I in
                          registers, dw_J in a per-program fp32 scratch of one head's rows (L2-resident), no
                          atomics; 4 products per off-diagonal pair where "stacked" runs 6 and v1 10. For
                          N <= SYMMETRIC_MAX_N; longer sequences run "v1" (few heads, each one program, would
                          leave the GPU idle).

Head dims past VARIANT_MAX_HEAD_DIM run v1 in every variant (its pruning keeps large rows within shared memory; the
variants are compiled and checked ahead of time at CRATE's head dims 48 and 64).

Not a variant: S_{j+1} issued before the softmax of S_j. Triton 3.6 waits for a wgmma whose result feeds anything
but the next product's accumulator right after issuing it (compiled for sm_90: both products of the loop waited
at once), and ignores tl.range(warp_specialize=True) on sm_90, so the overlap cannot be written in it.

Backward (crate_kernels.ops.mssa): dP = dO w^T, delta = rowsum(dO * out), dS = P * (dP - delta),
dw = scale (dS + dS^T) w + P^T dO.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import accumulate_dtype, device_guard, register_variant, tuning_bucket
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
from .triton_v1 import backward_v1, forward_v1, launch_forward

__all__ = ["SYMMETRIC_MAX_N", "VARIANT_MAX_HEAD_DIM"]

SYMMETRIC_MAX_N = 512
VARIANT_MAX_HEAD_DIM = 64  # CRATE's head dims (48, 64); larger ones run v1, whose tiles are pruned for them

_TAIL_TILES = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2))
_FWD_EXACT_FP32_TILES = ((64, 32, 8, 2),)
_STACKED_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2), (32, 32, 4, 2))
_STACKED_EXACT_FP32_TILES = ((32, 16, 8, 2),)
_SYMMETRIC_TILES = ((64, 64, 4, 2), (32, 32, 4, 2), (64, 64, 4, 3))
_SYMMETRIC_EXACT_FP32_TILES = ((16, 16, 8, 1),)


def _prune_tail(configs, named_args, **kwargs):
    """The FMA tile for exact fp32 products, else the tensor-core tiles (rows of at most 512 bytes: p <= 64)."""
    tiles = _FWD_EXACT_FP32_TILES if exact_fp32(named_args, kwargs) else _TAIL_TILES
    return [c for c in configs if tile_of(c) in tiles]


def _prune_stacked(configs, named_args, **kwargs):
    """The FMA tile for exact fp32 products; else the tiles larger than 32 x 32, or that fallback alone for rows of
    512 bytes (fp64 at p = 64)."""
    if exact_fp32(named_args, kwargs):
        return [c for c in configs if tile_of(c) in _STACKED_EXACT_FP32_TILES]
    large = row_bytes(named_args, kwargs) >= ROW_BYTES_LARGE
    return [c for c in configs if tile_of(c) in _STACKED_TILES
            and (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32) == large]


def _tail(n: int, block: int) -> int:
    """Size of the tile that holds the n mod block left-over rows (0: none), at least 16 (a dot's minimum)."""
    rest = n % block
    return min(block, max(16, triton.next_power_of_2(rest))) if rest else 0


# ------------------------------------------------------------------------------------------------------
# forward "tail"
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _attend_rows(w_head, out_head, lse_head, row0, N, D,
                 stride_wn, stride_wd, stride_on, stride_od, qk_scale,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """out and lse of rows [row0, row0 + ROWS) of one head: unmasked full key blocks, then the key tail."""
    offs_m = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_md = (offs_m < N)[:, None] & mask_d[None, :]
    w_i = tl.load(w_head + offs_m[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask_md, other=0.0)
    if UPCAST:
        w_i = w_i.to(ACC)
    m_i = tl.full([ROWS], float("-inf"), ACC)
    l_i = tl.zeros([ROWS], ACC)
    acc = tl.zeros([ROWS, BLOCK_D], ACC)
    n_full = N - N % BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(0, n_full, BLOCK_N):
        cols = start_n + offs_n
        w_j = tl.load(w_head + cols[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask_d[None, :],
                      other=0.0)
        if UPCAST:
            w_j = w_j.to(ACC)
        m_i, l_i, acc = softmax_step(w_i, w_j, m_i, l_i, acc, qk_scale, cols, N, False, ACC, PRECISION)
    if TAIL_N > 0:
        cols = n_full + tl.arange(0, TAIL_N)
        w_j = tl.load(w_head + cols[:, None] * stride_wn + offs_d[None, :] * stride_wd,
                      mask=(cols < N)[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            w_j = w_j.to(ACC)
        m_i, l_i, acc = softmax_step(w_i, w_j, m_i, l_i, acc, qk_scale, cols, N, True, ACC, PRECISION)
    tl.store(out_head + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             (acc / l_i[:, None]).to(out_head.dtype.element_ty), mask=mask_md)
    tl.store(lse_head + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=offs_m < N)


@triton.autotune(**autotune_args(_TAIL_TILES + _FWD_EXACT_FP32_TILES, _prune_tail))
@triton.heuristics({"TAIL_M": lambda a: _tail(a["N"], a["BLOCK_M"]),
                    "TAIL_N": lambda a: _tail(a["N"], a["BLOCK_N"])})
@triton.jit(do_not_specialize=["BH_BUCKET"])
def _mssa_fwd_tail_kernel(
    W, Out, Lse,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, D, scale, BH_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """v1's forward (grid: cdiv(N, BLOCK_M) programs per head) with the key and row tails cut to size: the last
    row block of a head, when it holds fewer than BLOCK_M rows, runs as a TAIL_M-row tile."""
    bh, b, h, row0 = head_rows(N, H, BLOCK_M)
    w_head = W + b * stride_wb + h * stride_wh
    out_head = Out + b * stride_ob + h * stride_oh
    lse_head = Lse + bh.to(tl.int64) * N
    qk_scale = scale * LOG2E
    if TAIL_M > 0 and TAIL_M < BLOCK_M:
        if row0 + BLOCK_M > N:
            _attend_rows(w_head, out_head, lse_head, row0, N, D, stride_wn, stride_wd, stride_on, stride_od,
                         qk_scale, TAIL_M, BLOCK_N, TAIL_N, BLOCK_D, ACC, UPCAST, PRECISION)
        else:
            _attend_rows(w_head, out_head, lse_head, row0, N, D, stride_wn, stride_wd, stride_on, stride_od,
                         qk_scale, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, ACC, UPCAST, PRECISION)
    else:
        _attend_rows(w_head, out_head, lse_head, row0, N, D, stride_wn, stride_wd, stride_on, stride_od,
                     qk_scale, BLOCK_M, BLOCK_N, TAIL_N, BLOCK_D, ACC, UPCAST, PRECISION)


def _forward_launcher(kernel):
    def forward(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """w (B, H, N, p), any strides -> out (w's dtype and layout), lse (B, H, N) fp32 (fp64 for fp64 w);
        head dims past VARIANT_MAX_HEAD_DIM run v1."""
        if w.shape[-1] > VARIANT_MAX_HEAD_DIM:
            return forward_v1(w, scale)
        return launch_forward(kernel, w, scale)
    return forward


_forward_tail = _forward_launcher(_mssa_fwd_tail_kernel)


# ------------------------------------------------------------------------------------------------------
# backward pre-pass: delta = rowsum(dO * out)
# ------------------------------------------------------------------------------------------------------
@triton.autotune(configs=[triton.Config({"BLOCK_M": 64}, num_warps=4)], key=["BLOCK_D"])
@triton.jit
def _mssa_delta_kernel(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Delta[bh, n] = sum_d dO[b, h, n, d] out[b, h, n, d] (accumulated in ACC); grid: cdiv(N, BLOCK_M) per head."""
    bh, b, h, row0 = head_rows(N, H, BLOCK_M)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0)
    g = tl.load(DOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                mask=mask, other=0.0)
    tl.store(Delta + bh.to(tl.int64) * N + offs_m, tl.sum(o.to(ACC) * g.to(ACC), 1), mask=offs_m < N)


def _delta(dout: torch.Tensor, out: torch.Tensor, meta: dict) -> torch.Tensor:
    b, h, n, p = out.shape
    delta = torch.empty((b, h, n), dtype=accumulate_dtype(out.dtype), device=out.device)
    _mssa_delta_kernel[head_grid(b * h, n)](
        out, dout, delta, *out.stride(), *dout.stride(), h, n, p, BLOCK_D=meta["BLOCK_D"], ACC=meta["ACC"],
    )
    return delta


# ------------------------------------------------------------------------------------------------------
# backward "stacked"
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(head, rows, offs_d, mask_d, N, stride_n, stride_d, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` of one head's (N, D) matrix, zero past N and D."""
    x = tl.load(head + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
                mask=(rows < N)[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        x = x.to(ACC)
    return x


@triton.jit
def _load_stacked(w_head, g_head, start, offs_d, mask_d, N, stride_wn, stride_wd, stride_gn, stride_gd,
                  BLOCK: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    """T = [w; dO] for rows [start, start + BLOCK) of one head as one (2 BLOCK, BLOCK_D) tile (one load, one
    shared-memory operand): rows [0, BLOCK) from w, rows [BLOCK, 2 BLOCK) from dO; zero past N and D."""
    offs_t = tl.arange(0, 2 * BLOCK)
    rows = start + offs_t % BLOCK
    ptrs = tl.where((offs_t < BLOCK)[:, None], w_head + rows[:, None] * stride_wn + offs_d[None, :] * stride_wd,
                    g_head + rows[:, None] * stride_gn + offs_d[None, :] * stride_gd)
    t = tl.load(ptrs, mask=(rows < N)[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        t = t.to(ACC)
    return t


@triton.jit
def _halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The left and right (ROWS, COLS) halves of x (ROWS, 2 COLS)."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS)), (0, 2, 1)))


@triton.jit
def _side_by_side(a, b, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[a | b] (ROWS, 2 COLS) from a and b (ROWS, COLS)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (ROWS, 2 * COLS))


@triton.jit
def _pair_scores(w_i, g_i, t_j, w_j, lse_i, lse_j, delta_i, delta_j, qk_scale, scale,
                 ROWS: tl.constexpr, COLS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """What row tile i and key tile j (T_j = [w_j; dO_j]) give dw, in two products, [S_ij | dP_ji^T] = w_i T_j^T
    and dP_ij = dO_i w_j^T (S scaled, in log2 units by qk_scale; lse in log2 units):
        P_ij = exp(S_ij - lse_i),  P_ji^T = exp(S_ij - lse_j),
        D = scale (P_ij (dP_ij - delta_i) + P_ji^T (dP_ji^T - delta_j))  (= scale (dS_ij + dS_ji^T)).
    Returns D, P_ij and P_ji^T, (ROWS, COLS) in ACC."""
    s, dp_k = _halves(tl.dot(w_i, tl.trans(t_j), input_precision=PRECISION, out_dtype=ACC), ROWS, COLS)
    s = s * qk_scale
    p_q = tl.exp2(s - lse_i[:, None])
    p_k = tl.exp2(s - lse_j[None, :])
    dp_q = tl.dot(g_i, tl.trans(w_j), input_precision=PRECISION, out_dtype=ACC)
    return (p_q * (dp_q - delta_i[:, None]) + p_k * (dp_k - delta_j[None, :])) * scale, p_q, p_k


@triton.autotune(**autotune_args(_STACKED_TILES + _STACKED_EXACT_FP32_TILES, _prune_stacked))
@triton.jit(do_not_specialize=["BH_BUCKET"])
def _mssa_bwd_stacked_kernel(
    W, DOut, Delta, Lse, DW,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, N, D, scale, BH_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Rows i of dw (v1's grid and ownership, no atomics) with three products per key block j:

        T = [w_j; dO_j]                                                      (2 BLOCK_N, D), one load
        [S_ij | dP_ji^T] = w_i T^T  (scaled S; dP_ji^T = w_i dO_j^T)         (BLOCK_M, 2 BLOCK_N)
        dP_ij = dO_i w_j^T
        P_ij = exp(S - lse_i),  P_ji^T = exp(S - lse_j)
        dS = scale (P_ij (dP_ij - delta_i) + P_ji^T (dP_ji^T - delta_j))
        dw_i += [dS | P_ji^T] T                                              (K = 2 BLOCK_N)
    Key tails need no mask (zero rows of w_j and dO_j, lse_j = delta_j = 0: see v1).
    """
    bh, b, h, row0 = head_rows(N, H, BLOCK_M)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_m = offs_m < N
    w_head = W + b * stride_wb + h * stride_wh
    g_head = DOut + b * stride_gb + h * stride_gh
    lse_head = Lse + bh.to(tl.int64) * N
    delta_head = Delta + bh.to(tl.int64) * N

    w_i = _load_rows(w_head, offs_m, offs_d, mask_d, N, stride_wn, stride_wd, ACC, UPCAST)
    g_i = _load_rows(g_head, offs_m, offs_d, mask_d, N, stride_gn, stride_gd, ACC, UPCAST)
    lse_i = tl.load(lse_head + offs_m, mask=mask_m, other=0.0) * LOG2E
    delta_i = tl.load(delta_head + offs_m, mask=mask_m, other=0.0)
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        t = _load_stacked(w_head, g_head, start_n, offs_d, mask_d, N, stride_wn, stride_wd, stride_gn, stride_gd,
                          BLOCK_N, ACC, UPCAST)
        w_j = _load_rows(w_head, cols, offs_d, mask_d, N, stride_wn, stride_wd, ACC, UPCAST)
        lse_j = tl.load(lse_head + cols, mask=mask_n, other=0.0) * LOG2E
        delta_j = tl.load(delta_head + cols, mask=mask_n, other=0.0)

        ds, _, p_k = _pair_scores(w_i, g_i, t, w_j, lse_i, lse_j, delta_i, delta_j, qk_scale, scale,
                                  BLOCK_M, BLOCK_N, ACC, PRECISION)
        a = _side_by_side(ds.to(t.dtype), p_k.to(t.dtype), BLOCK_M, BLOCK_N)
        acc = tl.dot(a, t, acc, input_precision=PRECISION, out_dtype=ACC)

    dw_head = DW + b * stride_db + h * stride_dh
    tl.store(dw_head + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd,
             acc.to(DW.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _backward_stacked(dout, w, out, lse, scale):
    """dw (w's dtype and layout) from dout, w, out (any strides) and lse (B, H, N) contiguous; head dims past
    VARIANT_MAX_HEAD_DIM run v1."""
    if w.shape[-1] > VARIANT_MAX_HEAD_DIM:
        return backward_v1(dout, w, out, lse, scale)
    meta = triton_meta(w)
    b, h, n, p = w.shape
    dout, out = dout.to(w.dtype), out.to(w.dtype)
    dw = torch.empty_like(w)
    if dw.numel():
        check_launch(w, dout, out, dw)
        with device_guard(w):
            delta = _delta(dout, out, meta)
            _mssa_bwd_stacked_kernel[head_grid(b * h, n)](
                w, dout, delta, lse.contiguous(), dw, *w.stride(), *dout.stride(), *dw.stride(),
                h, n, p, scale, tuning_bucket(b * h), **meta,
            )
    return dw


# ------------------------------------------------------------------------------------------------------
# backward "symmetric"
# ------------------------------------------------------------------------------------------------------
def _prune_symmetric(configs, named_args, **kwargs):
    """The FMA tile for exact fp32 products; else every tile for 2-byte operands, the 32 x 32 ones for 4- and
    8-byte operands (TF32, fp64): a pair holds eight tiles of scores and products, which spill from 64 x 64 tiles
    of 4-byte values."""
    if exact_fp32(named_args, kwargs):
        return [c for c in configs if tile_of(c) in _SYMMETRIC_EXACT_FP32_TILES]
    wide = named_args["W"].element_size() >= 4
    return [c for c in configs if tile_of(c) in _SYMMETRIC_TILES
            and (not wide or c.kwargs["BLOCK_M"] == 32)]


@triton.autotune(**autotune_args(_SYMMETRIC_TILES + _SYMMETRIC_EXACT_FP32_TILES, _prune_symmetric))
@triton.jit(do_not_specialize=["BH", "BH_BUCKET"])
def _mssa_bwd_symmetric_kernel(
    W, DOut, Delta, Lse, DW, Scratch,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_db, stride_dh, stride_dn, stride_dd,
    H, BH, N, D, scale, BH_BUCKET,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dw of whole heads: program p takes heads p, p + programs, ...; square tiles (BLOCK_N = BLOCK_M).

    Row tile I: T_I = [w_I; dO_I]; the pair (I, I), then every J > I with "stacked"'s products:
        [S | dP_JI^T] = w_I T_J^T,  dP_IJ = dO_I w_J^T,  P_q = P_IJ = exp(S - lse_I),  P_k = P_JI^T = exp(S - lse_J)
        D = scale (P_q (dP_IJ - delta_I) + P_k (dP_JI^T - delta_J))            (= scale (dS_IJ + dS_JI^T))
        dw_I += [D | P_k] T_J                          (registers)
        dw_J += [D^T | P_q^T] T_I                    (Scratch rows J: stored when I is the first tile, else added)
    (the pair (I, I) adds [D | P_k] T_I alone), then dw_I = registers + Scratch rows I. Scratch holds one head's
    N x BLOCK_D rows per program; a barrier after each row tile orders its stores before other threads' reads.
    """
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    qk_scale = scale * LOG2E
    scratch = Scratch + pid.to(tl.int64) * N * BLOCK_D
    for head in range(pid, BH, tl.num_programs(0)):
        bh = tl.cast(head, tl.int64)
        b = bh // H
        h = bh % H
        w_head = W + b * stride_wb + h * stride_wh
        g_head = DOut + b * stride_gb + h * stride_gh
        dw_head = DW + b * stride_db + h * stride_dh
        lse_head = Lse + bh * N
        delta_head = Delta + bh * N
        for start_i in range(0, N, BLOCK_M):
            rows_i = start_i + offs
            mask_i = rows_i < N
            t_i = _load_stacked(w_head, g_head, start_i, offs_d, mask_d, N, stride_wn, stride_wd, stride_gn,
                                stride_gd, BLOCK_M, ACC, UPCAST)
            w_i = _load_rows(w_head, rows_i, offs_d, mask_d, N, stride_wn, stride_wd, ACC, UPCAST)
            g_i = _load_rows(g_head, rows_i, offs_d, mask_d, N, stride_gn, stride_gd, ACC, UPCAST)
            lse_i = tl.load(lse_head + rows_i, mask=mask_i, other=0.0) * LOG2E
            delta_i = tl.load(delta_head + rows_i, mask=mask_i, other=0.0)

            d, _, p_k = _pair_scores(w_i, g_i, t_i, w_i, lse_i, lse_i, delta_i, delta_i, qk_scale, scale,
                                     BLOCK_M, BLOCK_M, ACC, PRECISION)
            acc = tl.dot(_side_by_side(d.to(t_i.dtype), p_k.to(t_i.dtype), BLOCK_M, BLOCK_M), t_i,
                         input_precision=PRECISION, out_dtype=ACC)

            for start_j in range(start_i + BLOCK_M, N, BLOCK_M):
                rows_j = start_j + offs
                mask_j = rows_j < N
                t_j = _load_stacked(w_head, g_head, start_j, offs_d, mask_d, N, stride_wn, stride_wd, stride_gn,
                                    stride_gd, BLOCK_M, ACC, UPCAST)
                w_j = _load_rows(w_head, rows_j, offs_d, mask_d, N, stride_wn, stride_wd, ACC, UPCAST)
                lse_j = tl.load(lse_head + rows_j, mask=mask_j, other=0.0) * LOG2E
                delta_j = tl.load(delta_head + rows_j, mask=mask_j, other=0.0)
                d_ij, p_ij, p_ji = _pair_scores(w_i, g_i, t_j, w_j, lse_i, lse_j, delta_i, delta_j, qk_scale, scale,
                                                BLOCK_M, BLOCK_M, ACC, PRECISION)
                d_ij = d_ij.to(t_i.dtype)
                acc = tl.dot(_side_by_side(d_ij, p_ji.to(t_i.dtype), BLOCK_M, BLOCK_M), t_j, acc,
                             input_precision=PRECISION, out_dtype=ACC)
                side_j = tl.dot(_side_by_side(tl.trans(d_ij), tl.trans(p_ij.to(t_i.dtype)), BLOCK_M, BLOCK_M),
                                t_i, input_precision=PRECISION, out_dtype=ACC)
                scratch_j = scratch + rows_j[:, None] * BLOCK_D + offs_d[None, :]
                side_j += tl.load(scratch_j, mask=mask_j[:, None] & (start_i > 0), other=0.0)
                tl.store(scratch_j, side_j, mask=mask_j[:, None])

            scratch_i = scratch + rows_i[:, None] * BLOCK_D + offs_d[None, :]
            acc += tl.load(scratch_i, mask=mask_i[:, None] & (start_i > 0), other=0.0)
            tl.store(dw_head + rows_i[:, None] * stride_dn + offs_d[None, :] * stride_dd,
                     acc.to(DW.dtype.element_ty), mask=mask_i[:, None] & mask_d[None, :])
            tl.debug_barrier()


_SYMMETRIC_PROGRAMS_PER_SM = 2


def _symmetric_programs(batch_heads: int, device: torch.device) -> int:
    """Persistent programs: two per SM (three under the interpreter, which exercises the loop over heads)."""
    if device.type != "cuda":
        return min(batch_heads, 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(batch_heads, _SYMMETRIC_PROGRAMS_PER_SM * sms)


def _backward_symmetric(dout, w, out, lse, scale):
    """dw (w's dtype and layout) from dout, w, out (any strides) and lse (B, H, N) contiguous; N above
    SYMMETRIC_MAX_N or head dims past VARIANT_MAX_HEAD_DIM run v1."""
    b, h, n, p = w.shape
    if n > SYMMETRIC_MAX_N or p > VARIANT_MAX_HEAD_DIM:
        return backward_v1(dout, w, out, lse, scale)
    meta = triton_meta(w)
    dout, out = dout.to(w.dtype), out.to(w.dtype)
    dw = torch.empty_like(w)
    if dw.numel():
        check_launch(w, dout, out, dw)
        programs = _symmetric_programs(b * h, w.device)
        scratch = torch.empty((programs, n, meta["BLOCK_D"]), dtype=lse.dtype, device=w.device)
        with device_guard(w):
            delta = _delta(dout, out, meta)
            _mssa_bwd_symmetric_kernel[(programs,)](
                w, dout, delta, lse.contiguous(), dw, scratch, *w.stride(), *dout.stride(), *dw.stride(),
                h, b * h, n, p, scale, tuning_bucket(b * h), **meta,
            )
    return dw


register_variant("mssa_forward", "tail", _forward_tail)
register_variant("mssa_backward", "stacked", _backward_stacked)
register_variant("mssa_backward", "symmetric", _backward_symmetric)

TRITON_KERNELS = {
    "mssa_fwd_tail": _mssa_fwd_tail_kernel,
    "mssa_delta": _mssa_delta_kernel, "mssa_bwd_stacked": _mssa_bwd_stacked_kernel,
    "mssa_bwd_symmetric": _mssa_bwd_symmetric_kernel,
}

# crate_kernels.ops.aot: every kept config for bf16 on sm_90 (the model's dtype, the GPU the variants are
# ranked on), the first kept config for every other dtype and arch
AOT_ALL_CONFIGS = (("bf16", 90),)


def aot_launches(dtype: torch.dtype, head_dim: int) -> None:
    """Every variant's launchers on CPU tensors in the model's layout (head dims up to 64: the variants target
    CRATE's 48 and 64)."""
    if head_dim > 64:
        return
    b, n, h = 2, 197, 12
    w = torch.randn(b, n, h, head_dim, dtype=dtype).transpose(1, 2)
    scale = head_dim ** -0.5
    out, lse = _forward_tail(w, scale)
    for backward in (_backward_stacked, _backward_symmetric):
        backward(torch.randn_like(w), w, out, lse, scale)
