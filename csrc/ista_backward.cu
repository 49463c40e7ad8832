// ISTA backward, with G = dOut * mask (the activation mask unpacked from bits while loading dOut):
//
//   dx = G + eta G M^T    (rows, d),  one block per 64 x 64 tile of dx, reduction over d
//   dM = eta x^T G        (d, d),     one block per (64 x 64 tile of dM, chunk of rows); chunk s sums
//                                     into its own slice, one more kernel adds the slices in order
//
// Both are C[m][n] = sum_k A(m, k) B(k, n) over shared-memory tiles:
//   dx  A(m, k) = G[m][k],   B(k, n) = M[n][k]
//   dM  A(i, r) = x[r][i],   B(r, j) = G[r][j]
// Everything outside (rows, d) is zero-filled and never stored. Variants (ck_kernel):
//   fma   fp32 tiles filled with the thread index running along the contiguous global dimension, each of
//         256 threads owns a 4 x 4 block of C (float4 reads); any dtype
//   wmma  fp16/bf16 tiles on tensor cores (16x16x16, fp32 accumulation), 4 warps of 32 x 32;
//         M is rounded to the input dtype, as torch's m.to(x.dtype) does
//   mma   fp16/bf16, ldmatrix + mma.sync m16n8k16 on 128 x 128 tiles, cp.async pipeline (below); M comes
//         already rounded to the input dtype
#include <mma.h>

#include "common.cuh"
#include "mma.cuh"

