// ISTA backward, with G = dOut * mask (the activation mask unpacked from bits while loading dOut):
//
//   dx = G + eta G M^T    (rows, d),  one block per 64 x 64 tile of dx, reduction over d
//   dM = eta x^T G        (d, d),     one block per (64 x 64 tile of dM, chunk of rows); chunk s sums
//                                     into its own slice, one more kernel adds the slices in order
//
// Both are C[m][n] = sum_k A(m, k) B(k, n) over shared-memory tiles:
//   dx  A(m, k) = G[m][k],   B(k, n) = M[n][k]
//   dM  A(i, r) = x[r][i],   B(r, j) = G[r][j]
// Tiles are filled with the thread index running along the contiguous global dimension; everything
// outside (rows, d) is zero-filled and never stored. Two variants:
//   fma   fp32 tiles, each of 256 threads owns a 4 x 4 block of C (float4 reads); any dtype
//   wmma  fp16/bf16 tiles on tensor cores (16x16x16, fp32 accumulation), 4 warps of 32 x 32;
//         M is rounded to the input dtype, as torch's m.to(x.dtype) does
#include <mma.h>

#include "common.cuh"

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

template <Op OP, typename T>
__device__ __forceinline__ TileRange tile_range(const IstaParams<T>& p) {
  const int64_t n_tiles = cdiv(p.d, kTile);
  const int64_t m0 = blockIdx.x / n_tiles * kTile, n0 = blockIdx.x % n_tiles * kTile;
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
cudaError_t launch_gemm(const IstaParams<T>& p, int64_t m_extent, int64_t splits, bool tensor_cores,
                        cudaStream_t stream) {
  const int64_t tiles = cdiv(m_extent, kTile) * cdiv(p.d, kTile);
  if (tiles > kMaxGridX || splits > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores) {
      ista_wmma_kernel<T, OP><<<grid, 128, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  ista_fma_kernel<T, OP><<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t check_common(int64_t rows, int64_t d, ck_dtype dtype, int tensor_cores) {
  if (rows < 0 || d < 1 || d > INT32_MAX) return cudaErrorInvalidValue;
  if (tensor_cores) {
    if (dtype == CK_FLOAT32) return cudaErrorInvalidValue;
    int major = 0;
    CK_RETURN_IF_ERROR(device_major(&major));
    if (major < 8) return cudaErrorNotSupported;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace ck

extern "C" cudaError_t ck_ista_backward_dx(const void* dout, int64_t dout_ld, const uint8_t* mask, int64_t mask_ld,
                                           const float* m, int64_t m_ld, void* dx, int64_t dx_ld, int64_t rows,
                                           int64_t d, float eta, ck_dtype dtype, int tensor_cores,
                                           cudaStream_t stream) {
  using namespace ck;
  CK_RETURN_IF_ERROR(check_common(rows, d, dtype, tensor_cores));
  if (rows == 0) return cudaSuccess;
  if (!dout || !mask || !m || !dx || dout_ld < 0 || mask_ld < 0 || m_ld < 0 || dx_ld < d)
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    IstaParams<T> p{};
    p.dout = static_cast<const T*>(dout);
    p.g_ld = dout_ld;
    p.mask = mask;
    p.mask_ld = mask_ld;
    p.m = m;
    p.m_ld = m_ld;
    p.dx = static_cast<T*>(dx);
    p.dx_ld = dx_ld;
    p.rows = rows;
    p.d = static_cast<int>(d);
    p.eta = eta;
    return launch_gemm<Op::kDx>(p, rows, 1, tensor_cores != 0, stream);
  });
}

extern "C" cudaError_t ck_ista_dm_plan(int64_t rows, int64_t d, int64_t* splits, int64_t* chunk) {
  using namespace ck;
  if (rows < 0 || d < 1 || !splits || !chunk) return cudaErrorInvalidValue;
  int dev = 0, sms = 0;
  CK_RETURN_IF_ERROR(cudaGetDevice(&dev));
  CK_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  // About two blocks per SM, chunks of at least 256 rows, at most 64 chunks.
  const int64_t tiles = cdiv(d, kTile) * cdiv(d, kTile);
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
                                           ck_dtype dtype, int tensor_cores, cudaStream_t stream) {
  using namespace ck;
  CK_RETURN_IF_ERROR(check_common(rows, d, dtype, tensor_cores));
  // The chunks must tile [0, rows) exactly: splits * chunk >= rows > (splits - 1) * chunk (or no rows).
  const bool tiled = rows == 0 ? splits == 1 : (chunk > 0 && chunk % kChunkAlign == 0 && splits >= 1 &&
                                                splits * chunk >= rows && (splits - 1) * chunk < rows);
  if (!tiled || !dm || (splits > 1 && !partials) || (rows > 0 && (!x || !dout || !mask)) || x_ld < 0 ||
      dout_ld < 0 || mask_ld < 0)
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    IstaParams<T> p{};
    p.x = static_cast<const T*>(x);
    p.x_ld = x_ld;
    p.dout = static_cast<const T*>(dout);
    p.g_ld = dout_ld;
    p.mask = mask;
    p.mask_ld = mask_ld;
    p.dm_out = splits > 1 ? partials : dm;
    p.rows = rows;
    p.chunk = chunk;
    p.d = static_cast<int>(d);
    p.eta = eta;
    CK_RETURN_IF_ERROR(launch_gemm<Op::kDm>(p, d, splits, tensor_cores != 0, stream));
    if (splits == 1) return cudaSuccess;
    const int64_t count = d * d;
    const int64_t blocks = cdiv(count, 256) < 4096 ? cdiv(count, 256) : 4096;
    sum_slices_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(partials, dm, splits, count);
    return cudaGetLastError();
  });
}
