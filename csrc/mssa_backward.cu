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
// Variants of the main kernel (ck_kernel):
//   fma        fp32 shared tiles, register-blocked FMA; any dtype (the only one for fp32: exact fp32 products).
//   wmma       fp16/bf16 tiles on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulation); dS and P_ji are
//              rounded to the input dtype before the dw products, as in the Triton kernel.
//   mma        fp16/bf16, ldmatrix + mma.sync + cp.async (below): one block per head for N <= 256 that visits
//              each unordered tile pair once (S = S^T), else (or as mma-tiled) the row-block form above.
#include <mma.h>

#include "common.cuh"
#include "mma.cuh"

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

template <typename T>
__device__ __forceinline__ HeadView<T> head_at(const MssaParams<T>& prm, int64_t bh, int i0) {
  const int64_t b = bh / prm.heads, h = bh % prm.heads;
  return {prm.w + b * prm.w_s.b + h * prm.w_s.h, prm.dout + b * prm.g_s.b + h * prm.g_s.h,
          prm.dw + b * prm.d_s.b + h * prm.d_s.h, prm.lse + bh * prm.n, prm.delta + bh * prm.n, i0};
}

// Blocks of BM rows, the blocks of one head adjacent: blockIdx.x = bh * cdiv(N, BM) + row block.
template <int BM, typename T>
__device__ __forceinline__ HeadView<T> head_view(const MssaParams<T>& prm) {
  const int64_t n_blocks = cdiv(prm.n, BM);
  return head_at(prm, blockIdx.x / n_blocks, static_cast<int>(blockIdx.x % n_blocks) * BM);
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

// acc[f] += Ad W_f + Ap G_f, i.e. [Ad | Ap] [W; G], for the 16-column blocks f of W and G: 16 rows of two row-major
// [k][n] tiles of stride LD (the wmma counterpart of mma_stacked).
template <int LD, typename FragB, typename FragA, typename FragC, int NF, typename T>
__device__ __forceinline__ void wmma_stacked(FragC (&acc)[NF], const FragA& ad, const FragA& ap, const T* w,
                                             const T* g) {
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    FragB bw, bg;
    nvcuda::wmma::load_matrix_sync(bw, w + 16 * f, LD);
    nvcuda::wmma::load_matrix_sync(bg, g + 16 * f, LD);
    nvcuda::wmma::mma_sync(acc[f], ad, bw, acc[f]);
    nvcuda::wmma::mma_sync(acc[f], ap, bg, acc[f]);
  }
}

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
      wmma_stacked<LDT, FragBRow>(acc, ad, ap, wj + kk * LDT, gj + kk * LDT);  // B = w_j, dO_j rows kk..
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

// ---------------------------------------------------------------------------------------------------------
// mma variants (fp16/bf16, sm_80+): ldmatrix + mma.sync m16n8k16 with fp32 accumulation (mma.cuh), operands
// copied to shared memory by cp.async. Tiles of BT = 64 rows of w and dO (row stride P + 8: the 8 rows an
// ldmatrix reads fall in distinct banks), 4 warps; warp w owns rows 16w..16w+15 of every tile it works on.
// For a row tile I and a key tile J (rows past N zero-filled, with lse = delta = 0 there; every term the
// padding reaches in a row < N multiplies a zero row of w or dO, so nothing is masked):
//   phase 1  S = w_I w_J^T, dPq = dO_I w_J^T, dPk = w_I dO_J^T                  (k: the head dim)
//            Pq = exp(scale S - lse_I), Pk = exp(scale S - lse_J^T)
//            X = scale (Pq (dPq - delta_I) + Pk (dPk - delta_J^T))    = the (I, J) block of scale (dS + dS^T)
//   phase 2  dw_I += X w_J + Pk dO_J                                           (k: the 64 rows of J)
//   phase 3  dw_J += X^T w_I + Pq^T dO_I, when I != J in the head kernel       (k: the 64 rows of I)
// Pk is the (I, J) block of P^T and Pq^T its (J, I) block. Phases 1 and 2 go 32 columns of J at a time; X, Pk
// become phase 2's A fragments in registers (C layout = A layout), rounded to T as in the Triton kernel.
//   head kernel   one block per (batch, head), N <= 256: the whole head resident (one cp.async group per
//                 tile, the first row of pairs waits for tile J only), unordered pairs I <= J visited once;
//                 dw_I accumulates in registers over its row of pairs, dw_J of later tiles in fp32 shared
//                 memory in fragment order (each lane reads back only what it wrote: no barrier, no atomics)
//   tiled kernel  one block per (batch, head, tile I), every J in order, J tiles double-buffered by cp.async
// ---------------------------------------------------------------------------------------------------------
constexpr int kMmaRows = 64;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int P>
struct MmaShape {
  static constexpr int BT = kMmaRows, LDT = P + 8, LDX = BT + 8, KP = P / 16, NT = P / 8;
  static constexpr size_t kTile = sizeof(T) * BT * LDT;    // one operand tile; a multiple of 128 bytes
  static constexpr size_t kStats = sizeof(float) * BT;     // lse or delta of one tile
  static constexpr size_t kStage = sizeof(T) * BT * LDX;   // X or Pq of one pair (head kernel)
  static constexpr size_t kAcc = sizeof(float) * BT * P;   // dw of one tile in fp32 (head kernel)
  static_assert(P % 16 == 0 && kTile % 128 == 0, "P must be a multiple of 16");
};

