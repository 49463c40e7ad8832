// torch bindings of the CRATE backward launchers (crate_kernels.h): check tensors, allocate outputs and
// workspaces, launch on the current CUDA stream of the tensors' device, raise on any CUDA error.
// Uses only device-generic c10 headers (no CUDA torch headers), so it also builds against a CPU torch.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <tuple>

#include "crate_kernels.h"

namespace {

#define CK_CHECK_CUDA(call)                                                                          \
  do {                                                                                               \
    const cudaError_t err_ = (call);                                                                 \
    TORCH_CHECK(err_ == cudaSuccess, "crate_kernels CUDA extension: ", #call, " failed: ",            \
                cudaGetErrorName(err_), " (", cudaGetErrorString(err_), ")");                         \
  } while (0)

ck_dtype to_ck_dtype(const at::Tensor& t, const char* name) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "crate_kernels CUDA extension: ", name,
              " must be float32, float16 or bfloat16, got ", st);
  return st == at::kFloat ? CK_FLOAT32 : st == at::kHalf ? CK_FLOAT16 : CK_BFLOAT16;
}

cudaStream_t current_stream(const at::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

// A tensor argument and its name in the error messages.
struct Named {
  const at::Tensor& t;
  const char* name;
};

// Each tensor a CUDA tensor on `device`.
void check_on(std::initializer_list<Named> tensors, const at::Device& device) {
  for (const Named& a : tensors) {
    TORCH_CHECK(a.t.is_cuda(), "crate_kernels CUDA extension: ", a.name, " must be a CUDA tensor, got device ",
                a.t.device());
    TORCH_CHECK(a.t.device() == device, "crate_kernels CUDA extension: ", a.name, " is on ", a.t.device(),
                ", expected ", device);
  }
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "crate_kernels CUDA extension: ", name, " has shape ", t.sizes(), ", ",
              ref_name, " has ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "crate_kernels CUDA extension: ", name, " has dtype ",
              t.scalar_type(), ", ", ref_name, " has ", ref.scalar_type());
}

// Each tensor with unit stride along its last dimension (or at most one element there).
void check_unit_last(std::initializer_list<Named> tensors) {
  for (const Named& a : tensors)
    TORCH_CHECK(a.t.size(-1) <= 1 || a.t.stride(-1) == 1, "crate_kernels CUDA extension: ", a.name,
                " must have unit stride along its last dimension, got strides ", a.t.strides());
}

ck_strides3 strides_bhn(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The ck_kernel named `name`; "mma-tiled" only where `tiled_form` (MSSA).
ck_kernel to_ck_kernel(const std::string& name, bool tiled_form) {
  if (name == "auto") return CK_KERNEL_AUTO;
  if (name == "fma") return CK_KERNEL_FMA;
  if (name == "wmma") return CK_KERNEL_WMMA;
  if (name == "mma") return CK_KERNEL_MMA;
  if (name == "mma-tiled" && tiled_form) return CK_KERNEL_MMA_TILED;
  TORCH_CHECK(false, "crate_kernels CUDA extension: kernel must be one of 'auto', 'mma', ",
              tiled_form ? "'mma-tiled', " : "", "'wmma', 'fma', got '", name, "'");
}

// A tensor-core kernel named explicitly: fp16/bf16 on compute capability >= 8.0 (the launchers check too;
// this names the problem).
void check_tensor_core_kernel(ck_kernel kernel, const std::string& name, ck_dtype dtype, const at::Device& device) {
  if (kernel == CK_KERNEL_AUTO || kernel == CK_KERNEL_FMA) return;
  TORCH_CHECK(dtype != CK_FLOAT32, "crate_kernels CUDA extension: kernel '", name,
              "' takes float16 or bfloat16, got float32 (use 'fma' or 'auto')");
  int major = 0;
  CK_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  TORCH_CHECK(major >= 8, "crate_kernels CUDA extension: kernel '", name,
              "' needs compute capability >= 8.0, this device has ", major, ".x (use 'fma' or 'auto')");
}

// cp.async of the mma kernels moves 16 bytes: a 16-byte aligned start, and strides of 8 elements along the
// first `dims` dimensions (where a dimension has more than one index).
bool aligned_16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }
bool strides_aligned(const at::Tensor& t, int dims) {
  for (int i = 0; i < dims; ++i)
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  return aligned_16(t);
}

