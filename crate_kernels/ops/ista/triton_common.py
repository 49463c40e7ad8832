"""What every ISTA Triton kernel module shares (triton_v1, triton_variants): autotuning spaces and their pruning,
dtype and launch checks, the grids and the row split of dM, and the ``@triton.jit`` steps more than one kernel runs.

x (rows, d) and dOut (rows, d) are read through their strides; M (d, d) is cast to x's dtype by the
launcher; dot products accumulate in fp32 (exact "ieee" for fp32 operands unless PyTorch allows TF32).
Each kernel owns a (BLOCK_M, BLOCK_N) output tile and loops over the contraction dimension in BLOCK_K
steps; every index is masked, so any d works (BLOCK_K >= 32 keeps tl.dot's K >= 16). The activation mask
travels as bits: the forward packs its (BLOCK_M, BLOCK_N) tile into (BLOCK_M, BLOCK_N / 8) bytes, the
backward unpacks bits while loading dOut, so G = dOut * mask never exists in memory.
Autotuning key: d, dot precision, operand dtype, and rows rounded up to a power of two (ROWS_BUCKET, unused
by the kernels); rows itself is not specialized on, so a last partial batch neither retunes nor recompiles
(nor does the mask's row stride, ceil(d / 8) bytes, so model widths share kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import config_pruning, fp32_dot_precision, triton_interpreting, tuning_bucket

_MAX_SHARED_MEMORY = 232448  # bytes a block may use on Hopper, the most of any GPU here


def _matmul_configs(tiles):
    """The ``tiles`` to autotune on a GPU; one config under the interpreter (autotuning cannot run there)."""
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


def tile_of(config) -> tuple:
    """A config's (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    return (*config.kwargs.values(), config.num_warps, config.num_stages)


def _prune_rule(tiles, exact_fp32_tiles):
    """Exact fp32 products: the FMA tiles. Otherwise the tensor-core ``tiles`` whose pipelined operand tiles
    (stages x (BLOCK_M + BLOCK_N) x BLOCK_K elements) fit in Hopper's shared memory; the first one kept also
    fits an A100's (crate_kernels.ops.aot checks both)."""

    def prune(configs, named_args, **kwargs):
        nbytes = next(iter(named_args.values())).element_size()  # every kernel's first argument is an operand
        if kwargs["PRECISION"] == "ieee" and nbytes == 4:
            return [c for c in configs if tile_of(c) in exact_fp32_tiles]
        return [
            c for c in configs if tile_of(c) in tiles
            and c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * nbytes
            <= _MAX_SHARED_MEMORY
        ]

    return prune


def autotune_args(tiles, exact_fp32_tiles) -> dict:
    """triton.autotune's arguments for ISTA's matrix-product kernels over these (BLOCK_M, BLOCK_N, BLOCK_K, warps,
    stages) tiles: tensor-core ``tiles`` and the FMA ``exact_fp32_tiles``."""
    return {"configs": _matmul_configs(tiles + exact_fp32_tiles), "key": ["ROWS_BUCKET", "d", "PRECISION"],
            "prune_configs_by": config_pruning(_prune_rule(tiles, exact_fp32_tiles))}


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_triton_dtype(x: torch.Tensor) -> None:
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"backend 'triton' supports x of dtype float32, bfloat16 or float16, got {x.dtype}; "
            "use backend 'torch' for other dtypes"
        )


def upcast(dtype: torch.dtype) -> bool:
    """The interpreter multiplies raw bf16 bit patterns in tl.dot: feed it fp32 there."""
    return dtype == torch.bfloat16 and triton_interpreting()


_DM_CHUNK_ALIGN = 128  # dM chunks hold a multiple of 128 rows (a multiple of every BLOCK_K)


def dm_chunks(rows: int, d: int, device: torch.device) -> tuple[int, int]:
    """Split rows for dM into (n_chunks, chunk rows) so that d x d blocks times chunks fill the GPU.

    Aims at two programs per SM for 128 x 128 blocks (four programs under the interpreter, which
    exercises the split on small inputs); a chunk is a multiple of _DM_CHUNK_ALIGN rows.
    """
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    blocks = max(1, triton.cdiv(d, 128) ** 2)
    n_chunks = max(1, min(triton.cdiv(rows, _DM_CHUNK_ALIGN), triton.cdiv(target, blocks)))
    chunk = triton.cdiv(triton.cdiv(max(rows, 1), n_chunks), _DM_CHUNK_ALIGN) * _DM_CHUNK_ALIGN
    return max(1, triton.cdiv(rows, chunk)), chunk


def launch_dm(kernel, dout, x, m, packed_mask, step_size):
    """dM = eta x^T G (M's dtype, fp32) from a dM kernel of v1's signature (v1's or a variant's): one partial
    product per row chunk (dm_chunks), each program writing its own block, then summed over the chunks."""
    rows, d = x.shape
    n_chunks, chunk = dm_chunks(rows, d, x.device)
    part = torch.empty((n_chunks, d, d), dtype=m.dtype, device=x.device)
    if part.numel():  # rows = 0 still writes zeros
        kernel[tiles_grid(d, d, n_chunks)](
            x, dout, packed_mask, part, rows, d, chunk, step_size, tuning_bucket(rows),
            x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), packed_mask.stride(0),
            UPCAST=upcast(x.dtype), PRECISION=fp32_dot_precision(x),
        )
    return part[0] if n_chunks == 1 else part.sum(dim=0)


_INT32_LIMIT = 2 ** 31
_MIN_BLOCK = 64  # the smallest BLOCK_M and BLOCK_N of any ISTA kernel's tiles


def check_launch(rows: int, d: int) -> None:
    """Raise before launching where the kernels' 32-bit arithmetic would not hold: offsets into M (d x d) are
    int32, so d^2 < 2^31 (d <= 46,340); the 1-D grids of (rows / 64) x (d / 64) tiles stay below 2^31 programs.
    Row offsets into x, dOut, dx, out and the mask are 64-bit, so tensors past 2^31 elements work."""
    if d * d >= _INT32_LIMIT:
        raise ValueError(f"backend 'triton' indexes the d x d dictionary matrix in int32: d must be at most 46340, "
                         f"got d = {d}")
    if triton.cdiv(rows, _MIN_BLOCK) * triton.cdiv(d, _MIN_BLOCK) >= _INT32_LIMIT:
        raise ValueError(f"backend 'triton' launches cdiv(rows, 64) * cdiv(d, 64) programs, which must stay below "
                         f"2^31; got rows = {rows}, d = {d}")


def tiles_grid(n_rows: int, n_cols: int, *more: int):
    """One program per (BLOCK_M, BLOCK_N) tile of an (n_rows, n_cols) output, times ``more``."""
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(n_cols, meta["BLOCK_N"]), *more)


@triton.jit
def load_mt(m_ptr, offs_k, offs_n, d, stride_mr, stride_mc):
    """The (K, N) tile of M^T at rows offs_k and columns offs_n: (M^T)[k, n] = M[n, k], zero outside (d, d)."""
    return tl.load(m_ptr + offs_n[None, :] * stride_mr + offs_k[:, None] * stride_mc,
                   mask=(offs_k[:, None] < d) & (offs_n[None, :] < d), other=0.0)
