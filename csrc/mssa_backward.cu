// MSSA backward: dw for out = softmax(scale w w^T) w, per (batch, head) slice w (N, p).
//
//   P = exp(scale w w^T - lse),  delta = rowsum(dO * out),  dS = P * (dO w^T - delta)
//   dw = scale (dS + dS^T) w + P^T dO
//
// A first kernel writes delta (one warp per row). Then one thread block owns BM rows i of dw (no atomics)
// and loops over key blocks j of BN rows. One product S_ij = scale w_i w_j^T serves both orientations:
//   query side  P_ij = exp(S_ij - lse_i),  dS_ij = P_ij (dO_i w_j^T - delta_i)
//   key side    P_ji = exp(S_ij - lse_j),  dS_ji = P_ji (w_i dO_j^T - delta_j)
//   dw_i += scale (dS_ij + dS_ji) w_j + P_ji dO_j
// Rows and keys past N and head-dim columns past p are zero-filled and never stored. Each warp owns a
// fixed group of rows i, so the score tiles it writes to shared memory are private to it (__syncwarp).
//
// Two variants of the main kernel:
//   fma   fp32 shared tiles, register-blocked FMA; any dtype (the only one for fp32: exact fp32 products).
//   wmma  fp16/bf16 tiles on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulation); dS and P_ji are
//         rounded to the input dtype before the dw products, as in the Triton kernel.
#include <mma.h>

#include "common.cuh"