namespace ck {
namespace {

constexpr int kTile = 64;         // BM = BN of both variants
constexpr int kChunkAlign = 64;   // rows per dM chunk are a multiple of this, hence of both BKs

template <typename T>
struct IstaParams {
  const T* x;
  int64_t x_ld;
  const T* dout;
  int64_t g_ld;
  const uint8_t* mask;
  int64_t mask_ld;
  const float* m;
  int64_t m_ld;
  const T* m_lowp;  // M in T (mma only)
  int64_t m_lowp_ld;
  T* dx;
  int64_t dx_ld;
  float* dm_out;  // dM (one chunk) or the (splits, d, d) partial sums
  int64_t rows, chunk;
  int d;
  float eta;
};

enum class Op { kDx, kDm };

// G[r][c] = dOut[r][c] if bit c % 8 of mask[r][c / 8] is set, else 0; 0 outside (rows, d).
template <typename T>
__device__ __forceinline__ float load_g(const IstaParams<T>& p, int64_t r, int64_t c) {
  if (r >= p.rows || c >= p.d) return 0.f;
  const unsigned byte = p.mask[r * p.mask_ld + (c >> 3)];
  return (byte >> (c & 7)) & 1u ? to_f32(p.dout[r * p.g_ld + c]) : 0.f;
}

// Output tile origin (m0, n0) and reduction range [k_begin, k_end) of this block.
struct TileRange {
  int64_t m0, n0, k_begin, k_end;
};

template <Op OP, int TILE = kTile, typename T>
__device__ __forceinline__ TileRange tile_range(const IstaParams<T>& p) {
  const int64_t n_tiles = cdiv(p.d, TILE);
  const int64_t m0 = blockIdx.x / n_tiles * TILE, n0 = blockIdx.x % n_tiles * TILE;
  if constexpr (OP == Op::kDx) {
    return {m0, n0, 0, p.d};
  } else {
    const int64_t k_begin = blockIdx.y * p.chunk;
    return {m0, n0, k_begin, k_begin + p.chunk < p.rows ? k_begin + p.chunk : p.rows};
  }
}

// Fills the A and B tiles of reduction step k0 for either layout: A(m, k) goes to a_tile(m, k) and
// B(k, n) to b_tile(k, n), given as element offsets (row-major A for wmma, k-major A for fma).
template <Op OP, int BK, int LDA, bool A_KMAJOR, int LDB, typename S, typename T>
__device__ __forceinline__ void fill_ab(S* sa, S* sb, const IstaParams<T>& p, const TileRange& t, int64_t k0) {
  const int64_t k_end = t.k_end;
  if constexpr (OP == Op::kDx) {
    // A(m, k) = G[m0 + m][k0 + k]: contiguous along k.
    const auto a = [&](int m, int k) { return k0 + k < k_end ? load_g(p, t.m0 + m, k0 + k) : 0.f; };
    if constexpr (A_KMAJOR) {
      fill_tile<BK, kTile, LDA, true>(sa, [&](int k, int m) { return a(m, k); });
    } else {
      fill_tile<kTile, BK, LDA, false>(sa, a);
    }
    // B(k, n) = M[n0 + n][k0 + k]: contiguous along k.
    fill_tile<BK, kTile, LDB, true>(sb, [&](int k, int n) {
      const int64_t row = t.n0 + n, col = k0 + k;
      return row < p.d && col < p.d ? p.m[row * p.m_ld + col] : 0.f;
    });
  } else {
    // A(i, r) = x[k0 + r][m0 + i]: contiguous along i.
    const auto a = [&](int i, int r) {
      const int64_t row = k0 + r, col = t.m0 + i;
      return row < k_end && col < p.d ? to_f32(p.x[row * p.x_ld + col]) : 0.f;
    };
    if constexpr (A_KMAJOR) {
      fill_tile<BK, kTile, LDA, false>(sa, [&](int r, int i) { return a(i, r); });
    } else {
      fill_tile<kTile, BK, LDA, true>(sa, a);
    }
    // B(r, j) = G[k0 + r][n0 + j]: contiguous along j.
    fill_tile<BK, kTile, LDB, false>(sb, [&](int r, int j) {
      return k0 + r < k_end ? load_g(p, k0 + r, t.n0 + j) : 0.f;
    });
  }
}

// dx[r][c] = G[r][c] + eta acc, or dM slice[i][j] = eta acc; bounds-checked.
template <Op OP, typename T>
__device__ __forceinline__ void store_c(const IstaParams<T>& p, int64_t r, int64_t c, float acc) {
  if constexpr (OP == Op::kDx) {
    if (r < p.rows && c < p.d) p.dx[r * p.dx_ld + c] = from_f32<T>(load_g(p, r, c) + p.eta * acc);
  } else {
    if (r < p.d && c < p.d) p.dm_out[blockIdx.y * static_cast<int64_t>(p.d) * p.d + r * p.d + c] = p.eta * acc;
  }
}

// fma: BK = 16; A k-major sa[k][m], B sb[k][n], row stride 68 floats (16-byte aligned rows).
// Thread (ty, tx) = (tid / 16, tid % 16) owns C rows 4 ty..4 ty+3, columns 4 tx..4 tx+3.
template <typename T, Op OP>
__global__ void __launch_bounds__(256) ista_fma_kernel(IstaParams<T> p) {
  constexpr int BK = 16, LD = kTile + 4;
  __shared__ __align__(16) float sa[BK * LD];
  __shared__ __align__(16) float sb[BK * LD];
  const TileRange t = tile_range<OP>(p);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  float acc[4][4] = {};
  for (int64_t k0 = t.k_begin; k0 < t.k_end; k0 += BK) {
    __syncthreads();  // previous step's tiles are consumed
    fill_ab<OP, BK, LD, true, LD>(sa, sb, p, t, k0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(sa + k * LD + 4 * ty);
      const float4 b = *reinterpret_cast<const float4*>(sb + k * LD + 4 * tx);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) store_c<OP>(p, t.m0 + 4 * ty + i, t.n0 + 4 * tx + j, acc[i][j]);
}

// wmma: BK = 32; A row-major sa[m][k] (stride 40), B sb[k][n] (stride 72), C staged in fp32 sc[m][n]
// (stride 68) for the bounds-checked epilogue. Warp (wm, wn) = (warp / 2, warp % 2) owns C rows 32 wm..,
// columns 32 wn.. as 2 x 2 fragments.
template <typename T, Op OP>
__global__ void __launch_bounds__(128) ista_wmma_kernel(IstaParams<T> p) {
#if CK_TENSOR_CORE_ARCH
  namespace wmma = nvcuda::wmma;
  constexpr int BK = 32, LDA = BK + 8, LDB = kTile + 8, LDC = kTile + 4;
  __shared__ __align__(128) T sa[kTile * LDA];
  __shared__ __align__(128) T sb[BK * LDB];
  __shared__ __align__(128) float sc[kTile * LDC];
  const TileRange t = tile_range<OP>(p);
  const int warp = threadIdx.x / 32, wm = 32 * (warp / 2), wn = 32 * (warp % 2);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = t.k_begin; k0 < t.k_end; k0 += BK) {
    __syncthreads();  // previous step's tiles are consumed
    fill_ab<OP, BK, LDA, false, LDB>(sa, sb, p, t, k0);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], sa + (wm + 16 * i) * LDA + k, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], sb + k * LDB + wn + 16 * j, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sc + (wm + 16 * i) * LDC + wn + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
    const int r = idx / kTile, c = idx % kTile;
    store_c<OP>(p, t.m0 + r, t.n0 + c, sc[r * LDC + c]);
  }
#else
  __trap();
#endif
}

