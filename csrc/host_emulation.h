// Runs the csrc/ kernels on the CPU, for tests/test_csrc.py on machines without a GPU (never part of the
// extension). Included first (g++ -include) into a .cu whose `k<<<grid, block, smem, stream>>>(args)`
// launches the test has rewritten to `ck_emu::Launch(k, grid, block, smem, stream)(args)`.
//
// Execution: blocks run one after another; within a block every CUDA thread is a fiber (ucontext) with its
// own stack, and one fiber runs at a time, from one synchronization point to the next, in a seeded random
// order that keeps a warp running until all its lanes wait at __syncthreads. So a missing __syncthreads or
// __syncwarp shows up as a read of data not yet written (or already overwritten), and a run is reproducible.
// Synchronization points: __syncthreads (all threads of the block that have not exited), and the warp
// collectives, which need all 32 lanes of the warp at the same operation: __syncwarp, __shfl_xor_sync, and
// the tensor-core primitives of mma.cuh (below).
// A block whose fibers all wait is a deadlock and aborts.
//
// Memory: dynamic shared memory is a buffer of exactly the launch's size filled with 0xFF bytes (NaN in
// every float type), so a read of shared memory nobody wrote shows up as NaN; launches check their
// configuration like the driver (grid and block limits, dynamic shared memory above 48 KB only after
// cudaFuncSetAttribute).
//
// Tensor cores, per lane as the PTX ISA defines the fragments (mma.cuh):
//   ldmatrix  lane l addresses row l % 8 of 8x8 matrix l / 8 (16-byte aligned, inside shared memory);
//             register q of lane l gets elements (l / 4, 2 (l % 4) + {0, 1}) of matrix q, transposed with .trans
//   mma       m16n8k16, A row-major 16x16, B col-major 16x8, C/D 16x8 fp32, with g = lane / 4, t = lane % 4:
//             a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (2t.., g), b1 (2t+8.., g);
//             c0 c1 (g, 2t..), c2 c3 (g+8, 2t..); products exact in fp32, summed in fp32
//   cp.async  queued per thread; commit closes a group; wait_group N performs, in order, the copies of all
//             but the newest N committed groups (the latest moment the hardware may complete them), with the
//             zero fill past src_bytes; addresses must be aligned to the copy size and land in shared memory.
// nvcuda::wmma is emulated through its documented collective API: every lane holds the whole 16 x 16 tile,
// loads check the 256-bit pointer alignment and the ldm rules, lane 0 does the stores, fp32 accumulation.
// The emulated device: compute capability 9.0, kEmuSMs multiprocessors, 227 KB opt-in shared memory.
#pragma once

#define CK_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <tuple>
#include <type_traits>
#include <utility>
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
constexpr size_t kStackBytes = 256 * 1024;  // per fiber, above a guard page

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "host_emulation: %s\n", what);
  std::abort();
}

struct Copy {  // one cp.async
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Fiber {
  ucontext_t ctx;
  uint3 thread_idx;
  bool done = false;
  std::vector<Copy> open_group;              // cp.async issued since the last commit
  std::deque<std::vector<Copy>> committed;   // oldest first
};

// A warp collective in progress: the lanes that arrived, each with a pointer to its operands.
struct Rendezvous {
  const char* what = nullptr;
  unsigned arrived = 0;
  void* slots[32] = {};
  std::vector<Fiber*> waiting;
};

struct Block {
  dim3 block_idx;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<Rendezvous> warps;
  std::vector<Fiber*> ready, barrier_waiting;
  unsigned barrier_arrived = 0, alive = 0;
  uint64_t rng = 0;
  ucontext_t scheduler;
  std::function<void()> body;
};

inline Block* cur_block = nullptr;
inline Fiber* cur_fiber = nullptr;
inline dim3 cur_block_dim, cur_grid_dim;
inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, int> max_dynamic_smem;  // set through cudaFuncSetAttribute

// Fiber stacks, reused across blocks; each has a PROT_NONE guard page below it.
inline std::vector<unsigned char*>& stack_pool() {
  static std::vector<unsigned char*> pool;
  return pool;
}
inline unsigned char* stack(size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    const size_t page = 4096, bytes = kStackBytes + page;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) fail("cannot map a fiber stack");
    pool.push_back(static_cast<unsigned char*>(p) + page);
  }
  return pool[i];
}

// The running fiber waits (it was queued where it waits) and the scheduler picks another.
inline void block_here() {
  if (swapcontext(&cur_fiber->ctx, &cur_block->scheduler) != 0) fail("swapcontext");
}
inline void make_ready(std::vector<Fiber*>& fibers) {
  for (Fiber* f : fibers) cur_block->ready.push_back(f);
  fibers.clear();
}

inline void perform(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
  }
}

inline void fiber_main() {
  cur_block->body();
  Fiber& f = *cur_fiber;
  if (!f.open_group.empty() || !f.committed.empty()) fail("a thread exited with cp.async copies not waited for");
  f.done = true;
  Block& b = *cur_block;
  --b.alive;  // an exited thread no longer takes part in __syncthreads
  if (b.barrier_arrived > 0 && b.barrier_arrived == b.alive) {
    b.barrier_arrived = 0;
    make_ready(b.barrier_waiting);
  }
}  // returns to the scheduler through uc_link

