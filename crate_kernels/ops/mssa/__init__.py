"""MSSA: attention whose query, key and value are one shared projection w.

For every (batch, head) with w of shape (N, p):

    S = scale * w w^T            (N, N)
    P = softmax_rows(S)          lse = logsumexp_rows(S)
    out = P w                    (N, p)

Backward, in the shared-w form (q = k = v = w, so the three gradients are one):

    dP = dO w^T,  delta = rowsum(dO * out),  dS = P * (dP - delta)
    dw = scale * (dS + dS^T) w + P^T dO

The autograd.Function saves only w, out and one log-sum-exp per row; P is recomputed in the
backward pass. Every backend shares that Function; backends differ in the launchers below.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..backend import (
    AUTO_TRITON, accumulate_dtype, autocast_input, config_pruning, device_guard, fp32_dot_precision,
    register_variant, resolve_backend, triton_available, triton_interpreting, tuning_bucket, variant_launcher,
    with_fallback,
)

__all__ = ["mssa_attention", "mssa_reference", "MSSAFunction"]

_BACKENDS = ("reference", "torch")


def mssa_reference(w: torch.Tensor, scale: float) -> torch.Tensor:
    """The release's eager math: softmax(w w^T * scale) w, autograd through every intermediate."""
    dots = torch.matmul(w, w.transpose(-1, -2)) * scale
    return torch.matmul(dots.softmax(dim=-1), w)