namespace ck {
namespace {

constexpr int kThreads = 128;  // 4 warps

template <typename T>
struct MssaParams {
  const T* w;
  const T* dout;
  T* dw;
  ck_strides3 w_s, g_s, d_s;
  const float* lse;    // (B * H, N)
  const float* delta;  // (B * H, N)
  int heads, n, p;
  float scale;
};

// delta[bh * N + i] = sum_k dO[b, h, i, k] out[b, h, i, k] in fp32; one warp per row.
template <typename T>
__global__ void __launch_bounds__(256) mssa_delta_kernel(const T* __restrict__ dout, ck_strides3 g_s,
                                                         const T* __restrict__ out, ck_strides3 o_s,
                                                         float* __restrict__ delta, int64_t rows, int heads,
                                                         int n, int p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const int64_t bh = row / n, b = bh / heads, h = bh % heads, i = row % n;
  const T* g = dout + b * g_s.b + h * g_s.h + i * g_s.n;
  const T* o = out + b * o_s.b + h * o_s.h + i * o_s.n;
  float acc = 0.f;
  for (int k = lane; k < p; k += 32) acc += to_f32(g[k]) * to_f32(o[k]);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc;
}

// The (bh, first row) a block of BM rows works on, and the pointers to that head.
template <typename T>
struct HeadView {
  const T* w;
  const T* g;
  T* dw;
  const float* lse;
  const float* delta;
  int i0;
};

template <int BM, typename T>
__device__ __forceinline__ HeadView<T> head_view(const MssaParams<T>& prm) {
  const int64_t n_blocks = cdiv(prm.n, BM);
  const int64_t bh = blockIdx.x / n_blocks;
  const int64_t b = bh / prm.heads, h = bh % prm.heads;
  return {prm.w + b * prm.w_s.b + h * prm.w_s.h, prm.dout + b * prm.g_s.b + h * prm.g_s.h,
          prm.dw + b * prm.d_s.b + h * prm.d_s.h, prm.lse + bh * prm.n, prm.delta + bh * prm.n,
          static_cast<int>(blockIdx.x % n_blocks) * BM};
}

// Tile[r][c] = src[(r0 + r) * row_stride + c] for rows r0 + r < n and columns c < p, else 0.
template <int R, int P, int LD, typename S, typename T>
__device__ __forceinline__ void load_rows(S* dst, const T* src, int64_t row_stride, int r0, int n, int p) {
  fill_tile<R, P, LD, false>(dst, [&](int r, int c) {
    return (r0 + r < n && c < p) ? to_f32(src[static_cast<int64_t>(r0 + r) * row_stride + c]) : 0.f;
  });
}

// lse and delta of BN keys from j0 into shared memory (0 past N).
__device__ __forceinline__ void load_key_stats(float* lse_s, float* dl_s, const float* lse, const float* delta,
                                               int j0, int n, int count) {
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    const bool ok = j0 + t < n;
    lse_s[t] = ok ? lse[j0 + t] : 0.f;
    dl_s[t] = ok ? delta[j0 + t] : 0.f;
  }
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

__device__ __forceinline__ float comp(float4 v, int k) { return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w; }

// ---------------------------------------------------------------------------------------------------------
// FMA variant. BM = BN = 32, 4 warps; warp w owns rows 8w..8w+7, lane (half = lane / 16, col = lane % 16)
// holds rows 8w + 4 half + a (a < 4) in both phases:
//   scores  keys col + 16 c (c < 2), dot products 4-wide along p (float4)
//   dw      columns col + 16 q (q < P / 16)
// Shared tiles are fp32 with row stride P + 4 (a multiple of 4 whose quarter is odd: conflict-free float4
// reads of 8 distinct rows) and BN + 4.
// ---------------------------------------------------------------------------------------------------------
template <int P>
struct FmaLayout {
  static constexpr int BM = 32, BN = 32, LDP = P + 4, LDS = BN + 4;
  static constexpr int kWi = 0, kGi = kWi + BM * LDP, kWj = kGi + BM * LDP, kGj = kWj + BN * LDP;
  static constexpr int kDs = kGj + BN * LDP, kPk = kDs + BM * LDS, kLse = kPk + BM * LDS, kDl = kLse + BN;
  static constexpr size_t kBytes = sizeof(float) * (kDl + BN);
  static_assert(P % 16 == 0 && (LDP / 4) % 2 == 1, "P must be a multiple of 16 and (P + 4) / 4 odd");
};

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) mssa_bwd_fma_kernel(MssaParams<T> prm) {
  using L = FmaLayout<P>;
  constexpr int BM = L::BM, BN = L::BN, LDP = L::LDP, LDS = L::LDS, NQ = P / 16;
  float* smem = reinterpret_cast<float*>(dynamic_smem());
  float* wi = smem + L::kWi;   // [BM][LDP]  w_i
  float* gi = smem + L::kGi;   // [BM][LDP]  dO_i
  float* wj = smem + L::kWj;   // [BN][LDP]  w_j
  float* gj = smem + L::kGj;   // [BN][LDP]  dO_j
  float* ds = smem + L::kDs;   // [BM][LDS]  scale (dS_ij + dS_ji)
  float* pk = smem + L::kPk;   // [BM][LDS]  P_ji
  float* lse_j = smem + L::kLse;
  float* dl_j = smem + L::kDl;

  const HeadView<T> hv = head_view<BM>(prm);
  const int n = prm.n, p = prm.p;
  const float scale = prm.scale;
  const int lane = threadIdx.x % 32, col = lane % 16;
  const int rbase = (threadIdx.x / 32) * 8 + (lane / 16) * 4;  // this lane's 4 local rows start here

  load_rows<BM, P, LDP>(wi, hv.w, prm.w_s.n, hv.i0, n, p);
  load_rows<BM, P, LDP>(gi, hv.g, prm.g_s.n, hv.i0, n, p);
  float lse_i[4], dl_i[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = hv.i0 + rbase + a;
    lse_i[a] = i < n ? hv.lse[i] : 0.f;
    dl_i[a] = i < n ? hv.delta[i] : 0.f;
  }
  float acc[4][NQ];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int q = 0; q < NQ; ++q) acc[a][q] = 0.f;

  for (int j0 = 0; j0 < n; j0 += BN) {
    __syncthreads();  // every warp is done with the previous key block (and wi, gi are loaded)
    load_rows<BN, P, LDP>(wj, hv.w, prm.w_s.n, j0, n, p);
    load_rows<BN, P, LDP>(gj, hv.g, prm.g_s.n, j0, n, p);
    load_key_stats(lse_j, dl_j, hv.lse, hv.delta, j0, n, BN);
    __syncthreads();

    // s = w_i w_j^T, dq = dO_i w_j^T, dk = w_i dO_j^T for rows rbase + a, keys col + 16 c.
    float s[4][2] = {}, dq[4][2] = {}, dk[4][2] = {};
#pragma unroll 4
    for (int k = 0; k < P; k += 4) {
      float4 aw[4], ag[4], bw[2], bg[2];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        aw[a] = *reinterpret_cast<const float4*>(wi + (rbase + a) * LDP + k);
        ag[a] = *reinterpret_cast<const float4*>(gi + (rbase + a) * LDP + k);
      }
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        bw[c] = *reinterpret_cast<const float4*>(wj + (col + 16 * c) * LDP + k);
        bg[c] = *reinterpret_cast<const float4*>(gj + (col + 16 * c) * LDP + k);
      }
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          s[a][c] += dot4(aw[a], bw[c]);
          dq[a][c] += dot4(ag[a], bw[c]);
          dk[a][c] += dot4(aw[a], bg[c]);
        }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = rbase + a, cj = col + 16 * c;
        const bool valid = hv.i0 + r < n && j0 + cj < n;
        const float sij = scale * s[a][c];
        const float pq = valid ? expf(sij - lse_i[a]) : 0.f;     // P_ij
        const float pkv = valid ? expf(sij - lse_j[cj]) : 0.f;   // P_ji
        ds[r * LDS + cj] = scale * (pq * (dq[a][c] - dl_i[a]) + pkv * (dk[a][c] - dl_j[cj]));
        pk[r * LDS + cj] = pkv;
      }
    __syncwarp();  // ds, pk rows of this warp were written by its other lanes

    // dw_i += ds w_j + pk dO_j over the BN keys.