// Rows r0.. of one head's w and dO into [BT][LDT] tiles, lse and delta into [BT]: zero past N and past p.
template <typename T, int P>
__device__ __forceinline__ void tile_async(T* w_dst, T* g_dst, float* lse_dst, float* dl_dst, const HeadView<T>& hv,
                                           const MssaParams<T>& prm, int r0) {
  using S = MmaShape<T, P>;
  constexpr int CH = P / 8;  // 16-byte chunks a row
  for (int idx = threadIdx.x; idx < S::BT * CH; idx += kThreads) {
    const int r = idx / CH, c = idx % CH * 8, row = r0 + r;
    const int elems = row < prm.n ? clamp(prm.p - c, 0, 8) : 0;
    const int bytes = elems * static_cast<int>(sizeof(T));
    cp_async<16>(w_dst + r * S::LDT + c, elems ? hv.w + static_cast<int64_t>(row) * prm.w_s.n + c : hv.w, bytes);
    cp_async<16>(g_dst + r * S::LDT + c, elems ? hv.g + static_cast<int64_t>(row) * prm.g_s.n + c : hv.g, bytes);
  }
  for (int r = threadIdx.x; r < S::BT; r += kThreads) {
    const bool ok = r0 + r < prm.n;
    cp_async<4>(lse_dst + r, ok ? hv.lse + r0 + r : hv.lse, ok ? 4 : 0);
    cp_async<4>(dl_dst + r, ok ? hv.delta + r0 + r : hv.delta, ok ? 4 : 0);
  }
}

// Stats of the two rows (g, g + 8) a lane holds in C fragments of its warp's 16 rows, log2-scaled lse.
struct RowStats {
  float lse2[2], delta[2];
};

__device__ __forceinline__ RowStats row_stats(const float* lse_s, const float* dl_s, int warp, int lane) {
  RowStats st;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 16 * warp + lane / 4 + 8 * h;
    st.lse2[h] = lse_s[r] * kLog2e;
    st.delta[h] = dl_s[r];
  }
  return st;
}

// acc (16 rows, NT 8-column tiles) += [Ax | Ap] [W; G] over one 16-deep k step: W and G are rows k.. of two
// row-major [k][n] tiles, read with ldmatrix.trans from w and g (this lane's rows16_offset included).
template <typename T, int NT>
__device__ __forceinline__ void mma_stacked(float (&acc)[NT][4], const uint32_t (&ax)[4], const uint32_t (&ap)[4],
                                            const T* w, const T* g) {
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {  // B[k][c] = W[k][c], G[k][c] for columns 16 np..
    uint32_t bw[4], bg[4];
    ldsm_x4_trans(bw, w + 16 * np);
    ldsm_x4_trans(bg, g + 16 * np);
    mma_16x16<T>(acc[2 * np], acc[2 * np + 1], ax, bw);
    mma_16x16<T>(acc[2 * np], acc[2 * np + 1], ap, bg);
  }
}