// mma: 128 x 128 tiles of C, BK = 32, 4 warps of 64 x 64 (warp (wm, wn) = (warp / 2, warp % 2)) holding 4 x 8
// C fragments, a 3-stage cp.async pipeline of the A, B and mask tiles (one group per k step). dOut reaches
// shared memory unmasked; each lane zeroes the elements of its G fragments whose mask bit is clear. Needs
// 16-byte aligned rows of x, dOut, dx and M (as T), 4-byte aligned mask rows, and d % 8 == 0.
//   dx  A = dOut tile [128 m][BK + 8] (ldmatrix, masked), B[k][n] = M[n][k]: tile [128 n][BK + 8] (ldmatrix)
//   dM  A[i][r] = x[r][i]: tile [BK r][128 + 8] (ldmatrix.trans), B = dOut tile [BK r][128 + 8]
//       (ldmatrix.trans, masked)
//   mask tiles: dx [128 rows][4 bytes] (columns k0..k0+31), dM [BK rows][16 bytes] (columns n0..n0+127)
constexpr int kMmaTile = 128, kMmaBK = 32, kMmaStages = 3;

template <typename T, Op OP>
struct IstaMmaLayout {
  static constexpr int LDA = OP == Op::kDx ? kMmaBK + 8 : kMmaTile + 8;  // A and B tiles alike
  static constexpr int A_ROWS = OP == Op::kDx ? kMmaTile : kMmaBK;
  static constexpr size_t kOperand = sizeof(T) * A_ROWS * LDA;           // a multiple of 128 bytes
  static constexpr size_t kMask = 512;                                   // 128 x 4 or 32 x 16 bytes
  static constexpr size_t kStage = 2 * kOperand + kMask;
  static constexpr size_t kBytes = kMmaStages * kStage;
  static_assert(kOperand % 128 == 0, "operand tiles keep 128-byte alignment");
};

// Lane mask of a fragment register from 2 mask bits (bit 0: low element, bit 1: high element).
__device__ __forceinline__ uint32_t lane_mask(uint32_t bits) {
  return (bits & 1u) * 0x0000FFFFu | (bits >> 1 & 1u) * 0xFFFF0000u;
}

