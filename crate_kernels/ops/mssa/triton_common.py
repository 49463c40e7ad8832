"""What every MSSA Triton kernel module shares (triton_v1, triton_variants): the layout and limits of the launch,
the autotuning space's helpers, the compile-time parameters, and the ``@triton.jit`` steps more than one kernel runs.

Every kernel runs one program per (batch*head, block of BLOCK_M rows) on a flat 1-D grid (the persistent
"symmetric" backward: programs that loop over heads), row blocks of one head adjacent (they share that head's w in
L2). w, out, dout and dw are read and written through their strides, so the (B, N, H, p) -> (B, H, N, p) view of
the model needs no copy. Autotuning key (TUNING_KEY): N, head-dim block, dot precision, operand dtype, and
batch*heads rounded up to a power of two (BH_BUCKET, unused by the kernels and not specialized on), so that a last
partial batch reuses the tuned config and the compiled kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import config_pruning, fp32_dot_precision, triton_interpreting

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
TUNING_KEY = ["N", "BH_BUCKET", "BLOCK_D", "PRECISION"]

# Shared memory holds tiles of BLOCK_D elements per row: at 512 bytes a row (fp32 p = 128, bf16 p = 256) the
# backward's tiles above 64 x 32 no longer fit an A100 (163 KB), past it (fp32 p = 256, fp64 p = 128) only
# its smallest tile fits Hopper (227 KB). Pruning keeps the autotuner from compiling configs that cannot
# launch, and puts first a tile that fits both GPUs: what CRATE_KERNELS_AUTOTUNE=first runs, and what an
# autotuner that finds no config able to launch falls back to (crate_kernels.ops.aot checks both GPUs).
ROW_BYTES_LARGE = 512


def autotune_args(tiles, prune) -> dict:
    """triton.autotune's arguments for a kernel over these (BLOCK_M, BLOCK_N, warps, stages) ``tiles`` (their first
    config alone under the interpreter, which cannot tune), keyed by TUNING_KEY; the autotuner tries the configs
    that ``prune(configs, named_args, **kwargs)`` keeps."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in tiles
    ]
    return {"configs": configs[:1] if triton_interpreting() else configs, "key": TUNING_KEY,
            "prune_configs_by": config_pruning(prune)}


def tile_of(config) -> tuple:
    """A config's (BLOCK_M, BLOCK_N, warps, stages)."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def exact_fp32(named_args, kwargs) -> bool:
    """Exact fp32 products (they run on FMA units): the pruning gives them their own small tiles."""
    return kwargs["PRECISION"] == "ieee" and named_args["W"].element_size() == 4


def row_bytes(named_args, kwargs) -> int:
    """Bytes of one BLOCK_D row of a shared-memory tile."""
    return kwargs["BLOCK_D"] * named_args["W"].element_size()


_TRITON_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
               torch.float64: tl.float64}


def triton_meta(w: torch.Tensor) -> dict:
    """Compile-time parameters every kernel takes for w's dtype and head dim."""
    if w.dtype not in _TRITON_ACC:
        raise TypeError(f"backend 'triton' supports float16, bfloat16, float32 and float64 w, got {w.dtype}")
    block_d = max(16, triton.next_power_of_2(w.shape[-1]))
    if block_d > 256:
        raise ValueError(f"backend 'triton' supports head dims up to 256, got {w.shape[-1]}")
    return {
        "BLOCK_D": block_d,
        "ACC": _TRITON_ACC[w.dtype],
        "UPCAST": w.dtype == torch.bfloat16 and triton_interpreting(),
        "PRECISION": fp32_dot_precision(w),
    }


def head_grid(batch_heads: int, n: int):
    """The 1-D grid of cdiv(n, BLOCK_M) programs per (batch, head)."""
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * batch_heads,)


_INT32_LIMIT = 2 ** 31
_MIN_BLOCK_M = 16  # the smallest row block of any kernel's tiles


def check_launch(*tensors: torch.Tensor) -> None:
    """Raise before launching where the kernels' 32-bit arithmetic would not hold: the 1-D grid of at most
    cdiv(N, 16) programs per (batch, head) (grid x is limited to 2^31 - 1; batch * heads itself is not limited
    to 65,535), and element offsets within one head (row * stride_N + column * stride_p), which the kernels
    compute in int32; heads are reached with 64-bit offsets, so tensors past 2^31 elements work."""
    b, h, n, p = tensors[0].shape
    if triton.cdiv(n, _MIN_BLOCK_M) * b * h >= _INT32_LIMIT:
        raise ValueError(f"backend 'triton' launches cdiv(N, {_MIN_BLOCK_M}) * B * H programs, which must stay "
                         f"below 2^31; got B * H = {b * h}, N = {n}")
    for t in tensors:
        span = (n - 1) * abs(t.stride(2)) + (p - 1) * abs(t.stride(3))
        if span >= _INT32_LIMIT:
            raise ValueError(f"backend 'triton' computes offsets within one head in int32: (N - 1) * stride_N + "
                             f"(p - 1) * stride_p must stay below 2^31, got {span} for shape {tuple(t.shape)} "
                             f"and strides {t.stride()}")


@triton.jit
def head_rows(N, H, BLOCK_M: tl.constexpr):
    """This program's place on head_grid (cdiv(N, BLOCK_M) adjacent programs per head): its batch * head index bh,
    batch b and head h (int64: heads are reached with 64-bit offsets), and its first row."""
    num_m = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), (pid % num_m) * BLOCK_M


@triton.jit
def softmax_step(w_i, w_j, m_i, l_i, acc, qk_scale, cols, N,
                 MASK_COLS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: S = scale w_i w_j^T (log2 units), running max m_i and sum l_i,
    acc = acc * alpha + P w_j. Each w_j tile serves as key (S) and value (P w_j)."""
    s = tl.dot(w_i, tl.trans(w_j), input_precision=PRECISION, out_dtype=ACC) * qk_scale
    if MASK_COLS:
        s = tl.where((cols < N)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(w_j.dtype), w_j, acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
    return m_new, l_i, acc
