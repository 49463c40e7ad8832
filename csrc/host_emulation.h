// Runs the csrc/ kernels on the CPU, for tests/test_csrc.py on machines without a GPU (never part of the
// extension). Included first (g++ -include) into a .cu whose `k<<<grid, block, smem, stream>>>(args)`
// launches the test has rewritten to `ck_emu::Launch(k, grid, block, smem, stream)(args)`.
//
// Semantics kept: each block runs on its own set of std::threads, one per CUDA thread, blocks one after
// another; __syncthreads is a block barrier, __syncwarp and __shfl_xor_sync are barriers of the 32 lanes of
// a warp (so a missing __syncthreads between warps is a real race here too); dynamic shared memory is a
// heap buffer of exactly the launch's size, filled with 0xFF bytes (NaN in every float type) so that a read
// of shared memory nobody wrote shows up as NaN; launches check their configuration like the driver (grid
// and block limits, dynamic shared memory above 48 KB only after cudaFuncSetAttribute). nvcuda::wmma is
// emulated through its documented collective API: every lane holds the whole 16 x 16 tile, loads check the
// 256-bit pointer alignment and the ldm rules, lane 0 does the stores, products are accumulated in fp32.
// The emulated device: compute capability 9.0, kEmuSMs multiprocessors, 227 KB opt-in shared memory.
#pragma once

#define CK_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)

namespace ck_emu {

constexpr int kEmuSMs = 8;
constexpr int kOptinSmem = 227 * 1024;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "host_emulation: %s\n", what);
  std::abort();
}

struct BlockState {
  explicit BlockState(unsigned threads, size_t smem_bytes)
      : block(threads),
        smem(static_cast<unsigned char*>(::operator new(smem_bytes > 0 ? smem_bytes : 1, std::align_val_t{128}))),
        shuffle(threads) {
    std::memset(smem, 0xFF, smem_bytes > 0 ? smem_bytes : 1);
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  ~BlockState() { ::operator delete(smem, std::align_val_t{128}); }
  BlockState(const BlockState&) = delete;
  BlockState& operator=(const BlockState&) = delete;
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  unsigned char* smem;  // 128-byte aligned, exactly the launch's size
  std::vector<float> shuffle;
};

inline thread_local uint3 tl_thread_idx, tl_block_idx;
inline thread_local dim3 tl_block_dim, tl_grid_dim;
inline thread_local BlockState* tl_state = nullptr;
inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, int> max_dynamic_smem;  // set through cudaFuncSetAttribute

inline std::barrier<>& warp_barrier() { return *tl_state->warps[tl_thread_idx.x / 32]; }

// Runs kernel(args...) over the grid; records a launch error instead, as the driver would.
template <typename... P>
struct Launch {
  using Kernel = void (*)(P...);
  Launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t)
      : kernel_(kernel), grid_(grid), block_(block), smem_(smem) {}

  template <typename... A>
  void operator()(A&&... args) const {
    const unsigned threads = block_.x * block_.y * block_.z;
    const auto limit = max_dynamic_smem.find(reinterpret_cast<const void*>(kernel_));
    const size_t smem_limit = limit == max_dynamic_smem.end() ? 48 * 1024 : static_cast<size_t>(limit->second);
    if (grid_.x == 0 || grid_.y == 0 || grid_.z == 0 || grid_.y > 65535 || grid_.z > 65535 || threads == 0 ||
        threads > 1024 || block_.y != 1 || block_.z != 1 || threads % 32 != 0) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    if (smem_ > smem_limit) {
      last_error = cudaErrorInvalidValue;
      return;
    }
    const std::tuple<P...> params(std::forward<A>(args)...);  // converted once, as the launch copies them
    for (unsigned bz = 0; bz < grid_.z; ++bz)
      for (unsigned by = 0; by < grid_.y; ++by)
        for (unsigned bx = 0; bx < grid_.x; ++bx) {
          BlockState state(threads, smem_);
          std::vector<std::thread> pool;
          pool.reserve(threads);
          for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
              tl_thread_idx = {t, 0, 0};
              tl_block_idx = {bx, by, bz};
              tl_block_dim = block_;
              tl_grid_dim = grid_;
              tl_state = &state;
              std::apply(kernel_, params);
            });
          for (auto& th : pool) th.join();
        }
  }

 private:
  Kernel kernel_;
  dim3 grid_, block_;
  size_t smem_;
};

template <typename... P>
Launch(void (*)(P...), dim3, dim3, size_t, cudaStream_t) -> Launch<P...>;

}  // namespace ck_emu

#define threadIdx ck_emu::tl_thread_idx
#define blockIdx ck_emu::tl_block_idx
#define blockDim ck_emu::tl_block_dim
#define gridDim ck_emu::tl_grid_dim

inline void __syncthreads() { ck_emu::tl_state->block.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ck_emu::fail("__syncwarp with a partial mask");
  ck_emu::warp_barrier().arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) ck_emu::fail("__shfl_xor_sync with a partial mask");
  auto& slots = ck_emu::tl_state->shuffle;
  const unsigned t = threadIdx.x, base = t / 32 * 32;
  slots[t] = v;
  ck_emu::warp_barrier().arrive_and_wait();
  const float out = slots[base + ((t % 32) ^ static_cast<unsigned>(lane_mask))];
  ck_emu::warp_barrier().arrive_and_wait();
  return out;
}
[[noreturn]] inline void __trap() { ck_emu::fail("__trap"); }

namespace ck {
inline unsigned char* dynamic_smem() { return ck_emu::tl_state->smem; }
}  // namespace ck

// The runtime calls the launchers make.
extern "C" {
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = ck_emu::kEmuSMs; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = ck_emu::kOptinSmem; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > ck_emu::kOptinSmem)
    return cudaErrorInvalidValue;
  ck_emu::max_dynamic_smem[func] = value;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t err = ck_emu::last_error;
  ck_emu::last_error = cudaSuccess;
  return err;
}
}
template <typename T>
cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {  // nvcc's overload
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// nvcuda::wmma for 16 x 16 x 16 tiles.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "host_emulation: 16x16x16 fragments only");
  float v[16][16];  // A: [m][k], B: [k][n], C: [m][n]
};

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
void check_tile_pointer(const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ck_emu::fail("wmma pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) ck_emu::fail("wmma ldm not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "host_emulation: accumulator loads are not used");
  check_tile_pointer(p, ldm);
  for (int r = 0; r < 16; ++r)  // r, c index the fragment's own [row][col]
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = to_float(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[r + c * ldm]);
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (auto& row : f.v)
    for (float& x : row) x = value;
}

template <typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m][n];
      for (int k = 0; k < 16; ++k) s += a.v[m][k] * b.v[k][n];
      out[m][n] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_tile_pointer(p, ldm);
  if (threadIdx.x % 32 != 0) return;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) (layout == mem_row_major ? p[m * ldm + n] : p[m + n * ldm]) = f.v[m][n];
}
}  // namespace wmma
}  // namespace nvcuda
