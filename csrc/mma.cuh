// Warp-level tensor-core primitives for sm_80+, as inline PTX: ldmatrix, mma.sync m16n8k16 (fp16/bf16
// operands, fp32 accumulation) and cp.async. host_emulation.h supplies the same functions, per lane, on the CPU.
//
// Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4, t = lane % 4;
// a register holds two 16-bit elements, the lower column (A, C) or row (B) in its low half:
//   A 16x16 row-major  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8  col-major  b0 (2t..2t+1, g)  b1 (2t+8.., g)
//   C 16x8  fp32       c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
// So the C fragments of two adjacent 8-column tiles, packed to pairs, are the A fragment of a 16-wide k step.
//
// ldmatrix.x4: lane l gives the address of row l % 8 of 8x8 matrix l / 8 (16 contiguous bytes, 16-byte
// aligned); register q of lane l receives elements (g, 2t..2t+1) of matrix q, or (2t..2t+1, g) with .trans.
#pragma once

#include "common.cuh"

namespace ck {

// Per-lane ldmatrix.x4 offsets (elements) from the corner of a 16 x 16 block of a tile of row stride LD;
// registers {0, 1} and {2, 3} of the B cases are the fragments of two 8-column tiles n0.. and n0 + 8..
//   rows16  lane -> (row lane % 16, column 8 (lane / 16)): the A fragment of a row-major [m][k] tile, or
//           with .trans B fragments of a row-major [k][n] tile
//   rows8   lane -> (row lane % 8 + 8 (lane / 16), column 8 (lane / 8 % 2)): B fragments of W^T for a
//           row-major [n][k] tile W, or with .trans the A fragment of X^T for a row-major [k][m] tile X
template <int LD>
__device__ __forceinline__ int rows16_offset(int lane) { return lane % 16 * LD + 8 * (lane / 16); }
template <int LD>
__device__ __forceinline__ int rows8_offset(int lane) { return (lane % 8 + 8 * (lane / 16)) * LD + 8 * (lane / 8 % 2); }

// Two floats rounded to T and packed into one fragment register (x in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(x, y);
    memcpy(&bits, &v, sizeof(bits));
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    memcpy(&bits, &v, sizeof(bits));
  }
  return bits;
}

// The A fragment of a 16-wide k step from the fp32 C fragments of two adjacent 8-column tiles, rounded to T.
template <typename T>
__device__ __forceinline__ void a_from_c(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

#ifndef CK_HOST_EMULATION
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

// d += a b for one 16x8x16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if CK_TENSOR_CORE_ARCH
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();
#endif
}

// BYTES (16 or 4) global -> shared, asynchronously; bytes past src_bytes (0..BYTES) are zero-filled and not read.
// 16-byte copies bypass L1 (.cg, which takes no other size), 4-byte copies go through L1 (.ca).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  static_assert(BYTES == 16 || BYTES == 4, "cp_async copies 16 or 4 bytes");
#if CK_TENSOR_CORE_ARCH
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if CK_TENSOR_CORE_ARCH
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if CK_TENSOR_CORE_ARCH
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif  // CK_HOST_EMULATION

// d0 += a b0, d1 += a b1: one 16x16x16 product as two m16n8k16, b the registers of an ldmatrix.x4 B load ({0, 1}
// and {2, 3}: the 8-column tiles n0.. and n0 + 8..).
template <typename T>
__device__ __forceinline__ void mma_16x16(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  mma_16816<T>(d0, a, b0);
  mma_16816<T>(d1, a, b1);
}

}  // namespace ck