// Phases 1 and 2 of pair (I, J) for this warp's 16 rows of I; with STAGE, also X and Pq of those rows into
// xs, pqs ([BT][LDX]) for phase 3. wi, gi, wj, gj: [BT][LDT] tiles; lse_j, dl_j: stats of J.
template <typename T, int P, bool STAGE>
__device__ __forceinline__ void pair_rows(float (&acc)[P / 8][4], const T* wi, const T* gi, const T* wj,
                                          const T* gj, const float* lse_j, const float* dl_j, const RowStats& st,
                                          float scale, T* xs, T* pqs, int warp, int lane) {
  using S = MmaShape<T, P>;
  constexpr int LDT = S::LDT;
  const float scale2 = scale * kLog2e;
  const int g = lane / 4, t = lane % 4;
  const int a_off = 16 * warp * LDT + rows16_offset<LDT>(lane);
  const int bn_off = rows8_offset<LDT>(lane), bk_off = rows16_offset<LDT>(lane);
#pragma unroll 1
  for (int half = 0; half < 2; ++half) {
    const int j0 = 32 * half;
    // Phase 1: 16 x 32 blocks of S, dPq, dPk as 4 column tiles of 8.
    float s[4][4] = {}, dq[4][4] = {}, dk[4][4] = {};
#pragma unroll
    for (int kk = 0; kk < S::KP; ++kk) {
      uint32_t aw[4], ag[4];
      ldsm_x4(aw, wi + a_off + 16 * kk);
      ldsm_x4(ag, gi + a_off + 16 * kk);
#pragma unroll
      for (int np = 0; np < 2; ++np) {  // B[k][j] = w_J[j][k], dO_J[j][k] for keys j0 + 16 np..
        uint32_t bw[4], bg[4];
        const int off = (j0 + 16 * np) * LDT + bn_off + 16 * kk;
        ldsm_x4(bw, wj + off);
        ldsm_x4(bg, gj + off);
        mma_16x16<T>(s[2 * np], s[2 * np + 1], aw, bw);
        mma_16x16<T>(dq[2 * np], dq[2 * np + 1], ag, bw);
        mma_16x16<T>(dk[2 * np], dk[2 * np + 1], aw, bg);
      }
    }
    // Element (row g + 8 (e / 2), key j0 + 8 nt + 2t + e % 2): s <- X, dk <- Pk, dq <- Pq.
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = j0 + 8 * nt + 2 * t + e % 2;
        const float sij = s[nt][e] * scale2;
        const float pq = exp2f(sij - st.lse2[e / 2]);
        const float pk = exp2f(sij - lse_j[j] * kLog2e);
        s[nt][e] = scale * (pq * (dq[nt][e] - st.delta[e / 2]) + pk * (dk[nt][e] - dl_j[j]));
        dk[nt][e] = pk;
        dq[nt][e] = pq;
      }
    if constexpr (STAGE) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int e = (16 * warp + g + 8 * h) * S::LDX + j0 + 8 * nt + 2 * t;
          *reinterpret_cast<uint32_t*>(xs + e) = pack2<T>(s[nt][2 * h], s[nt][2 * h + 1]);
          *reinterpret_cast<uint32_t*>(pqs + e) = pack2<T>(dq[nt][2 * h], dq[nt][2 * h + 1]);
        }
    }
    // Phase 2: dw_I += X w_J + Pk dO_J over keys j0..j0+31, 16 at a time.
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
      uint32_t ax[4], ap[4];
      a_from_c<T>(ax, s[2 * kb], s[2 * kb + 1]);
      a_from_c<T>(ap, dk[2 * kb], dk[2 * kb + 1]);
      const int off = (j0 + 16 * kb) * LDT + bk_off;  // B[j][c] = w_J[j][c], dO_J[j][c]
      mma_stacked<T, S::NT>(acc, ax, ap, wj + off, gj + off);
    }
  }
}

