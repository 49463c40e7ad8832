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
from torch.utils.flop_counter import register_flop_formula

from ..backend import (
    AUTO_TRITON, accumulate_dtype, autocast_dtype, autocast_input, config_pruning, device_guard, fp32_dot_precision,
    register_variant, resolve_backend, triton_available, triton_interpreting, tuning_bucket, variant_launcher,
    with_fallback,
)
from ..layer_norm_linear import layer_norm_backward, layer_norm_recompute, layer_norm_stats

__all__ = ["ista_step", "ista_reference", "ISTAFunction", "pack_mask", "unpack_mask"]

_BACKENDS = ("reference", "torch")


def ista_reference(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    """The release's eager math: three products, autograd through every intermediate."""
    x1 = torch.nn.functional.linear(x, weight)
    grad_1 = torch.nn.functional.linear(x1, weight.t())
    grad_2 = torch.nn.functional.linear(x, weight.t())
    grad_update = step_size * (grad_2 - grad_1) - step_size * lambd
    return torch.nn.functional.relu(x + grad_update)



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
    bits = mask.view(rows, mask.shape[1] // 8, 8).to(torch.uint8) * _bit_weights(mask.device)
    return bits.sum(dim=-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: (rows, ceil(d / 8)) uint8 -> (rows, d) bool."""
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0
    return bits.flatten(1)[:, :d]


def dictionary_matrix(weight: torch.Tensor) -> torch.Tensor:
    """M = W - W^T W in fp32 (fp64 for fp64 W), also under autocast (which would run W^T W in its 16-bit dtype)."""
    wc = weight.to(accumulate_dtype(weight.dtype))
    with torch.autocast(weight.device.type, enabled=False):
        return wc - wc.t() @ wc


def dictionary_grad(weight: torch.Tensor, grad_m: torch.Tensor) -> torch.Tensor:
    """dW = dM - W (dM + dM^T) for M = W - W^T W, in dM's dtype (fp32), also under autocast."""
    wc = weight.to(grad_m.dtype)
    with torch.autocast(weight.device.type, enabled=False):
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
# Triton kernels and launchers (present where the triton package is installed)
#
# x (rows, d) and dOut (rows, d) are read through their strides; M (d, d) is cast to x's dtype by the
# launcher; dot products accumulate in fp32 (exact "ieee" for fp32 operands unless PyTorch allows TF32).
# Each kernel owns a (BLOCK_M, BLOCK_N) output tile and loops over the contraction dimension in BLOCK_K
# steps; every index is masked, so any d works (BLOCK_K >= 32 keeps tl.dot's K >= 16). The activation mask
# travels as bits: the forward packs its (BLOCK_M, BLOCK_N) tile into (BLOCK_M, BLOCK_N / 8) bytes, the
# backward unpacks bits while loading dOut, so G = dOut * mask never exists in memory.
# Autotuning key: d, dot precision, operand dtype, and rows rounded up to a power of two (ROWS_BUCKET, unused
# by the kernels); rows itself is not specialized on, so a last partial batch neither retunes nor recompiles
# (nor does the mask's row stride, ceil(d / 8) bytes, so model widths share kernels).
# ----------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    # Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): tensor-core products (bf16, fp16, TF32), and exact fp32
    # products, which run on FMA units and spill registers (and take seconds to compile) with larger tiles.
    _TILES = ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4))
    _EXACT_FP32_TILES = ((64, 64, 32, 8, 3),)
    _MAX_SHARED_MEMORY = 232448  # bytes a block may use on Hopper, the most of any GPU here

    def _matmul_configs(tiles):
        """The ``tiles`` to autotune on a GPU; one config under the interpreter (autotuning cannot run there)."""
        if triton_interpreting():
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles
        ]

    def _tile(config) -> tuple:
        return (*config.kwargs.values(), config.num_warps, config.num_stages)

    def _prune_rule(tiles, exact_fp32_tiles):
        """Exact fp32 products: the FMA tiles. Otherwise the tensor-core ``tiles`` whose pipelined operand tiles
        (stages x (BLOCK_M + BLOCK_N) x BLOCK_K elements) fit in Hopper's shared memory; the first one kept also
        fits an A100's (crate_kernels.ops.aot checks both)."""

        def prune(configs, named_args, **kwargs):
            nbytes = next(iter(named_args.values())).element_size()  # every kernel's first argument is an operand
            if kwargs["PRECISION"] == "ieee" and nbytes == 4:
                return [c for c in configs if _tile(c) in exact_fp32_tiles]
            return [
                c for c in configs if _tile(c) in tiles
                and c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * nbytes
                <= _MAX_SHARED_MEMORY
            ]

        return prune

    def _autotune(tiles, exact_fp32_tiles) -> dict:
        """triton.autotune's arguments for ISTA's matrix-product kernels over these tiles."""
        return {"configs": _matmul_configs(tiles + exact_fp32_tiles), "key": ["ROWS_BUCKET", "d", "PRECISION"],
                "prune_configs_by": config_pruning(_prune_rule(tiles, exact_fp32_tiles))}

    @triton.jit
    def _load_g(dout_ptr, mask_ptr, offs_r, offs_c, rows, d, stride_gr, stride_gc, stride_mask):
        """Tile G[r, c] = dOut[r, c] * bit (c % 8) of packed_mask[r, c // 8]; zero outside (rows, d)."""
        valid = (offs_r[:, None] < rows) & (offs_c[None, :] < d)
        g = tl.load(dout_ptr + offs_r[:, None] * stride_gr + offs_c[None, :] * stride_gc, mask=valid, other=0.0)
        byte = tl.load(mask_ptr + offs_r[:, None] * stride_mask + (offs_c // 8)[None, :], mask=valid, other=0)
        bit = (byte >> (offs_c % 8)[None, :]) & 1
        return tl.where(bit != 0, g, 0.0)

    _AUTOTUNE = _autotune(_TILES, _EXACT_FP32_TILES)

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
            b = tl.load(  # (M^T)[k, n] = M[n, k]
                m_ptr + offs_n[None, :] * stride_mr + kk[:, None] * stride_mc,
                mask=(kk[:, None] < d) & (offs_n[None, :] < d), other=0.0,
            )
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

    _TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    _DM_CHUNK_ALIGN = 128  # dM chunks hold a multiple of 128 rows (a multiple of every BLOCK_K)

    def _check_triton_dtype(x: torch.Tensor) -> None:
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(
                f"backend 'triton' supports x of dtype float32, bfloat16 or float16, got {x.dtype}; "
                "use backend 'torch' for other dtypes"
            )

    def _upcast(dtype: torch.dtype) -> bool:
        """The interpreter multiplies raw bf16 bit patterns in tl.dot: feed it fp32 there."""
        return dtype == torch.bfloat16 and triton_interpreting()

    def _dm_chunks(rows: int, d: int, device: torch.device) -> tuple[int, int]:
        """Split rows for dM into (n_chunks, chunk rows) so that d x d blocks times chunks fill the GPU.

        Aims at two programs per SM for 128 x 128 blocks (four programs under the interpreter, which
        exercises the split on small inputs); a chunk is a multiple of _DM_CHUNK_ALIGN rows.
        """
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        blocks = max(1, triton.cdiv(d, 128) ** 2)
        n_chunks = max(1, min(triton.cdiv(rows, _DM_CHUNK_ALIGN), triton.cdiv(target, blocks)))
        chunk = triton.cdiv(triton.cdiv(max(rows, 1), n_chunks), _DM_CHUNK_ALIGN) * _DM_CHUNK_ALIGN
        return max(1, triton.cdiv(rows, chunk)), chunk

    INT32_INDEXED = ("m_ptr",)  # pointers the kernels index with int32 offsets: M (d x d), d^2 < 2^31 checked below
    _INT32_LIMIT = 2 ** 31
    _MIN_BLOCK = 64  # the smallest BLOCK_M and BLOCK_N of any ISTA kernel's tiles

    def _check_launch(rows: int, d: int) -> None:
        """Raise before launching where the kernels' 32-bit arithmetic would not hold: offsets into M (d x d) are
        int32, so d^2 < 2^31 (d <= 46,340); the 1-D grids of (rows / 64) x (d / 64) tiles stay below 2^31 programs.
        Row offsets into x, dOut, dx, out and the mask are 64-bit, so tensors past 2^31 elements work."""
        if d * d >= _INT32_LIMIT:
            raise ValueError(f"backend 'triton' indexes the d x d dictionary matrix in int32: d must be at most 46340, "
                             f"got d = {d}")
        if triton.cdiv(rows, _MIN_BLOCK) * triton.cdiv(d, _MIN_BLOCK) >= _INT32_LIMIT:
            raise ValueError(f"backend 'triton' launches cdiv(rows, 64) * cdiv(d, 64) programs, which must stay below "
                             f"2^31; got rows = {rows}, d = {d}")

    def _tiles_grid(n_rows: int, n_cols: int, *more: int):
        """One program per (BLOCK_M, BLOCK_N) tile of an (n_rows, n_cols) output, times ``more``."""
        return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(n_cols, meta["BLOCK_N"]), *more)

    def _forward_triton(x, m, step_size, lambd):
        """x (rows, d), M (d, d) fp32 -> relu(x + eta x M - eta lambda) in x's dtype, packed mask (rows, ceil(d/8))."""
        _check_triton_dtype(x)
        rows, d = x.shape
        mc = m.to(x.dtype)
        out = torch.empty((rows, d), dtype=x.dtype, device=x.device)
        packed = torch.empty((rows, triton.cdiv(d, 8)), dtype=torch.uint8, device=x.device)
        if out.numel():
            _check_launch(rows, d)
            with device_guard(x):
                _ista_fwd_kernel[_tiles_grid(rows, d)](
                    x, mc, out, packed, rows, d, step_size, step_size * lambd, tuning_bucket(rows),
                    x.stride(0), x.stride(1), mc.stride(0), mc.stride(1), packed.stride(0),
                    UPCAST=_upcast(x.dtype), PRECISION=fp32_dot_precision(x),
                )
        return out, packed

    def _backward_triton(dout, x, m, packed_mask, step_size, need_dx, need_dm):
        """dx = G + eta G M^T (x's dtype) and dM = eta x^T G (fp32), G = dOut * mask; None where not needed."""
        _check_triton_dtype(x)
        rows, d = x.shape
        dout = dout.to(x.dtype)
        upcast, precision = _upcast(x.dtype), fp32_dot_precision(x)
        _check_launch(rows, d)
        dx = dm = None
        with device_guard(x):
            if need_dx:
                mc = m.to(x.dtype)
                dx = torch.empty((rows, d), dtype=x.dtype, device=x.device)
                if dx.numel():
                    _ista_dx_kernel[_tiles_grid(rows, d)](
                        dout, packed_mask, mc, dx, rows, d, step_size, tuning_bucket(rows),
                        dout.stride(0), dout.stride(1), packed_mask.stride(0), mc.stride(0), mc.stride(1),
                        UPCAST=upcast, PRECISION=precision,
                    )
            if need_dm:
                n_chunks, chunk = _dm_chunks(rows, d, x.device)
                part = torch.empty((n_chunks, d, d), dtype=m.dtype, device=x.device)
                if part.numel():  # rows = 0 still writes zeros
                    _ista_dm_kernel[_tiles_grid(d, d, n_chunks)](
                        x, dout, packed_mask, part, rows, d, chunk, step_size, tuning_bucket(rows),
                        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), packed_mask.stride(0),
                        UPCAST=upcast, PRECISION=precision,
                    )
                dm = part[0] if n_chunks == 1 else part.sum(dim=0)
        return dx, dm

    register_variant("ista_forward", "v1", _forward_triton)
    register_variant("ista_backward", "v1", _backward_triton)
    _FORWARD["triton"] = variant_launcher("ista_forward")
    _BACKWARD["triton"] = variant_launcher("ista_backward")
    _FORWARD[AUTO_TRITON] = with_fallback("ista_forward", _FORWARD["triton"], _forward_torch)
    _BACKWARD[AUTO_TRITON] = with_fallback("ista_backward", _BACKWARD["triton"], _backward_torch)

    # Every Triton kernel of this operator, and launcher calls that reach each one: what crate_kernels.ops.aot
    # compiles for GPU targets in CI (a kernel added here without a launch that reaches it fails there).
    TRITON_KERNELS = {"ista_fwd": _ista_fwd_kernel, "ista_dx": _ista_dx_kernel, "ista_dm": _ista_dm_kernel}

    def aot_launches(dtype: torch.dtype, head_dim: int) -> None:
        """Run the forward and both backward launchers on CPU tensors, d = 12 heads x head_dim, 2 images."""
        rows, d = 2 * 197, 12 * head_dim
        x = torch.randn(rows, d, dtype=dtype)
        m = torch.randn(d, d)
        _, packed = _forward_triton(x, m, 0.1, 0.5)
        _backward_triton(torch.randn_like(x), x, m, packed, 0.1, True, True)

    from . import triton_variants  # noqa: E402,F401  (registers the other variants; they use the helpers above)

    # backend "cuda": the Triton forward with the CUDA-extension backward (csrc/, built on first use)
    _FORWARD["cuda"] = _FORWARD["triton"]

    def _backward_cuda(dout, x, m, packed_mask, step_size, need_dx, need_dm):
        """The CUDA-extension backward (csrc/, imported and built on first use)."""
        from .. import cuda_ext

        return cuda_ext.ista_backward(dout, x, m, packed_mask, step_size, need_dx, need_dm)

    _BACKWARD["cuda"] = _backward_cuda


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


