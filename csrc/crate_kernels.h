/* Plain C launchers for the CRATE backward kernels (torch-free; see bindings.cpp for the torch side).
 *
 * Every launcher checks its arguments, enqueues its kernels on `stream` and returns the first CUDA error
 * (cudaErrorInvalidValue for arguments it rejects). Matrices are row-major with unit stride along the
 * last dimension; the other strides are in elements. Arithmetic is fp32 whatever the storage dtype.
 *
 * Kernels (ck_kernel); the tensor-core ones take fp16/bf16 on compute capability >= 8.0 only, and round
 * operands to the input dtype first: P and dS for MSSA (as the Triton kernel does), M for ISTA (as torch's
 * m.to(x.dtype) does):
 *   CK_KERNEL_FMA        fp32 FMA tiles (exact fp32 products, any dtype)
 *   CK_KERNEL_WMMA       nvcuda::wmma tiles with fp32 accumulation
 *   CK_KERNEL_MMA        ldmatrix + mma.sync m16n8k16 (fp32 accumulation) fed by cp.async; needs 16-byte
 *                        aligned rows (see each launcher). MSSA: one block per (batch, head) for N <= 256
 *                        where its shared memory fits the device, else the tiled form
 *   CK_KERNEL_MMA_TILED  MSSA only: the tiled mma form whatever N
 *   CK_KERNEL_AUTO       fp32 or compute capability < 8.0: fma; else mma where its alignment holds, else wmma
 */
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum ck_dtype { CK_FLOAT32 = 0, CK_FLOAT16 = 1, CK_BFLOAT16 = 2 } ck_dtype;

typedef enum ck_kernel {
  CK_KERNEL_AUTO = 0,
  CK_KERNEL_FMA = 1,
  CK_KERNEL_WMMA = 2,
  CK_KERNEL_MMA = 3,
  CK_KERNEL_MMA_TILED = 4
} ck_kernel;

/* Strides (in elements) of a (B, H, N, p) tensor along B, H and N; its stride along p must be 1. */
typedef struct ck_strides3 {
  int64_t b, h, n;
} ck_strides3;

/* Largest MSSA head dim the kernels take. */
#define CK_MSSA_MAX_HEAD_DIM 128

/* MSSA backward for every (batch, head) slice, w (N, p):
 *   P = exp(scale w w^T - lse),  delta = rowsum(dO * out),  dS = P * (dO w^T - delta)
 *   dw = scale (dS + dS^T) w + P^T dO
 * dout, w, out: (B, H, N, p) in `dtype`; lse: (B, H, N) fp32 contiguous; dw: (B, H, N, p) in `dtype`.
 * delta: workspace of B * H * N floats. Needs 1 <= p <= CK_MSSA_MAX_HEAD_DIM. The mma kernels need w, dout
 * and dw 16-byte aligned with strides along B, H and N (where that size exceeds 1) multiples of 8 elements. */
cudaError_t ck_mssa_backward(const void* dout, ck_strides3 dout_strides, const void* w, ck_strides3 w_strides,
                             const void* out, ck_strides3 out_strides, const float* lse, void* dw,
                             ck_strides3 dw_strides, float* delta, int64_t batch, int64_t heads, int64_t n,
                             int64_t p, float scale, ck_dtype dtype, ck_kernel kernel, cudaStream_t stream);

/* ISTA backward, with G = dout * mask (bit j of mask[r][k] is the mask of column 8k + j):
 *   dx = G + eta G M^T   (rows, d) in `dtype`
 *   dM = eta x^T G       (d, d) fp32
 * x, dout: (rows, d) in `dtype`; mask: (rows, ceil(d / 8)) uint8; m: (d, d) fp32; m_lowp: M rounded to `dtype`
 * (d, d), read by the mma kernel only (may be NULL otherwise). The mma kernels need d % 8 == 0, 16-byte aligned
 * rows of x, dout, dx and m_lowp (data pointer at a multiple of 16 bytes, row stride a multiple of 8 elements)
 * and 4-byte aligned rows of mask (pointer and row stride multiples of 4 bytes). */
cudaError_t ck_ista_backward_dx(const void* dout, int64_t dout_ld, const uint8_t* mask, int64_t mask_ld,
                                const float* m, int64_t m_ld, const void* m_lowp, int64_t m_lowp_ld, void* dx,
                                int64_t dx_ld, int64_t rows, int64_t d, float eta, ck_dtype dtype, ck_kernel kernel,
                                cudaStream_t stream);

/* How ck_ista_backward_dm splits the rows (the reduction dimension) on the current device for `kernel`:
 * `splits` chunks of `chunk` rows. With splits > 1 it needs a workspace of splits * d * d floats. */
cudaError_t ck_ista_dm_plan(int64_t rows, int64_t d, ck_kernel kernel, int64_t* splits, int64_t* chunk);

/* dm: (d, d) fp32 contiguous. Each chunk of rows sums into its own d x d slice of `partials` (ignored when
 * splits == 1), then one kernel adds the slices in a fixed order: race-free and deterministic. */
cudaError_t ck_ista_backward_dm(const void* x, int64_t x_ld, const void* dout, int64_t dout_ld, const uint8_t* mask,
                                int64_t mask_ld, float* dm, float* partials, int64_t splits, int64_t chunk,
                                int64_t rows, int64_t d, float eta, ck_dtype dtype, ck_kernel kernel,
                                cudaStream_t stream);

#ifdef __cplusplus
}
#endif