// dw rows i0 + 16 warp + g (+ 8), columns 8 nt + 2t (+ 1) from C fragments; bounds-checked.
template <typename T, int P>
__device__ __forceinline__ void store_rows(const float (&acc)[P / 8][4], const HeadView<T>& hv,
                                           const MssaParams<T>& prm, int i0, int warp, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int i = i0 + 16 * warp + lane / 4 + 8 * h;
    if (i >= prm.n) continue;
    T* row = hv.dw + static_cast<int64_t>(i) * prm.d_s.n;
#pragma unroll
    for (int nt = 0; nt < P / 8; ++nt) {
      const int c = 8 * nt + 2 * (lane % 4);
      if (c + 1 < prm.p) {
        *reinterpret_cast<uint32_t*>(row + c) = pack2<T>(acc[nt][2 * h], acc[nt][2 * h + 1]);
      } else if (c < prm.p) {
        row[c] = from_f32<T>(acc[nt][2 * h]);
      }
    }
  }
}

template <typename T, int P>
struct HeadLayout {
  using S = MmaShape<T, P>;
  // tiles: w and dO of every tile, lse and delta of every tile, dw of tiles 1.. in fp32, then X and Pq.
  static size_t bytes(int tiles) {
    return tiles * (2 * S::kTile + 2 * S::kStats) + (tiles - 1) * S::kAcc + 2 * S::kStage;
  }
};

__device__ __forceinline__ void wait_tiles_in_flight(int pending) {  // cp.async.wait_group takes a constant
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    default: cp_async_wait<3>(); break;
  }
}

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) mssa_bwd_mma_head_kernel(MssaParams<T> prm) {
#if CK_TENSOR_CORE_ARCH
  using S = MmaShape<T, P>;
  constexpr int NT = S::NT;
  const int tiles = static_cast<int>(cdiv(prm.n, S::BT));  // 1..4
  unsigned char* smem = dynamic_smem();
  T* w_all = reinterpret_cast<T*>(smem);                          // [tiles][BT][LDT]
  T* g_all = w_all + tiles * S::BT * S::LDT;                      // [tiles][BT][LDT]
  float* lse_all = reinterpret_cast<float*>(g_all + tiles * S::BT * S::LDT);  // [tiles][BT]
  float* dl_all = lse_all + tiles * S::BT;                        // [tiles][BT]
  float4* dw_acc = reinterpret_cast<float4*>(dl_all + tiles * S::BT);  // [tiles - 1][warp][NT][lane]
  T* xs = reinterpret_cast<T*>(reinterpret_cast<float*>(dw_acc) + (tiles - 1) * S::BT * P);  // [BT][LDX]
  T* pqs = xs + S::BT * S::LDX;                                   // [BT][LDX]

  const HeadView<T> hv = head_at(prm, blockIdx.x, 0);  // one block per (batch, head)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int t = 0; t < tiles; ++t) {
    tile_async<T, P>(w_all + t * S::BT * S::LDT, g_all + t * S::BT * S::LDT, lse_all + t * S::BT,
                     dl_all + t * S::BT, hv, prm, t * S::BT);
    cp_async_commit();
  }
  const auto tile_w = [&](int t) { return w_all + t * S::BT * S::LDT; };
  const auto tile_g = [&](int t) { return g_all + t * S::BT * S::LDT; };
  const auto acc_slot = [&](int t) { return dw_acc + ((t - 1) * 4 + warp) * NT * 32 + lane; };

  for (int ti = 0; ti < tiles; ++ti) {
    float acc[NT][4] = {};
    RowStats st{};
    for (int tj = ti; tj < tiles; ++tj) {
      if (ti == 0) {
        wait_tiles_in_flight(tiles - 1 - tj);  // tile tj has landed
        __syncthreads();
      } else if (tj > ti) {
        __syncthreads();  // the last phase 3 is done with xs, pqs
      }
      if (tj == ti) st = row_stats(lse_all + ti * S::BT, dl_all + ti * S::BT, warp, lane);
      const bool off_diagonal = tj > ti;
      if (off_diagonal) {
        pair_rows<T, P, true>(acc, tile_w(ti), tile_g(ti), tile_w(tj), tile_g(tj), lse_all + tj * S::BT,
                              dl_all + tj * S::BT, st, prm.scale, xs, pqs, warp, lane);
        __syncthreads();  // xs, pqs hold X and Pq of all 64 rows of I
        // Phase 3: this warp's rows 16 warp.. of dw_J += X^T w_I + Pq^T dO_I over the 64 rows of I.
        float acc_j[NT][4];
        float4* slot = acc_slot(tj);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float4 v = ti == 0 ? make_float4(0.f, 0.f, 0.f, 0.f) : slot[nt * 32];
          acc_j[nt][0] = v.x;
          acc_j[nt][1] = v.y;
          acc_j[nt][2] = v.z;
          acc_j[nt][3] = v.w;
        }
        const int at_off = 16 * warp + rows8_offset<S::LDX>(lane), bk_off = rows16_offset<S::LDT>(lane);
#pragma unroll
        for (int kb = 0; kb < S::BT / 16; ++kb) {
          uint32_t ax[4], ap[4];  // A[j][i] = X[i][j], Pq[i][j] for rows i in 16 kb..
          ldsm_x4_trans(ax, xs + 16 * kb * S::LDX + at_off);
          ldsm_x4_trans(ap, pqs + 16 * kb * S::LDX + at_off);
          const int off = 16 * kb * S::LDT + bk_off;  // B[i][c] = w_I[i][c], dO_I[i][c]
          mma_stacked<T, NT>(acc_j, ax, ap, tile_w(ti) + off, tile_g(ti) + off);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          slot[nt * 32] = make_float4(acc_j[nt][0], acc_j[nt][1], acc_j[nt][2], acc_j[nt][3]);
      } else {
        pair_rows<T, P, false>(acc, tile_w(ti), tile_g(ti), tile_w(ti), tile_g(ti), lse_all + ti * S::BT,
                               dl_all + ti * S::BT, st, prm.scale, nullptr, nullptr, warp, lane);
      }
    }
    if (ti > 0) {  // what the pairs (I', I), I' < I, gave tile I
      const float4* slot = acc_slot(ti);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float4 v = slot[nt * 32];
        acc[nt][0] += v.x;
        acc[nt][1] += v.y;
        acc[nt][2] += v.z;
        acc[nt][3] += v.w;
      }
    }
    store_rows<T, P>(acc, hv, prm, ti * S::BT, warp, lane);
  }