#pragma unroll 2
    for (int k = 0; k < BN; k += 4) {
      float4 d4[4], p4[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        d4[a] = *reinterpret_cast<const float4*>(ds + (rbase + a) * LDS + k);
        p4[a] = *reinterpret_cast<const float4*>(pk + (rbase + a) * LDS + k);
      }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
          const float wv = wj[(k + kk) * LDP + col + 16 * q];
          const float gv = gj[(k + kk) * LDP + col + 16 * q];
#pragma unroll
          for (int a = 0; a < 4; ++a) acc[a][q] += comp(d4[a], kk) * wv + comp(p4[a], kk) * gv;
        }
    }
  }

#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = hv.i0 + rbase + a;
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
      const int c = col + 16 * q;
      if (i < n && c < p) hv.dw[static_cast<int64_t>(i) * prm.d_s.n + c] = from_f32<T>(acc[a][q]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// wmma variant (fp16/bf16). BM = 64, BN = 32, 4 warps; warp w owns rows 16w..16w+15.
//   scores  S, dO_i w_j^T, w_i dO_j^T: 16 x 32 per warp (2 fragments each), stored fp32 to its rows of
//           sbuf/qbuf/kbuf, turned into ds16 = scale (dS_ij + dS_ji) and pk16 = P_ji in T
//   dw      16 x P per warp in P / 16 accumulator fragments held across the key loop
// Tiles of T have row stride P + 8 and BN + 8 (16-byte padding), fp32 tiles BN + 4; every fragment
// pointer is 32-byte aligned (regions start at multiples of 128 bytes).
// ---------------------------------------------------------------------------------------------------------
constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T, int P>
struct WmmaLayout {
  static constexpr int BM = 64, BN = 32, LDT = P + 8, LDF = BN + 4, LDH = BN + 8;
  static constexpr size_t kWi = 0;
  static constexpr size_t kGi = kWi + align128(sizeof(T) * BM * LDT);
  static constexpr size_t kWj = kGi + align128(sizeof(T) * BM * LDT);
  static constexpr size_t kGj = kWj + align128(sizeof(T) * BN * LDT);
  static constexpr size_t kS = kGj + align128(sizeof(T) * BN * LDT);
  static constexpr size_t kQ = kS + align128(sizeof(float) * BM * LDF);
  static constexpr size_t kK = kQ + align128(sizeof(float) * BM * LDF);
  static constexpr size_t kDs = kK + align128(sizeof(float) * BM * LDF);
  static constexpr size_t kPk = kDs + align128(sizeof(T) * BM * LDH);
  static constexpr size_t kStats = kPk + align128(sizeof(T) * BM * LDH);  // lse_i, dl_i [BM], lse_j, dl_j [BN]
  static constexpr size_t kBytes = kStats + sizeof(float) * 2 * (BM + BN);
  static_assert(P % 16 == 0, "P must be a multiple of 16");
};

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) mssa_bwd_wmma_kernel(MssaParams<T> prm) {
#if CK_TENSOR_CORE_ARCH
  namespace wmma = nvcuda::wmma;
  using L = WmmaLayout<T, P>;
  constexpr int BM = L::BM, BN = L::BN, LDT = L::LDT, LDF = L::LDF, LDH = L::LDH, NF = P / 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  unsigned char* smem = dynamic_smem();
  T* wi = reinterpret_cast<T*>(smem + L::kWi);        // [BM][LDT]  w_i
  T* gi = reinterpret_cast<T*>(smem + L::kGi);        // [BM][LDT]  dO_i
  T* wj = reinterpret_cast<T*>(smem + L::kWj);        // [BN][LDT]  w_j
  T* gj = reinterpret_cast<T*>(smem + L::kGj);        // [BN][LDT]  dO_j
  float* sbuf = reinterpret_cast<float*>(smem + L::kS);  // [BM][LDF]  w_i w_j^T
  float* qbuf = reinterpret_cast<float*>(smem + L::kQ);  // [BM][LDF]  dO_i w_j^T
  float* kbuf = reinterpret_cast<float*>(smem + L::kK);  // [BM][LDF]  w_i dO_j^T
  T* ds16 = reinterpret_cast<T*>(smem + L::kDs);      // [BM][LDH]  scale (dS_ij + dS_ji)
  T* pk16 = reinterpret_cast<T*>(smem + L::kPk);      // [BM][LDH]  P_ji
  float* lse_i = reinterpret_cast<float*>(smem + L::kStats);
  float* dl_i = lse_i + BM;
  float* lse_j = dl_i + BM;
  float* dl_j = lse_j + BN;

  const HeadView<T> hv = head_view<BM>(prm);
  const int n = prm.n, p = prm.p;
  const float scale = prm.scale;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = 16 * warp;  // this warp's first local row

  load_rows<BM, P, LDT>(wi, hv.w, prm.w_s.n, hv.i0, n, p);
  load_rows<BM, P, LDT>(gi, hv.g, prm.g_s.n, hv.i0, n, p);
  load_key_stats(lse_i, dl_i, hv.lse, hv.delta, hv.i0, n, BM);

  FragC acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  for (int j0 = 0; j0 < n; j0 += BN) {
    __syncthreads();  // every warp is done with the previous key block (and wi, gi, lse_i, dl_i are loaded)
    load_rows<BN, P, LDT>(wj, hv.w, prm.w_s.n, j0, n, p);
    load_rows<BN, P, LDT>(gj, hv.g, prm.g_s.n, j0, n, p);
    load_key_stats(lse_j, dl_j, hv.lse, hv.delta, j0, n, BN);
    __syncthreads();

    FragC fs[2], fq[2], fk[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      wmma::fill_fragment(fs[c], 0.f);
      wmma::fill_fragment(fq[c], 0.f);
      wmma::fill_fragment(fk[c], 0.f);
    }
#pragma unroll
    for (int k = 0; k < P; k += 16) {
      FragA aw, ag;
      wmma::load_matrix_sync(aw, wi + r0 * LDT + k, LDT);
      wmma::load_matrix_sync(ag, gi + r0 * LDT + k, LDT);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        FragBCol bw, bg;  // B[k'][j'] = w_j[16c + j'][k + k'], i.e. w_j^T
        wmma::load_matrix_sync(bw, wj + 16 * c * LDT + k, LDT);
        wmma::load_matrix_sync(bg, gj + 16 * c * LDT + k, LDT);
        wmma::mma_sync(fs[c], aw, bw, fs[c]);
        wmma::mma_sync(fq[c], ag, bw, fq[c]);
        wmma::mma_sync(fk[c], aw, bg, fk[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      wmma::store_matrix_sync(sbuf + r0 * LDF + 16 * c, fs[c], LDF, wmma::mem_row_major);
      wmma::store_matrix_sync(qbuf + r0 * LDF + 16 * c, fq[c], LDF, wmma::mem_row_major);
      wmma::store_matrix_sync(kbuf + r0 * LDF + 16 * c, fk[c], LDF, wmma::mem_row_major);
    }
    __syncwarp();

    // Lane handles key `lane` of each of the warp's 16 rows.
    const bool key_ok = j0 + lane < n;
#pragma unroll 4
    for (int t = 0; t < 16; ++t) {
      const int r = r0 + t, e = r * LDF + lane;
      const bool valid = key_ok && hv.i0 + r < n;
      const float sij = scale * sbuf[e];
      const float pq = valid ? expf(sij - lse_i[r]) : 0.f;      // P_ij
      const float pkv = valid ? expf(sij - lse_j[lane]) : 0.f;  // P_ji
      ds16[r * LDH + lane] = from_f32<T>(scale * (pq * (qbuf[e] - dl_i[r]) + pkv * (kbuf[e] - dl_j[lane])));
      pk16[r * LDH + lane] = from_f32<T>(pkv);
    }
    __syncwarp();

#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      FragA ad, ap;
      wmma::load_matrix_sync(ad, ds16 + r0 * LDH + kk, LDH);
      wmma::load_matrix_sync(ap, pk16 + r0 * LDH + kk, LDH);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        FragBRow bw, bg;  // B[k'][c'] = w_j[kk + k'][16f + c']
        wmma::load_matrix_sync(bw, wj + kk * LDT + 16 * f, LDT);
        wmma::load_matrix_sync(bg, gj + kk * LDT + 16 * f, LDT);
        wmma::mma_sync(acc[f], ad, bw, acc[f]);
        wmma::mma_sync(acc[f], ap, bg, acc[f]);
      }
    }
  }

  // Each 16 x 16 fragment goes through the warp's rows of sbuf to a bounds-checked store.
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    __syncwarp();
    wmma::store_matrix_sync(sbuf + r0 * LDF, acc[f], LDF, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int r = e / 16, c = 16 * f + e % 16, i = hv.i0 + r0 + r;
      if (i < n && c < p) hv.dw[static_cast<int64_t>(i) * prm.d_s.n + c] = from_f32<T>(sbuf[(r0 + r) * LDF + e % 16]);
    }
  }