# ----------------------------------------------------------------------------------------------
# torch launchers: the fused algorithm in plain PyTorch (the CPU path)
#
# On CPU they call PyTorch's own tiled flash-attention kernels with q = k = v = w (which never hold
# an N x N matrix; the three input gradients are summed into dw). Elsewhere, or where that op is
# missing, the matmul form below recomputes P from lse.
# ----------------------------------------------------------------------------------------------
def _forward_matmul(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    wc = w.to(accumulate_dtype(w.dtype))
    scores = torch.matmul(wc, wc.transpose(-1, -2)).mul_(scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse.unsqueeze(-1)).exp_()
    out = torch.matmul(probs, wc)
    return out.to(w.dtype), lse


def _backward_matmul(dout, w, out, lse, scale):
    ct = accumulate_dtype(w.dtype)
    wc, doc = w.to(ct), dout.to(ct)
    probs = torch.matmul(wc, wc.transpose(-1, -2)).mul_(scale).sub_(lse.unsqueeze(-1)).exp_()
    delta = (doc * out.to(ct)).sum(dim=-1, keepdim=True)
    dscores = torch.matmul(doc, wc.transpose(-1, -2)).sub_(delta).mul_(probs).mul_(scale)
    dw = torch.matmul(dscores + dscores.transpose(-1, -2), wc)
    dw.add_(torch.matmul(probs.transpose(-1, -2), doc))
    return dw.to(w.dtype)


_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _forward_torch(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _CPU_FLASH and w.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(w, w, w, 0.0, False, scale=scale)
        return out, lse.to(accumulate_dtype(w.dtype))  # lse comes (B, N, H)-strided; the op makes it contiguous
    return _forward_matmul(w, scale)


def _backward_torch(dout, w, out, lse, scale):
    if _CPU_FLASH and w.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, w, w, w, out, lse, 0.0, False, scale=scale
        )
        return dq.add_(dk).add_(dv)
    return _backward_matmul(dout, w, out, lse, scale)


_FORWARD = {"torch": _forward_torch}
_BACKWARD = {"torch": _backward_torch}


# ----------------------------------------------------------------------------------------------
# Triton kernels and launchers (CUDA, or the CPU interpreter under TRITON_INTERPRET=1)
#
# Both kernels run one program per (batch*head, block of BLOCK_M rows) on a flat 1-D grid, row
# blocks of one head adjacent (they share that head's w in L2). w, out, dout and dw are read and
# written through their strides, so the (B, N, H, p) -> (B, H, N, p) view of the model needs no copy.
# Autotuning key: N, head-dim block, dot precision, operand dtype, and batch*heads rounded up to a power of
# two (BH_BUCKET, unused by the kernels and not specialized on), so that a last partial batch reuses the
# tuned config and the compiled kernel.
# ----------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

    _LOG2E = tl.constexpr(1.4426950408889634)
    _LN2 = tl.constexpr(0.6931471805599453)

    # Tiles (BLOCK_M, BLOCK_N, warps, stages): tensor-core products (bf16, fp16, TF32, fp64), and exact fp32
    # products, which run on FMA units and spill registers (and take seconds to compile) with larger tiles.
    _FWD_TILES = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2), (32, 64, 4, 2))
    _FWD_EXACT_FP32_TILES = ((64, 32, 8, 2), (32, 32, 8, 2))
    _BWD_TILES = ((64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2),
                  (32, 32, 4, 2))
    _BWD_EXACT_FP32_TILES = ((32, 32, 8, 2),)

    def _configs(tiles):
        """The autotuning space on a GPU; its first config alone under the interpreter (which cannot tune)."""
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in tiles
        ]
        return configs[:1] if triton_interpreting() else configs

    def _tile(config) -> tuple:
        return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages

    # Shared memory holds tiles of BLOCK_D elements per row: at 512 bytes a row (fp32 p = 128, bf16 p = 256) the
    # backward's tiles above 64 x 32 no longer fit an A100 (163 KB), past it (fp32 p = 256, fp64 p = 128) only
    # its smallest tile fits Hopper (227 KB). Pruning keeps the autotuner from compiling configs that cannot
    # launch, and puts first a tile that fits both GPUs: what CRATE_KERNELS_AUTOTUNE=first runs, and what an
    # autotuner that finds no config able to launch falls back to (crate_kernels.ops.aot checks both GPUs).
    _ROW_BYTES_LARGE = 512

    def _exact_fp32(named_args, kwargs) -> bool:
        return kwargs["PRECISION"] == "ieee" and named_args["W"].element_size() == 4

    def _row_bytes(named_args, kwargs) -> int:
        return kwargs["BLOCK_D"] * named_args["W"].element_size()

    def _prune_fwd(configs, named_args, **kwargs):
        if _exact_fp32(named_args, kwargs):
            return [c for c in configs if _tile(c) in _FWD_EXACT_FP32_TILES]
        max_block_m = 64 if _row_bytes(named_args, kwargs) > _ROW_BYTES_LARGE else 128
        return [c for c in configs if _tile(c) in _FWD_TILES and c.kwargs["BLOCK_M"] <= max_block_m]

    def _prune_bwd(configs, named_args, **kwargs):
        if _exact_fp32(named_args, kwargs):
            return [c for c in configs if _tile(c) in _BWD_EXACT_FP32_TILES]
        row_bytes = _row_bytes(named_args, kwargs)
        min_area, max_area = 32 * 32 + 1, 64 * 64  # every tile but the 32 x 32 fallback
        if row_bytes == _ROW_BYTES_LARGE:
            min_area, max_area = 0, 64 * 32
        elif row_bytes > _ROW_BYTES_LARGE:
            min_area, max_area = 0, 32 * 32
        return [c for c in configs if _tile(c) in _BWD_TILES
                and min_area <= c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_area]

    @triton.autotune(
        configs=_configs(_FWD_TILES + _FWD_EXACT_FP32_TILES),
        key=["N", "BH_BUCKET", "BLOCK_D", "PRECISION"],
        prune_configs_by=config_pruning(_prune_fwd),
    )
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
        num_m = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        bh = pid // num_m
        offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_md = (offs_m < N)[:, None] & mask_d[None, :]
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        w_head = W + b * stride_wb + h * stride_wh

        w_i = tl.load(w_head + offs_m[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask_md, other=0.0)
        if UPCAST:
            w_i = w_i.to(ACC)
        qk_scale = scale * _LOG2E  # scores in log2 units, so exp(x) becomes exp2
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
            s = tl.dot(w_i, tl.trans(w_j), input_precision=PRECISION, out_dtype=ACC) * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(w_j.dtype), w_j, acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
            m_i = m_new

        out_head = Out + b * stride_ob + h * stride_oh
        tl.store(out_head + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                 (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=mask_md)
        tl.store(Lse + bh.to(tl.int64) * N + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=offs_m < N)

    @triton.autotune(
        configs=_configs(_BWD_TILES + _BWD_EXACT_FP32_TILES),
        key=["N", "BH_BUCKET", "BLOCK_D", "PRECISION"],
        prune_configs_by=config_pruning(_prune_bwd),
    )
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
        num_m = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        bh = pid // num_m
        offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_m = offs_m < N
        mask_md = mask_m[:, None] & mask_d[None, :]
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        w_head = W + b * stride_wb + h * stride_wh
        o_head = Out + b * stride_ob + h * stride_oh
        g_head = DOut + b * stride_gb + h * stride_gh
        lse_head = Lse + bh.to(tl.int64) * N

        w_i = tl.load(w_head + offs_m[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask_md, other=0.0)
        g_i = tl.load(g_head + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd, mask=mask_md, other=0.0)
        o_i = tl.load(o_head + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask_md, other=0.0)
        if UPCAST:
            w_i = w_i.to(ACC)
            g_i = g_i.to(ACC)
        delta_i = tl.sum(g_i.to(ACC) * o_i.to(ACC), 1)
        lse_i = tl.load(lse_head + offs_m, mask=mask_m, other=0.0) * _LOG2E
        qk_scale = scale * _LOG2E
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            mask_n = cols < N
            mask_nd = mask_n[:, None] & mask_d[None, :]
            w_j = tl.load(w_head + cols[:, None] * stride_wn + offs_d[None, :] * stride_wd, mask=mask_nd, other=0.0)
            g_j = tl.load(g_head + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd, mask=mask_nd, other=0.0)
            o_j = tl.load(o_head + cols[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask_nd, other=0.0)
            if UPCAST:
                w_j = w_j.to(ACC)
                g_j = g_j.to(ACC)
            delta_j = tl.sum(g_j.to(ACC) * o_j.to(ACC), 1)
            lse_j = tl.load(lse_head + cols, mask=mask_n, other=0.0) * _LOG2E

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

    _TRITON_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
                   torch.float64: tl.float64}

    def _triton_meta(w: torch.Tensor) -> dict:
        """Compile-time parameters shared by both kernels for w's dtype and head dim."""
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

    def _grid(batch_heads: int, n: int):
        return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * batch_heads,)

    _INT32_LIMIT = 2 ** 31
    _MIN_BLOCK_M = 16  # the smallest row block of any kernel's tiles

    def _check_launch(*tensors: torch.Tensor) -> None:
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

    def _forward_triton(w: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """w (B, H, N, p), any strides -> out (w's dtype and layout), lse (B, H, N) fp32 (fp64 for fp64 w).

        fp32 products are exact ("ieee") unless torch.set_float32_matmul_precision allows TF32."""
        meta = _triton_meta(w)
        b, h, n, p = w.shape
        out = torch.empty_like(w)
        lse = torch.empty((b, h, n), dtype=accumulate_dtype(w.dtype), device=w.device)
        if out.numel():
            _check_launch(w, out)
            with device_guard(w):
                _mssa_fwd_kernel[_grid(b * h, n)](
                    w, out, lse, *w.stride(), *out.stride(), h, n, p, scale, tuning_bucket(b * h), **meta
                )
        return out, lse

    def _backward_triton(dout, w, out, lse, scale):
        """dw (w's dtype and layout) from dout, w, out (any strides) and lse (B, H, N) contiguous."""
        meta = _triton_meta(w)
        b, h, n, p = w.shape
        dout, out = dout.to(w.dtype), out.to(w.dtype)  # the kernel's products take one operand dtype
        dw = torch.empty_like(w)
        if dw.numel():
            _check_launch(w, out, dout, dw)
            with device_guard(w):
                _mssa_bwd_kernel[_grid(b * h, n)](
                    w, out, dout, lse.contiguous(), dw,
                    *w.stride(), *out.stride(), *dout.stride(), *dw.stride(), h, n, p, scale, tuning_bucket(b * h),
                    **meta,
                )
        return dw

    register_variant("mssa_forward", "v1", _forward_triton)
    register_variant("mssa_backward", "v1", _backward_triton)
    _FORWARD["triton"] = variant_launcher("mssa_forward")
    _BACKWARD["triton"] = variant_launcher("mssa_backward")
    _FORWARD[AUTO_TRITON] = with_fallback("mssa_forward", _FORWARD["triton"], _forward_torch)
    _BACKWARD[AUTO_TRITON] = with_fallback("mssa_backward", _BACKWARD["triton"], _backward_torch)

    # Every Triton kernel of this operator, and launcher calls that reach each one: what crate_kernels.ops.aot
    # compiles for GPU targets in CI (a kernel added here without a launch that reaches it fails there).
    TRITON_KERNELS = {"mssa_fwd": _mssa_fwd_kernel, "mssa_bwd": _mssa_bwd_kernel}

    def aot_launches(dtype: torch.dtype, head_dim: int) -> None:
        """Run both launchers on CPU tensors in the model's (B, N, H, p) -> (B, H, N, p) layout."""
        b, n, h = 2, 197, 12
        w = torch.randn(b, n, h, head_dim, dtype=dtype).transpose(1, 2)
        out, lse = _forward_triton(w, head_dim ** -0.5)
        _backward_triton(torch.randn_like(w), w, out, lse, head_dim ** -0.5)

    from . import triton_variants  # noqa: E402,F401  (registers the other variants; they use the helpers above)

    # backend "cuda": the Triton forward with the CUDA-extension backward (csrc/, built on first use)
    _FORWARD["cuda"] = _FORWARD["triton"]

    def _backward_cuda(dout, w, out, lse, scale):
        """The CUDA-extension backward (csrc/, imported and built on first use)."""
        from .. import cuda_ext

        return cuda_ext.mssa_backward(dout, w, out, lse, scale)

    _BACKWARD["cuda"] = _backward_cuda


# ----------------------------------------------------------------------------------------------
# torch.library registration: torch.compile sees each launcher as one opaque op
# ----------------------------------------------------------------------------------------------
def _layout_of(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with w's strides (what the fake kernels promise torch.compile); a copy only where they differ."""
    return t if t.stride() == w.stride() else torch.empty_like(w).copy_(t)


@torch.library.custom_op("crate_kernels::mssa_forward", mutates_args=())
def mssa_forward(w: torch.Tensor, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w (B, H, N, p) -> out in w's dtype and layout, lse (B, H, N) contiguous fp32 (fp64 for fp64 w)."""
    out, lse = _FORWARD[backend](w, scale)
    return _layout_of(w, out), lse.contiguous()


@mssa_forward.register_fake
def _(w, scale, backend):
    return torch.empty_like(w), w.new_empty(w.shape[:-1], dtype=accumulate_dtype(w.dtype))


@torch.library.custom_op("crate_kernels::mssa_backward", mutates_args=())
def mssa_backward(
    dout: torch.Tensor, w: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str
) -> torch.Tensor:
    """Gradient of out = softmax(scale w w^T) w with respect to w (in w's layout), recomputing P from lse."""
    return _layout_of(w, _BACKWARD[backend](dout, w, out, lse, scale))


@mssa_backward.register_fake
def _(dout, w, out, lse, scale, backend):
    return torch.empty_like(w)


# FLOPs for torch.utils.flop_counter.FlopCounterMode, counted as it counts the reference's products (2 per
# multiply-add): S = w w^T and P w forward; dP, P^T dO and the two products of dS with w backward. Work that
# a backend repeats (recomputing S) is not model work and is not counted, so every backend reports the same.
@register_flop_formula(torch.ops.crate_kernels.mssa_forward)
def _mssa_forward_flops(w_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, n, p = w_shape
    return 4 * torch.Size(batch).numel() * n * n * p


@register_flop_formula(torch.ops.crate_kernels.mssa_backward)
def _mssa_backward_flops(dout_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _mssa_forward_flops(w_shape)


class MSSAFunction(torch.autograd.Function):
    """Shared-projection attention; saves w, out and lse (no N x N tensor) for every backend."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
        out, lse = mssa_forward(w, scale, backend)
        ctx.save_for_backward(w, out, lse)
        ctx.scale, ctx.backend = scale, backend
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        w, out, lse = ctx.saved_tensors
        dw = mssa_backward(dout, w, out, lse, ctx.scale, ctx.backend)
        return dw, None, None


def _check_inputs(w: torch.Tensor, scale) -> float:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 4:
        raise ValueError(f"w must have shape (B, H, N, p) (4 dimensions), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    if w.shape[-1] == 0 or w.shape[-2] == 0:
        raise ValueError(f"w must have N >= 1 tokens and head dim p >= 1, got shape {tuple(w.shape)}")
    scale = w.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    return scale


def mssa_attention(w: torch.Tensor, scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """softmax(w w^T * scale) w per (batch, head); w is (B, H, N, p), scale defaults to p ** -0.5."""
    scale = _check_inputs(w, scale)
    name = resolve_backend(backend, w, _BACKENDS + tuple(_FORWARD))
    if name == "reference":
        return mssa_reference(w, scale)
    w = autocast_input(w)
    if name == "torch" and w.stride(-1) != 1:
        w = w.contiguous()  # PyTorch's kernels want unit stride in p; the Triton and CUDA kernels read strides
    return MSSAFunction.apply(w, scale, name)