#else
  __trap();
#endif
}

template <typename T, int P>
struct TiledLayout {
  using S = MmaShape<T, P>;
  // w_I, dO_I, then two stages of w_J, dO_J; stats: lse_I, delta_I, then two stages of lse_J, delta_J.
  static constexpr int BM = S::BT;
  static constexpr size_t kBytes = 6 * S::kTile + 6 * S::kStats;
};

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) mssa_bwd_mma_tiled_kernel(MssaParams<T> prm) {
#if CK_TENSOR_CORE_ARCH
  using S = MmaShape<T, P>;
  constexpr int NT = S::NT, TILE = S::BT * S::LDT;
  T* tiles = reinterpret_cast<T*>(dynamic_smem());  // [6][BT][LDT]: w_I, dO_I, then w_J, dO_J of stage 0, 1
  float* stats = reinterpret_cast<float*>(tiles + 6 * TILE);  // [6][BT]: lse_I, delta_I, then lse_J, delta_J
  const auto stage_tile = [&](int stage) { return tiles + (2 + 2 * stage) * TILE; };  // w_J; dO_J follows
  const auto stage_stats = [&](int stage) { return stats + (2 + 2 * stage) * S::BT; };  // lse_J; delta_J follows

  const HeadView<T> hv = head_view<kMmaRows>(prm);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_tiles = static_cast<int>(cdiv(prm.n, S::BT));
  tile_async<T, P>(tiles, tiles + TILE, stats, stats + S::BT, hv, prm, hv.i0);
  tile_async<T, P>(stage_tile(0), stage_tile(0) + TILE, stage_stats(0), stage_stats(0) + S::BT, hv, prm, 0);
  cp_async_commit();

  float acc[NT][4] = {};
  RowStats st{};
  for (int tj = 0; tj < key_tiles; ++tj) {
    cp_async_wait<0>();
    __syncthreads();  // tile tj has landed, and every warp is done with tile tj - 1 (the buffer refilled next)
    if (tj + 1 < key_tiles) {
      const int b = (tj + 1) % 2;
      tile_async<T, P>(stage_tile(b), stage_tile(b) + TILE, stage_stats(b), stage_stats(b) + S::BT, hv, prm,
                       (tj + 1) * S::BT);
      cp_async_commit();
    }
    if (tj == 0) st = row_stats(stats, stats + S::BT, warp, lane);
    const T* wj = stage_tile(tj % 2);
    const float* lse_j = stage_stats(tj % 2);
    pair_rows<T, P, false>(acc, tiles, tiles + TILE, wj, wj + TILE, lse_j, lse_j + S::BT, st, prm.scale, nullptr,
                           nullptr, warp, lane);
  }
  store_rows<T, P>(acc, hv, prm, hv.i0, warp, lane);
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
cudaError_t launch_main(const MssaParams<T>& prm, int64_t bh, ck_kernel kernel, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (kernel == CK_KERNEL_WMMA) return launch_rows<WmmaLayout<T, P>>(mssa_bwd_wmma_kernel<T, P>, prm, bh, stream);
    if (kernel == CK_KERNEL_MMA && prm.n <= 4 * kMmaRows) {
      const size_t bytes = HeadLayout<T, P>::bytes(static_cast<int>(cdiv(prm.n, kMmaRows)));
      int optin = 0;
      CK_RETURN_IF_ERROR(smem_optin(&optin));
      if (bytes <= static_cast<size_t>(optin)) {  // else the tiled kernel
        if (bh > kMaxGridX) return cudaErrorInvalidConfiguration;
        CK_RETURN_IF_ERROR(allow_dynamic_smem(mssa_bwd_mma_head_kernel<T, P>, bytes));
        mssa_bwd_mma_head_kernel<T, P><<<static_cast<unsigned>(bh), kThreads, bytes, stream>>>(prm);
        return cudaGetLastError();
      }
    }
    if (kernel == CK_KERNEL_MMA || kernel == CK_KERNEL_MMA_TILED)
      return launch_rows<TiledLayout<T, P>>(mssa_bwd_mma_tiled_kernel<T, P>, prm, bh, stream);
  }
  return launch_rows<FmaLayout<P>>(mssa_bwd_fma_kernel<T, P>, prm, bh, stream);
}