# FLOPs for torch.utils.flop_counter.FlopCounterMode (2 per multiply-add): x M forward; G M^T and x^T G backward,
# each only where asked for. M = W - W^T W and dW run as ordinary torch products, which the counter sees itself.
@register_flop_formula(torch.ops.crate_kernels.ista_forward)
def _ista_forward_flops(x_shape, m_shape, *args, out_shape=None, **kwargs) -> int:
    rows, d = x_shape
    return 2 * rows * d * m_shape[1]


@register_flop_formula(torch.ops.crate_kernels.ista_backward)
def _ista_backward_flops(dout_shape, x_shape, m_shape, mask_shape, step_size, need_dx, need_dm, *args,
                         out_shape=None, **kwargs) -> int:
    return (int(need_dx) + int(need_dm)) * _ista_forward_flops(x_shape, m_shape)


class ISTAFunction(torch.autograd.Function):
    """One ISTA step on 2-D x, optionally on LN(x); saves x, W, M and the bit-packed activation mask.

    With a LayerNorm (``norm_eps`` given) it saves LN's input and per-row statistics instead of LN's
    output and recomputes LN(x) in the backward pass; the product runs in ``compute_dtype``.
    """

    @staticmethod
    def forward(ctx, x, weight, step_size, lambd, backend, norm_weight=None, norm_bias=None, norm_eps=None,
                compute_dtype=None):
        m = dictionary_matrix(weight)
        stats = ()
        xn = x
        if norm_eps is not None:
            xn, mean, rstd = layer_norm_stats(x, norm_weight, norm_bias, norm_eps)
            xn, stats = xn.to(compute_dtype), (mean, rstd)
        out, packed_mask = ista_forward(xn, m, step_size, lambd, backend)
        ctx.save_for_backward(x, weight, m, packed_mask, norm_weight, norm_bias, *stats)
        ctx.step_size, ctx.backend, ctx.compute_dtype = step_size, backend, compute_dtype
        ctx.has_norm = norm_eps is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, m, packed_mask, norm_weight, norm_bias, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_x = needs[0] or (ctx.has_norm and (needs[5] or needs[6]))
        need_dw = needs[1]
        xn = x
        if ctx.has_norm:
            xn = layer_norm_recompute(x, norm_weight, norm_bias, *stats).to(ctx.compute_dtype)
        dxn, dm = ista_backward(dout, xn, m, packed_mask, ctx.step_size, need_x, need_dw, ctx.backend)
        dw = dictionary_grad(weight, dm) if need_dw else None
        if not need_x:
            return None, dw, None, None, None, None, None, None, None
        if not ctx.has_norm:
            return dxn, dw, None, None, None, None, None, None, None
        dx, dgamma, dbeta = layer_norm_backward(
            dxn, x, norm_weight, norm_bias, *stats,
            (needs[0], needs[5] and norm_weight is not None, needs[6] and norm_bias is not None),
        )
        return dx, dw, None, None, None, dgamma, dbeta, None, None


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
    x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.5, backend: str | None = None,
    norm: torch.nn.LayerNorm | None = None,
) -> torch.Tensor:
    """relu(z + step_size * (z W - z W^T W) - step_size * lambd) with z = norm(x) (or x) for x (..., d), W (d, d).

    With ``norm`` the fused backends keep x and LN's per-row statistics rather than norm(x) for backward.
    """
    _check_inputs(x, weight, step_size, lambd)
    name = resolve_backend(backend, x, _BACKENDS + tuple(_FORWARD))
    if name == "reference":
        return ista_reference(x if norm is None else norm(x), weight, step_size, lambd)
    if norm is None:
        x = autocast_input(x)  # under autocast the product runs in its dtype, as the release's F.linear calls do
        rows = x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()
        out = ISTAFunction.apply(rows, weight, float(step_size), float(lambd), name)
    else:
        rows = x.reshape(x.shape[:-1].numel(), x.shape[-1]).contiguous()
        out = ISTAFunction.apply(rows, weight, float(step_size), float(lambd), name,
                                 norm.weight, norm.bias, norm.eps, autocast_dtype(x))
    return out.view(x.shape)