// Runs one block to completion.
inline void run_block(Block& b, unsigned threads) {
  b.fibers.resize(threads);
  b.warps.resize(threads / 32);
  b.alive = threads;
  b.rng = 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(b.block_idx.x) << 32) ^ (b.block_idx.y << 16) ^ b.block_idx.z;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.thread_idx = {t, 0, 0};
    if (getcontext(&f.ctx) != 0) fail("getcontext");
    f.ctx.uc_stack.ss_sp = stack(t);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
    b.ready.push_back(&f);
  }
  cur_block = &b;
  std::vector<size_t> same_warp;
  unsigned last_warp = ~0u;
  while (!b.ready.empty()) {
    // A random runnable lane of the warp that ran last, else of a random warp: a warp runs ahead until it
    // waits at __syncthreads, so a read of another warp's data, or an overwrite of data another warp still
    // reads, that no barrier orders comes out stale (likewise between the lanes of a warp).
    same_warp.clear();
    for (size_t i = 0; i < b.ready.size(); ++i)
      if (b.ready[i]->thread_idx.x / 32 == last_warp) same_warp.push_back(i);
    b.rng = b.rng * 6364136223846793005ull + 1442695040888963407ull;
    const size_t draw = static_cast<size_t>(b.rng >> 33);
    const size_t pick = same_warp.empty() ? draw % b.ready.size() : same_warp[draw % same_warp.size()];
    cur_fiber = b.ready[pick];
    last_warp = cur_fiber->thread_idx.x / 32;
    b.ready[pick] = b.ready.back();
    b.ready.pop_back();
    if (swapcontext(&b.scheduler, &cur_fiber->ctx) != 0) fail("swapcontext");
  }
  for (const Fiber& f : b.fibers)
    if (!f.done) fail("deadlock: threads wait at a barrier or warp collective that the others never reach");
  cur_block = nullptr;
  cur_fiber = nullptr;
}

// All 32 lanes of the running fiber's warp meet at `what`; the last to arrive runs op(lanes), where
// lanes[l] points to lane l's `args`, then all go on.
template <typename Args, typename Op>
void warp_collective(const char* what, Args& args, Op&& op) {
  Fiber& f = *cur_fiber;
  Rendezvous& r = cur_block->warps[f.thread_idx.x / 32];
  if (r.arrived == 0) {
    r.what = what;
  } else if (std::strcmp(r.what, what) != 0) {
    std::fprintf(stderr, "host_emulation: lanes of warp %u meet at %s and %s\n", f.thread_idx.x / 32, r.what, what);
    std::abort();
  }
  r.slots[f.thread_idx.x % 32] = &args;
  if (++r.arrived < 32) {
    r.waiting.push_back(&f);
    block_here();
    return;
  }
  Args* lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = static_cast<Args*>(r.slots[l]);
  op(lanes);
  r.arrived = 0;
  make_ready(r.waiting);
}

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
    std::vector<unsigned char> smem(smem_ + 128);
    unsigned char* base = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
    cur_block_dim = block_;
    cur_grid_dim = grid_;
    for (unsigned bz = 0; bz < grid_.z; ++bz)
      for (unsigned by = 0; by < grid_.y; ++by)
        for (unsigned bx = 0; bx < grid_.x; ++bx) {
          std::memset(base, 0xFF, smem_);
          Block b;
          b.block_idx = dim3(bx, by, bz);
          b.smem = base;
          b.smem_bytes = smem_;
          b.body = [&] { std::apply(kernel_, params); };
          run_block(b, threads);
        }
  }

 private:
  Kernel kernel_;
  dim3 grid_, block_;
  size_t smem_;
};

template <typename... P>
Launch(void (*)(P...), dim3, dim3, size_t, cudaStream_t) -> Launch<P...>;

// Whether [p, p + bytes) lies in the running block's dynamic shared memory.
inline bool in_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= cur_block->smem && c + bytes <= cur_block->smem + cur_block->smem_bytes;
}

}  // namespace ck_emu

#define threadIdx (ck_emu::cur_fiber->thread_idx)
#define blockIdx (ck_emu::cur_block->block_idx)
#define blockDim ck_emu::cur_block_dim
#define gridDim ck_emu::cur_grid_dim