// Issues the cp.async copies of k step k0 into one stage.
template <typename T, Op OP>
__device__ __forceinline__ void ista_stage_async(unsigned char* stage, const IstaParams<T>& p, const TileRange& t,
                                                 int64_t k0) {
  using L = IstaMmaLayout<T, OP>;
  T* sa = reinterpret_cast<T*>(stage);
  T* sb = reinterpret_cast<T*>(stage + L::kOperand);
  unsigned char* sm = stage + 2 * L::kOperand;
  const int mask_cols = static_cast<int>(cdiv(p.d, 8));
  if constexpr (OP == Op::kDx) {
    // A: dOut[m0 + r][k0 + c]; B: M[n0 + r][k0 + c]; 128 rows x 4 chunks of 8 each.
    for (int idx = threadIdx.x; idx < kMmaTile * (kMmaBK / 8); idx += blockDim.x) {
      const int r = idx / (kMmaBK / 8), c = idx % (kMmaBK / 8) * 8;
      const int64_t col = k0 + c, row_a = t.m0 + r, row_b = t.n0 + r;
      const int ea = row_a < p.rows ? clamp(static_cast<int>(p.d - col), 0, 8) : 0;
      const int eb = row_b < p.d ? clamp(static_cast<int>(p.d - col), 0, 8) : 0;
      cp_async<16>(sa + r * L::LDA + c, ea ? p.dout + row_a * p.g_ld + col : p.dout, ea * static_cast<int>(sizeof(T)));
      cp_async<16>(sb + r * L::LDA + c, eb ? p.m_lowp + row_b * p.m_lowp_ld + col : p.m_lowp,
                  eb * static_cast<int>(sizeof(T)));
    }
    for (int r = threadIdx.x; r < kMmaTile; r += blockDim.x) {  // bytes k0/8..k0/8+3 of row m0 + r
      const int64_t row = t.m0 + r, byte = k0 / 8;
      const int bytes = row < p.rows ? clamp(static_cast<int>(mask_cols - byte), 0, 4) : 0;
      cp_async<4>(sm + 4 * r, bytes ? p.mask + row * p.mask_ld + byte : p.mask, bytes);
    }
  } else {
    // A: x[k0 + r][m0 + c]; B: dOut[k0 + r][n0 + c]; BK rows x 16 chunks of 8 each.
    for (int idx = threadIdx.x; idx < kMmaBK * (kMmaTile / 8); idx += blockDim.x) {
      const int r = idx / (kMmaTile / 8), c = idx % (kMmaTile / 8) * 8;
      const int64_t row = k0 + r, col_a = t.m0 + c, col_b = t.n0 + c;
      const bool row_ok = row < t.k_end;
      const int ea = row_ok ? clamp(static_cast<int>(p.d - col_a), 0, 8) : 0;
      const int eb = row_ok ? clamp(static_cast<int>(p.d - col_b), 0, 8) : 0;
      cp_async<16>(sa + r * L::LDA + c, ea ? p.x + row * p.x_ld + col_a : p.x, ea * static_cast<int>(sizeof(T)));
      cp_async<16>(sb + r * L::LDA + c, eb ? p.dout + row * p.g_ld + col_b : p.dout, eb * static_cast<int>(sizeof(T)));
    }
    for (int idx = threadIdx.x; idx < kMmaBK * 4; idx += blockDim.x) {  // bytes n0/8.. of row k0 + r, 4 at a time
      const int r = idx / 4, q = idx % 4;
      const int64_t row = k0 + r, byte = t.n0 / 8 + 4 * q;
      const int bytes = row < t.k_end ? clamp(static_cast<int>(mask_cols - byte), 0, 4) : 0;
      cp_async<4>(sm + 16 * r + 4 * q, bytes ? p.mask + row * p.mask_ld + byte : p.mask, bytes);
    }
  }
}