#else
  __trap();
#endif
}

// One block per (bh, block of L::BM rows), row blocks of a head adjacent (they share its w in L2).
template <typename L, typename Kernel, typename T>
cudaError_t launch_rows(Kernel kernel, const MssaParams<T>& prm, int64_t bh, cudaStream_t stream) {
  const int64_t grid = bh * cdiv(prm.n, L::BM);
  if (grid > kMaxGridX) return cudaErrorInvalidConfiguration;
  CK_RETURN_IF_ERROR(allow_dynamic_smem(kernel, L::kBytes));
  kernel<<<static_cast<unsigned>(grid), kThreads, L::kBytes, stream>>>(prm);
  return cudaGetLastError();
}

template <typename T, int P>
cudaError_t launch_main(const MssaParams<T>& prm, int64_t bh, bool tensor_cores, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores) return launch_rows<WmmaLayout<T, P>>(mssa_bwd_wmma_kernel<T, P>, prm, bh, stream);
  }
  return launch_rows<FmaLayout<P>>(mssa_bwd_fma_kernel<T, P>, prm, bh, stream);
}

}  // namespace
}  // namespace ck

extern "C" cudaError_t ck_mssa_backward(const void* dout, ck_strides3 dout_strides, const void* w,
                                        ck_strides3 w_strides, const void* out, ck_strides3 out_strides,
                                        const float* lse, void* dw, ck_strides3 dw_strides, float* delta,
                                        int64_t batch, int64_t heads, int64_t n, int64_t p, float scale,
                                        ck_dtype dtype, int tensor_cores, cudaStream_t stream) {
  using namespace ck;
  if (batch < 0 || heads < 0 || n < 1 || p < 1 || p > CK_MSSA_MAX_HEAD_DIM || n > INT32_MAX ||
      heads > INT32_MAX || !(scale > 0.f))
    return cudaErrorInvalidValue;
  if (tensor_cores && dtype == CK_FLOAT32) return cudaErrorInvalidValue;
  const int64_t bh = batch * heads;
  if (bh == 0) return cudaSuccess;
  if (!dout || !w || !out || !lse || !dw || !delta) return cudaErrorInvalidValue;
  if (tensor_cores) {
    int major = 0;
    CK_RETURN_IF_ERROR(device_major(&major));
    if (major < 8) return cudaErrorNotSupported;
  }
  const int64_t rows = bh * n;
  if (cdiv(rows, 8) > kMaxGridX) return cudaErrorInvalidConfiguration;

  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    mssa_delta_kernel<T><<<static_cast<unsigned>(cdiv(rows, 8)), 256, 0, stream>>>(
        static_cast<const T*>(dout), dout_strides, static_cast<const T*>(out), out_strides, delta, rows,
        static_cast<int>(heads), static_cast<int>(n), static_cast<int>(p));
    CK_RETURN_IF_ERROR(cudaGetLastError());

    const MssaParams<T> prm{static_cast<const T*>(w), static_cast<const T*>(dout), static_cast<T*>(dw),
                            w_strides, dout_strides, dw_strides, lse, delta,
                            static_cast<int>(heads), static_cast<int>(n), static_cast<int>(p), scale};
    const bool tc = tensor_cores != 0;
    if (p <= 32) return launch_main<T, 32>(prm, bh, tc, stream);
    if (p <= 48) return launch_main<T, 48>(prm, bh, tc, stream);
    if (p <= 64) return launch_main<T, 64>(prm, bh, tc, stream);
    if (p <= 96) return launch_main<T, 96>(prm, bh, tc, stream);
    return launch_main<T, 128>(prm, bh, tc, stream);
  });
}