// Whether the mma kernels can move rows of this (B, H, N, p) tensor with 16-byte cp.async: a 16-byte aligned
// start and strides of 8 elements (16 bytes) along every dimension with more than one index.
bool rows_aligned(const void* ptr, ck_strides3 s, int64_t batch, int64_t heads, int64_t n) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (batch == 1 || s.b % 8 == 0) &&
         (heads == 1 || s.h % 8 == 0) && (n == 1 || s.n % 8 == 0);
}

}  // namespace
}  // namespace ck

extern "C" cudaError_t ck_mssa_backward(const void* dout, ck_strides3 dout_strides, const void* w,
                                        ck_strides3 w_strides, const void* out, ck_strides3 out_strides,
                                        const float* lse, void* dw, ck_strides3 dw_strides, float* delta,
                                        int64_t batch, int64_t heads, int64_t n, int64_t p, float scale,
                                        ck_dtype dtype, ck_kernel kernel, cudaStream_t stream) {
  using namespace ck;
  if (batch < 0 || heads < 0 || n < 1 || p < 1 || p > CK_MSSA_MAX_HEAD_DIM || n > INT32_MAX ||
      heads > INT32_MAX || !(scale > 0.f) || kernel < CK_KERNEL_AUTO || kernel > CK_KERNEL_MMA_TILED)
    return cudaErrorInvalidValue;
  const int64_t bh = batch * heads;
  if (bh == 0) return cudaSuccess;
  if (!dout || !w || !out || !lse || !dw || !delta) return cudaErrorInvalidValue;
  const bool aligned = rows_aligned(w, w_strides, batch, heads, n) &&
                       rows_aligned(dout, dout_strides, batch, heads, n) &&
                       rows_aligned(dw, dw_strides, batch, heads, n);
  CK_RETURN_IF_ERROR(resolve_kernel(kernel, dtype, aligned));
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
    if (p <= 32) return launch_main<T, 32>(prm, bh, kernel, stream);
    if (p <= 48) return launch_main<T, 48>(prm, bh, kernel, stream);
    if (p <= 64) return launch_main<T, 64>(prm, bh, kernel, stream);
    if (p <= 96) return launch_main<T, 96>(prm, bh, kernel, stream);
    return launch_main<T, 128>(prm, bh, kernel, stream);
  });
}