// acc += A B over one stage (BK = 32: two k16 steps) for this warp's 64 x 64 block of C.
template <typename T, Op OP>
__device__ __forceinline__ void ista_stage_mma(float (&acc)[4][8][4], const unsigned char* stage, int wm, int wn,
                                               int lane) {
  using L = IstaMmaLayout<T, OP>;
  constexpr int LD = L::LDA;
  const T* sa = reinterpret_cast<const T*>(stage);
  const T* sb = reinterpret_cast<const T*>(stage + L::kOperand);
  const unsigned char* sm = stage + 2 * L::kOperand;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int kb = 0; kb < kMmaBK / 16; ++kb) {
    uint32_t a[4][4], b[8][2];
    if constexpr (OP == Op::kDx) {
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int r = wm + 16 * mt;
        ldsm_x4(a[mt], sa + r * LD + rows16_offset<LD>(lane) + 16 * kb);
        // Rows r + g, r + g + 8, columns 16 kb + 2t.. (byte 2 kb) and 16 kb + 8 + 2t.. (byte 2 kb + 1).
        const uint32_t lo = reinterpret_cast<const uint32_t*>(sm)[r + g] >> (16 * kb + 2 * t);
        const uint32_t hi = reinterpret_cast<const uint32_t*>(sm)[r + g + 8] >> (16 * kb + 2 * t);
        a[mt][0] &= lane_mask(lo);
        a[mt][1] &= lane_mask(hi);
        a[mt][2] &= lane_mask(lo >> 8);
        a[mt][3] &= lane_mask(hi >> 8);
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t v[4];
        ldsm_x4(v, sb + (wn + 16 * np) * LD + rows8_offset<LD>(lane) + 16 * kb);
        b[2 * np][0] = v[0];
        b[2 * np][1] = v[1];
        b[2 * np + 1][0] = v[2];
        b[2 * np + 1][1] = v[3];
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) ldsm_x4_trans(a[mt], sa + 16 * kb * LD + rows8_offset<LD>(lane) + wm + 16 * mt);
      // Rows 16 kb + 2t, +1, +8, +9 of the tile; bytes wn / 8 + nt (column wn + 8 nt + g: bit g).
      uint2 rows[4];
#pragma unroll
      for (int q = 0; q < 4; ++q)
        rows[q] = *reinterpret_cast<const uint2*>(sm + 16 * (16 * kb + 2 * t + (q % 2) + 8 * (q / 2)) + wn / 8);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t v[4];
        ldsm_x4_trans(v, sb + 16 * kb * LD + rows16_offset<LD>(lane) + wn + 16 * np);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int nt = 2 * np + h, shift = 8 * (nt % 4) + g;
          const auto bit = [&](int q) { return (nt < 4 ? rows[q].x : rows[q].y) >> shift & 1u; };
          b[nt][0] = v[2 * h] & lane_mask(bit(0) | bit(1) << 1);
          b[nt][1] = v[2 * h + 1] & lane_mask(bit(2) | bit(3) << 1);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mma_16816<T>(acc[mt][nt], a[mt], b[nt]);
  }
}

template <typename T, Op OP>
__global__ void __launch_bounds__(128) ista_mma_kernel(IstaParams<T> p) {
#if CK_TENSOR_CORE_ARCH
  using L = IstaMmaLayout<T, OP>;
  unsigned char* smem = dynamic_smem();
  const TileRange t = tile_range<OP, kMmaTile>(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = 64 * (warp / 2), wn = 64 * (warp % 2);
  const int64_t steps = cdiv(t.k_end - t.k_begin, kMmaBK);

  // One group per k step; the groups of steps past the end are empty, so the waits count alike.
#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < steps) ista_stage_async<T, OP>(smem + s * L::kStage, p, t, t.k_begin + s * kMmaBK);
    cp_async_commit();
  }
  float acc[4][8][4] = {};
  for (int64_t s = 0; s < steps; ++s) {
    cp_async_wait<kMmaStages - 2>();
    __syncthreads();  // step s has landed; every warp is done with step s - 1, whose stage is refilled next
    const int64_t next = s + kMmaStages - 1;
    if (next < steps) ista_stage_async<T, OP>(smem + next % kMmaStages * L::kStage, p, t, t.k_begin + next * kMmaBK);
    cp_async_commit();
    ista_stage_mma<T, OP>(acc, smem + s % kMmaStages * L::kStage, wm, wn, lane);
  }
  cp_async_wait<0>();  // only empty groups remain

  // C element (m0 + wm + 16 mt + g + 8 h, n0 + wn + 8 nt + 2t + {0, 1}) = acc[mt][nt][2h + {0, 1}].
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = t.m0 + wm + 16 * mt + g + 8 * h;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int64_t c = t.n0 + wn + 8 * nt + 2 * tq;  // even; d % 8 == 0, so c + 1 < d with c
        const float v0 = p.eta * acc[mt][nt][2 * h], v1 = p.eta * acc[mt][nt][2 * h + 1];
        if constexpr (OP == Op::kDx) {
          if (r < p.rows && c < p.d) {
            const unsigned bits = p.mask[r * p.mask_ld + c / 8] >> (c % 8);
            const T* g = p.dout + r * p.g_ld + c;
            const float g0 = bits & 1u ? to_f32(g[0]) : 0.f, g1 = bits & 2u ? to_f32(g[1]) : 0.f;
            *reinterpret_cast<uint32_t*>(p.dx + r * p.dx_ld + c) = pack2<T>(g0 + v0, g1 + v1);
          }
        } else {
          if (r < p.d && c < p.d)
            *reinterpret_cast<float2*>(p.dm_out + blockIdx.y * static_cast<int64_t>(p.d) * p.d + r * p.d + c) =
                make_float2(v0, v1);
        }
      }
    }
