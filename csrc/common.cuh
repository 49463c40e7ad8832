// Device helpers shared by the CRATE backward kernels: dtype conversion, tile fills, launch plumbing.
// Written against the CUDA headers only and valid under torch's -D__CUDA_NO_HALF_CONVERSIONS__ family.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "crate_kernels.h"

// wmma on bf16 needs sm_80; older targets compile the tensor-core kernels to a trap (the launchers
// refuse tensor cores below compute capability 8.0, so that body never runs).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define CK_TENSOR_CORE_ARCH 1
#else
#define CK_TENSOR_CORE_ARCH 0
#endif

namespace ck {

// Between float and the kernels' element types (float, __half, __nv_bfloat16); to a 16-bit type it rounds to nearest
// even, as torch's .to(dtype) does.
template <typename T>
inline constexpr bool is_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  static_assert(is_element_v<To> && is_element_v<From> && (std::is_same_v<To, float> || std::is_same_v<From, float>),
                "convert: float to or from float, __half or __nv_bfloat16");
  if constexpr (std::is_same_v<To, From>) return v;
  else if constexpr (std::is_same_v<From, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<From, __nv_bfloat16>) return __bfloat162float(v);
  else if constexpr (std::is_same_v<To, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}
template <typename T>
__device__ __forceinline__ float to_f32(T v) { return convert<float>(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float v) { return convert<T>(v); }

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int clamp(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

// dst[r * LD + c] = f(r, c) for an R x C tile, all threads of the block taking part. ROW_FAST makes r the
// index that varies fastest across threads: pick the one along which the global source is contiguous.
template <int R, int C, int LD, bool ROW_FAST, typename S, typename F>
__device__ __forceinline__ void fill_tile(S* dst, F f) {
  for (int idx = threadIdx.x; idx < R * C; idx += blockDim.x) {
    const int r = ROW_FAST ? idx % R : idx / C;
    const int c = ROW_FAST ? idx / R : idx % C;
    dst[r * LD + c] = from_f32<S>(f(r, c));
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the storage type named by `dtype`.
template <typename F>
cudaError_t dispatch_dtype(ck_dtype dtype, F&& f) {
  switch (dtype) {
    case CK_FLOAT32: return f(TypeTag<float>{});
    case CK_FLOAT16: return f(TypeTag<__half>{});
    case CK_BFLOAT16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

#define CK_RETURN_IF_ERROR(call)                  \
  do {                                            \
    const cudaError_t ck_err_ = (call);           \
    if (ck_err_ != cudaSuccess) return ck_err_;   \
  } while (0)

// Compute capability major of the current device.
inline cudaError_t device_major(int* major) {
  int dev = 0;
  CK_RETURN_IF_ERROR(cudaGetDevice(&dev));
  return cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, dev);
}

// Resolves CK_KERNEL_AUTO (fp32 or compute capability < 8.0: fma; else mma where `aligned`, else wmma) and
// checks an explicit choice: the tensor-core kernels take fp16/bf16 on compute capability >= 8.0
// (cudaErrorNotSupported below), the mma ones only `aligned` operands.
inline cudaError_t resolve_kernel(ck_kernel& kernel, ck_dtype dtype, bool aligned) {
  const bool low_precision = dtype != CK_FLOAT32;
  int major = 0;
  if (low_precision) CK_RETURN_IF_ERROR(device_major(&major));
  if (kernel == CK_KERNEL_AUTO)
    kernel = !low_precision || major < 8 ? CK_KERNEL_FMA : aligned ? CK_KERNEL_MMA : CK_KERNEL_WMMA;
  if (kernel == CK_KERNEL_FMA) return cudaSuccess;
  if (!low_precision) return cudaErrorInvalidValue;
  if (major < 8) return cudaErrorNotSupported;
  return kernel != CK_KERNEL_WMMA && !aligned ? cudaErrorInvalidValue : cudaSuccess;
}

// The most dynamic shared memory a block of the current device may opt in to.
inline cudaError_t smem_optin(int* bytes) {
  int dev = 0;
  CK_RETURN_IF_ERROR(cudaGetDevice(&dev));
  return cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
}

// Allows `kernel` `smem_bytes` of dynamic shared memory (opting in above 48 KB where the device has it).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t smem_bytes) {
  int optin = 0;
  CK_RETURN_IF_ERROR(smem_optin(&optin));
  if (smem_bytes > static_cast<size_t>(optin)) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
}

constexpr int64_t kMaxGridX = 2147483647;

// The block's dynamic shared memory, 128-byte aligned. host_emulation.h supplies its own under
// CK_HOST_EMULATION, where tests/test_csrc.py runs these kernels on the CPU.
#ifndef CK_HOST_EMULATION
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char ck_dynamic_smem[];
  return ck_dynamic_smem;
}
#endif

}  // namespace ck