// Row stride of a 2-D tensor; any value is fine for fewer than two rows.
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// The checks the backward entry points open with: `ref` has `dims` dimensions (`layout` in the message), every
// tensor of `all` is a CUDA tensor on ref's device, those of `like_ref` have ref's shape and dtype; -> ref's dtype.
ck_dtype check_inputs(const Named& ref, int64_t dims, const char* layout, std::initializer_list<Named> all,
                      std::initializer_list<Named> like_ref) {
  TORCH_CHECK(ref.t.dim() == dims, "crate_kernels CUDA extension: ", ref.name, " must be ", layout, ", got shape ",
              ref.t.sizes());
  check_on(all, ref.t.device());
  const ck_dtype dtype = to_ck_dtype(ref.t, ref.name);
  for (const Named& a : like_ref) check_same(a.t, a.name, ref.t, ref.name);
  return dtype;
}

// dw (B, H, N, p) of out = softmax(scale w w^T) w from dout, w, out (B, H, N, p) and lse (B, H, N) fp32;
// any strides along B, H, N (the kernels read and write through them), unit stride along p.
at::Tensor mssa_backward(const at::Tensor& dout, const at::Tensor& w, const at::Tensor& out, const at::Tensor& lse,
                         double scale, const std::string& kernel_name) {
  const ck_dtype dtype = check_inputs({w, "w"}, 4, "(B, H, N, p)",
                                      {{w, "w"}, {dout, "dout"}, {out, "out"}, {lse, "lse"}},
                                      {{dout, "dout"}, {out, "out"}});
  const at::Device device = w.device();
  check_unit_last({{w, "w"}, {dout, "dout"}, {out, "out"}});
  const int64_t b = w.size(0), h = w.size(1), n = w.size(2), p = w.size(3);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == b && lse.size(1) == h &&
                  lse.size(2) == n && lse.is_contiguous(),
              "crate_kernels CUDA extension: lse must be a contiguous float32 (B, H, N) tensor, got ",
              lse.scalar_type(), " of shape ", lse.sizes());
  TORCH_CHECK(n >= 1 && p >= 1 && p <= CK_MSSA_MAX_HEAD_DIM,
              "crate_kernels CUDA extension: mssa_backward needs N >= 1 and 1 <= p <= ", CK_MSSA_MAX_HEAD_DIM,
              ", got shape ", w.sizes());
  TORCH_CHECK(scale > 0, "crate_kernels CUDA extension: scale must be positive, got ", scale);
  const ck_kernel kernel = to_ck_kernel(kernel_name, true);

  const c10::DeviceGuard guard(device);
  check_tensor_core_kernel(kernel, kernel_name, dtype, device);
  at::Tensor dw = at::empty_like(w);  // w's layout where w is dense; unit stride along p either way
  if (dw.numel() == 0) return dw;
  TORCH_CHECK((kernel != CK_KERNEL_MMA && kernel != CK_KERNEL_MMA_TILED) ||
                  (strides_aligned(w, 3) && strides_aligned(dout, 3) && strides_aligned(dw, 3)),
              "crate_kernels CUDA extension: kernel '", kernel_name, "' needs 16-byte aligned rows of w, dout and dw ",
              "(data pointers at multiples of 16 bytes, strides along B, H and N multiples of 8 elements), got w ",
              "strides ", w.strides(), ", dout strides ", dout.strides(), ", dw strides ", dw.strides(),
              " (use 'auto', which falls back to 'wmma')");
  at::Tensor delta = at::empty({b, h, n}, w.options().dtype(at::kFloat));
  CK_CHECK_CUDA(ck_mssa_backward(dout.data_ptr(), strides_bhn(dout), w.data_ptr(), strides_bhn(w), out.data_ptr(),
                                 strides_bhn(out), lse.data_ptr<float>(), dw.data_ptr(), strides_bhn(dw),
                                 delta.data_ptr<float>(), b, h, n, p, static_cast<float>(scale), dtype, kernel,
                                 current_stream(device)));
  return dw;
}