#else
  __trap();
#endif
}

// out[e] = sum over s in order of part[s][e]: the deterministic reduction of the dM chunks.
__global__ void __launch_bounds__(256) sum_slices_kernel(const float* __restrict__ part, float* __restrict__ out,
                                                         int64_t splits, int64_t count) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t k = 0; k < splits; ++k) s += part[k * count + e];
    out[e] = s;
  }
}

template <Op OP, typename T>
cudaError_t launch_gemm(const IstaParams<T>& p, int64_t m_extent, int64_t splits, ck_kernel kernel,
                        cudaStream_t stream) {
  const int tile = kernel == CK_KERNEL_MMA ? kMmaTile : kTile;
  const int64_t tiles = cdiv(m_extent, tile) * cdiv(p.d, tile);
  if (tiles > kMaxGridX || splits > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  if constexpr (sizeof(T) == 2) {
    if (kernel == CK_KERNEL_MMA) {
      constexpr size_t bytes = IstaMmaLayout<T, OP>::kBytes;
      CK_RETURN_IF_ERROR(allow_dynamic_smem(ista_mma_kernel<T, OP>, bytes));
      ista_mma_kernel<T, OP><<<grid, 128, bytes, stream>>>(p);
      return cudaGetLastError();
    }
    if (kernel == CK_KERNEL_WMMA) {
      ista_wmma_kernel<T, OP><<<grid, 128, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  ista_fma_kernel<T, OP><<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t check_common(int64_t rows, int64_t d, ck_kernel kernel) {
  if (rows < 0 || d < 1 || d > INT32_MAX || kernel < CK_KERNEL_AUTO || kernel > CK_KERNEL_MMA)
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

// What cp.async needs of a (rows, d) operand: 16-byte aligned rows.
bool rows_aligned(const void* ptr, int64_t ld) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % 8 == 0; }

// The mma kernels' alignment: d % 8 == 0, 16-byte aligned rows of the operands, 4-byte aligned mask rows.
bool mma_aligned(int64_t d, const uint8_t* mask, int64_t mask_ld) {
  return d % 8 == 0 && reinterpret_cast<uintptr_t>(mask) % 4 == 0 && mask_ld % 4 == 0;
}

// What both products read: G = dOut * mask (rows x d, dOut in T) and eta; each adds its other operands.
template <typename T>
IstaParams<T> g_params(const void* dout, int64_t dout_ld, const uint8_t* mask, int64_t mask_ld, int64_t rows,
                       int64_t d, float eta) {
  IstaParams<T> p{};
  p.dout = static_cast<const T*>(dout);
  p.g_ld = dout_ld;
  p.mask = mask;
  p.mask_ld = mask_ld;
  p.rows = rows;
  p.d = static_cast<int>(d);
  p.eta = eta;
  return p;
}

}  // namespace
}  // namespace ck

extern "C" cudaError_t ck_ista_backward_dx(const void* dout, int64_t dout_ld, const uint8_t* mask, int64_t mask_ld,
                                           const float* m, int64_t m_ld, const void* m_lowp, int64_t m_lowp_ld,
                                           void* dx, int64_t dx_ld, int64_t rows, int64_t d, float eta,
                                           ck_dtype dtype, ck_kernel kernel, cudaStream_t stream) {
  using namespace ck;
  CK_RETURN_IF_ERROR(check_common(rows, d, kernel));
  if (rows == 0) return cudaSuccess;
  if (!dout || !mask || !m || !dx || dout_ld < 0 || mask_ld < 0 || m_ld < 0 || dx_ld < d)
    return cudaErrorInvalidValue;
  const bool aligned = mma_aligned(d, mask, mask_ld) && m_lowp && rows_aligned(m_lowp, m_lowp_ld) &&
                       rows_aligned(dout, dout_ld) && rows_aligned(dx, dx_ld);
  CK_RETURN_IF_ERROR(resolve_kernel(kernel, dtype, aligned));
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    IstaParams<T> p = g_params<T>(dout, dout_ld, mask, mask_ld, rows, d, eta);
    p.m = m;
    p.m_ld = m_ld;
    p.m_lowp = static_cast<const T*>(m_lowp);
    p.m_lowp_ld = m_lowp_ld;
    p.dx = static_cast<T*>(dx);
    p.dx_ld = dx_ld;
    return launch_gemm<Op::kDx>(p, rows, 1, kernel, stream);
  });
}