inline void __syncthreads() {
  ck_emu::Block& b = *ck_emu::cur_block;
  if (++b.barrier_arrived < b.alive) {
    b.barrier_waiting.push_back(ck_emu::cur_fiber);
    ck_emu::block_here();
    return;
  }
  b.barrier_arrived = 0;
  ck_emu::make_ready(b.barrier_waiting);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ck_emu::fail("__syncwarp with a partial mask");
  int none = 0;
  ck_emu::warp_collective("__syncwarp", none, [](int**) {});
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) ck_emu::fail("__shfl_xor_sync with a partial mask");
  struct Args {
    float in, out;
    int lane_mask;
  } args{v, 0.f, lane_mask};
  ck_emu::warp_collective("__shfl_xor_sync", args, [](Args** lanes) {
    for (int l = 0; l < 32; ++l) {
      if (lanes[l]->lane_mask != lanes[0]->lane_mask) ck_emu::fail("__shfl_xor_sync with lane masks that differ");
      lanes[l]->out = lanes[l ^ lanes[0]->lane_mask]->in;
    }
  });
  return args.out;
}
[[noreturn]] inline void __trap() { ck_emu::fail("__trap"); }

namespace ck {
inline unsigned char* dynamic_smem() { return ck_emu::cur_block->smem; }
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

// The tensor-core primitives of mma.cuh, per lane (see the top of this file).
namespace ck {

template <typename T>
float bits_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  } else {
    __nv_bfloat16_raw r;
    r.x = bits;
    return __bfloat162float(__nv_bfloat16(r));
  }
}

template <int NUM, bool TRANS>
void ldmatrix(uint32_t* r, const void* row) {
  struct Args {
    uint32_t* r;
    const void* row;
  } args{r, row};
  ck_emu::warp_collective(TRANS ? "ldmatrix.trans" : "ldmatrix", args, [](Args** lanes) {
    uint16_t m[NUM][8][8];
    for (int q = 0; q < NUM; ++q)
      for (int i = 0; i < 8; ++i) {
        const void* p = lanes[8 * q + i]->row;
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ck_emu::fail("ldmatrix row address not 16-byte aligned");
        if (!ck_emu::in_smem(p, 16)) ck_emu::fail("ldmatrix row outside the block's shared memory");
        std::memcpy(m[q][i], p, 16);
      }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int q = 0; q < NUM; ++q) {
        const uint16_t lo = TRANS ? m[q][2 * t][g] : m[q][g][2 * t];
        const uint16_t hi = TRANS ? m[q][2 * t + 1][g] : m[q][g][2 * t + 1];
        lanes[l]->r[q] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
      }
    }
  });
}

inline void ldsm_x4(uint32_t (&r)[4], const void* row) { ldmatrix<4, false>(r, row); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* row) { ldmatrix<4, true>(r, row); }

template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Args {
    float* d;
    const uint32_t* a;
    const uint32_t* b;
  } args{d, a, b};
  ck_emu::warp_collective("mma.m16n8k16", args, [](Args** lanes) {
    float A[16][16], B[16][8], C[16][8];
    const auto lo = [](uint32_t v) { return bits_to_float<T>(static_cast<uint16_t>(v & 0xFFFFu)); };
    const auto hi = [](uint32_t v) { return bits_to_float<T>(static_cast<uint16_t>(v >> 16)); };
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const Args& x = *lanes[l];
      for (int h = 0; h < 2; ++h) {  // h: the second pair of k (a2, a3, b1)
        A[g][2 * t + 8 * h] = lo(x.a[2 * h]);
        A[g][2 * t + 8 * h + 1] = hi(x.a[2 * h]);
        A[g + 8][2 * t + 8 * h] = lo(x.a[2 * h + 1]);
        A[g + 8][2 * t + 8 * h + 1] = hi(x.a[2 * h + 1]);
        B[2 * t + 8 * h][g] = lo(x.b[h]);
        B[2 * t + 8 * h + 1][g] = hi(x.b[h]);
      }
      C[g][2 * t] = x.d[0];
      C[g][2 * t + 1] = x.d[1];
      C[g + 8][2 * t] = x.d[2];
      C[g + 8][2 * t + 1] = x.d[3];
    }
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float s = C[m][n];
        for (int k = 0; k < 16; ++k) s += A[m][k] * B[k][n];
        C[m][n] = s;
      }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      float* d = lanes[l]->d;
      d[0] = C[g][2 * t];
      d[1] = C[g][2 * t + 1];
      d[2] = C[g + 8][2 * t];
      d[3] = C[g + 8][2 * t + 1];
    }
  });
}

template <int BYTES>
void cp_async(void* dst, const void* src, int src_bytes) {
  constexpr int bytes = BYTES;
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0)
    ck_emu::fail("cp.async address not aligned to the copy size");
  if (!ck_emu::in_smem(dst, static_cast<size_t>(bytes))) ck_emu::fail("cp.async destination outside shared memory");
  if (src_bytes < 0 || src_bytes > bytes || (src_bytes > 0 && src == nullptr)) ck_emu::fail("cp.async source size");
  ck_emu::cur_fiber->open_group.push_back({dst, src, bytes, src_bytes});
}
inline void cp_async_commit() {
  ck_emu::Fiber& f = *ck_emu::cur_fiber;
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}
template <int N>
void cp_async_wait() {
  ck_emu::Fiber& f = *ck_emu::cur_fiber;
  while (f.committed.size() > static_cast<size_t>(N)) {
    ck_emu::perform(f.committed.front());
    f.committed.pop_front();
  }
}

}  // namespace ck

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