// dx = G + eta G M^T (x's dtype) and dM = eta x^T G (fp32) with G = dout * mask; an undefined tensor (None in
// Python) for a gradient that is not needed.
std::tuple<at::Tensor, at::Tensor> ista_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& m,
                                                 const at::Tensor& packed_mask, double step_size, bool need_dx,
                                                 bool need_dm, const std::string& kernel_name) {
  const ck_dtype dtype = check_inputs({x, "x"}, 2, "(rows, d)",
                                      {{x, "x"}, {dout, "dout"}, {m, "m"}, {packed_mask, "packed_mask"}},
                                      {{dout, "dout"}});
  const at::Device device = x.device();
  const int64_t rows = x.size(0), d = x.size(1);
  TORCH_CHECK(d >= 1, "crate_kernels CUDA extension: x must have d >= 1 columns, got shape ", x.sizes());
  TORCH_CHECK(m.scalar_type() == at::kFloat && m.dim() == 2 && m.size(0) == d && m.size(1) == d,
              "crate_kernels CUDA extension: m must be a float32 (d, d) tensor with d = ", d, ", got ",
              m.scalar_type(), " of shape ", m.sizes());
  TORCH_CHECK(packed_mask.scalar_type() == at::kByte && packed_mask.dim() == 2 && packed_mask.size(0) == rows &&
                  packed_mask.size(1) == (d + 7) / 8,
              "crate_kernels CUDA extension: packed_mask must be a uint8 (rows, ceil(d / 8)) = (", rows, ", ",
              (d + 7) / 8, ") tensor, got ", packed_mask.scalar_type(), " of shape ", packed_mask.sizes());
  check_unit_last({{x, "x"}, {dout, "dout"}, {m, "m"}, {packed_mask, "packed_mask"}});
  TORCH_CHECK(step_size > 0, "crate_kernels CUDA extension: step_size must be positive, got ", step_size);
  const ck_kernel kernel = to_ck_kernel(kernel_name, false);

  const c10::DeviceGuard guard(device);
  check_tensor_core_kernel(kernel, kernel_name, dtype, device);
  const bool mma_rows = d % 8 == 0 && row_stride(x) % 8 == 0 && row_stride(dout) % 8 == 0 && aligned_16(x) &&
                        aligned_16(dout) && row_stride(packed_mask) % 4 == 0 &&
                        reinterpret_cast<uintptr_t>(packed_mask.data_ptr()) % 4 == 0;
  TORCH_CHECK(kernel != CK_KERNEL_MMA || mma_rows, "crate_kernels CUDA extension: kernel 'mma' needs d % 8 == 0, ",
              "16-byte aligned rows of x and dout (data pointers at multiples of 16 bytes, row strides multiples of ",
              "8 elements) and 4-byte aligned rows of packed_mask, got x of shape ", x.sizes(), " strides ",
              x.strides(), ", dout strides ", dout.strides(), ", packed_mask strides ", packed_mask.strides(),
              " (use 'auto', which falls back to 'wmma')");
  const cudaStream_t stream = current_stream(device);
  const float eta = static_cast<float>(step_size);
  at::Tensor dx, dm;
  if (need_dx) {
    dx = at::empty({rows, d}, x.options());
    // M rounded to x's dtype, which the mma kernel reads (as torch's m.to(x.dtype) rounds it).
    at::Tensor m_lowp;
    if (dtype != CK_FLOAT32 && (kernel == CK_KERNEL_AUTO || kernel == CK_KERNEL_MMA))
      m_lowp = m.to(x.scalar_type()).contiguous();
    CK_CHECK_CUDA(ck_ista_backward_dx(dout.data_ptr(), row_stride(dout), packed_mask.data_ptr<uint8_t>(),
                                      row_stride(packed_mask), m.data_ptr<float>(), row_stride(m),
                                      m_lowp.defined() ? m_lowp.data_ptr() : nullptr, d, dx.data_ptr(), d, rows, d,
                                      eta, dtype, kernel, stream));
  }
  if (need_dm) {
    dm = at::empty({d, d}, m.options());
    int64_t splits = 0, chunk = 0;
    CK_CHECK_CUDA(ck_ista_dm_plan(rows, d, kernel, &splits, &chunk));
    at::Tensor partials;
    if (splits > 1) partials = at::empty({splits, d, d}, m.options());
    CK_CHECK_CUDA(ck_ista_backward_dm(x.data_ptr(), row_stride(x), dout.data_ptr(), row_stride(dout),
                                      packed_mask.data_ptr<uint8_t>(), row_stride(packed_mask),
                                      dm.data_ptr<float>(), splits > 1 ? partials.data_ptr<float>() : nullptr,
                                      splits, chunk, rows, d, eta, dtype, kernel, stream));
  }
  return {dx, dm};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA backward kernels of the CRATE operators (MSSA, ISTA); see csrc/crate_kernels.h";
  module.def("mssa_backward", &mssa_backward, "dw of out = softmax(scale w w^T) w", pybind11::arg("dout"),
             pybind11::arg("w"), pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("scale"),
             pybind11::arg("kernel"));
  module.def("ista_backward", &ista_backward, "(dx, dM) of out = relu(x + eta x M - eta lambda)",
             pybind11::arg("dout"), pybind11::arg("x"), pybind11::arg("m"), pybind11::arg("packed_mask"),
             pybind11::arg("step_size"), pybind11::arg("need_dx"), pybind11::arg("need_dm"),
             pybind11::arg("kernel"));
}