extern "C" cudaError_t ck_ista_dm_plan(int64_t rows, int64_t d, ck_kernel kernel, int64_t* splits, int64_t* chunk) {
  using namespace ck;
  if (rows < 0 || d < 1 || !splits || !chunk) return cudaErrorInvalidValue;
  int dev = 0, sms = 0;
  CK_RETURN_IF_ERROR(cudaGetDevice(&dev));
  CK_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  // About two blocks per SM, chunks of at least 256 rows, at most 64 chunks; the tiles of the kernel that
  // CK_KERNEL_AUTO picks where the mma one may run.
  const int64_t tile = kernel == CK_KERNEL_FMA || kernel == CK_KERNEL_WMMA ? kTile : kMmaTile;
  const int64_t tiles = cdiv(d, tile) * cdiv(d, tile);
  int64_t s = cdiv(2 * static_cast<int64_t>(sms), tiles);
  const int64_t by_rows = cdiv(rows, 256);
  s = s < by_rows ? s : by_rows;
  s = s < 64 ? s : 64;
  s = s > 1 ? s : 1;
  const int64_t c = cdiv(cdiv(rows, s), kChunkAlign) * kChunkAlign;
  *chunk = c;
  *splits = c > 0 ? cdiv(rows, c) : 1;
  return cudaSuccess;
}

extern "C" cudaError_t ck_ista_backward_dm(const void* x, int64_t x_ld, const void* dout, int64_t dout_ld,
                                           const uint8_t* mask, int64_t mask_ld, float* dm, float* partials,
                                           int64_t splits, int64_t chunk, int64_t rows, int64_t d, float eta,
                                           ck_dtype dtype, ck_kernel kernel, cudaStream_t stream) {
  using namespace ck;
  CK_RETURN_IF_ERROR(check_common(rows, d, kernel));
  // The chunks must tile [0, rows) exactly: splits * chunk >= rows > (splits - 1) * chunk (or no rows).
  const bool tiled = rows == 0 ? splits == 1 : (chunk > 0 && chunk % kChunkAlign == 0 && splits >= 1 &&
                                                splits * chunk >= rows && (splits - 1) * chunk < rows);
  if (!tiled || !dm || (splits > 1 && !partials) || (rows > 0 && (!x || !dout || !mask)) || x_ld < 0 ||
      dout_ld < 0 || mask_ld < 0)
    return cudaErrorInvalidValue;
  const bool aligned = mma_aligned(d, mask, mask_ld) && rows_aligned(x, x_ld) && rows_aligned(dout, dout_ld);
  CK_RETURN_IF_ERROR(resolve_kernel(kernel, dtype, aligned));
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    IstaParams<T> p = g_params<T>(dout, dout_ld, mask, mask_ld, rows, d, eta);
    p.x = static_cast<const T*>(x);
    p.x_ld = x_ld;
    p.dm_out = splits > 1 ? partials : dm;
    p.chunk = chunk;
    CK_RETURN_IF_ERROR(launch_gemm<Op::kDm>(p, d, splits, kernel, stream));
    if (splits == 1) return cudaSuccess;
    const int64_t count = d * d;
    const int64_t blocks = cdiv(count, 256) < 4096 ? cdiv(count, 256) : 4096;
    sum_slices_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(partials, dm, splits, count);
    return cudaGetLastError();
  });
}
