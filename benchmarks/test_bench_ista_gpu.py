"""ISTA on the GPU: forward, backward and forward+backward, provider by provider, bf16.

Shape: CRATE-MAE-Base, 256 images x 197 tokens = 50,432 rows, d = 768, x and W in bf16.
Providers, in this order (`triton` first, its variants and baselines right after it): `triton` (variants v1);
`triton-NAME` for every other kernel variant (ISTA's variants are backward ones: `bwd` mode only, to compare
with `triton`); `cublas-floor`, the bare bf16 products of the fused algorithm on cuBLAS (x M forward; G M^T and
x^T G backward), no epilogue, no mask;
`reference` (eager release math); `compile-reference` (torch.compile of it); `cuda` (Triton forward, csrc/
CUDA-extension backward; skipped with the reason when the extension cannot build); `cuda-wmma` (`cuda` with the
csrc/ wmma backward kernel pinned; bwd and fwd+bwd only); `torch` (the fused algorithm in PyTorch, ista_step with
that backend).
extra_info: device_ms and host_ms (bench_utils.record); from device time, tflops counted on the fused
algorithm (2 rows d^2 + 2 d^3 forward for x M and W^T W; 4 rows d^2 + 2 d^3 backward for G M^T, x^T G and
W (dM + dM^T)), tflops_release counted on the release's
three products (6 rows d^2 forward, 12 rows d^2 backward), gbps on the fewest bytes the fused passes move
(x and out forward, x, dOut and dx backward, plus the bit mask), peak_memory_bytes above what was allocated
before the call, and saved_bytes_unique/total (eager providers, passes that run the forward).
"""
from contextlib import nullcontext

import bench_utils as bu
import pytest
import torch

from crate_kernels.ops import ista_reference, ista_step

pytestmark = bu.requires_cuda

ROWS, D, DTYPE = 256 * 197, 768, torch.bfloat16
STEP_SIZE, LAMBD = 0.1, 0.5
VARIANTS = bu.variant_providers(("ista_forward", "ista_backward"), {"ista_forward": "fwd", "ista_backward": "bwd"})
PROVIDERS = ["triton", *VARIANTS, "cublas-floor", "reference", "compile-reference", "cuda", "cuda-wmma", "torch"]
MODES = ["fwd", "bwd", "fwd+bwd"]
CASES = [(provider, mode) for provider in PROVIDERS for mode in MODES
         if provider not in VARIANTS or mode == VARIANTS[provider][2]]
_COMPILED = {}
# Backend 'cuda' with its csrc/ backward kernel pinned, ranked against `cuda` (the default kernel: mma).
CUDA_KERNELS = {"cuda-wmma": "wmma"}


@pytest.fixture(autouse=True)
def _pinned_cuda_kernel(request):
    with bu.pinned_cuda_kernel(request, CUDA_KERNELS, "ista"):
        yield


def _forward_fn(provider: str):
    """A callable (x, W) -> out for the providers that run the ISTA step."""
    if provider in ("triton", "cuda", "torch", *CUDA_KERNELS) or provider in VARIANTS:
        backend = "cuda" if provider in CUDA_KERNELS else "triton" if provider in VARIANTS else provider
        return lambda x, w: ista_step(x, w, STEP_SIZE, LAMBD, backend=backend)
    if provider == "compile-reference":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(ista_reference, dynamic=False)
        return lambda x, w: _COMPILED["fn"](x, w, STEP_SIZE, LAMBD)
    return lambda x, w: ista_reference(x, w, STEP_SIZE, LAMBD)


def _figures(mode: str, seconds: float) -> dict:
    token, cube = 2.0 * ROWS * D * D, 2.0 * D ** 3
    fused = {"fwd": token + cube, "bwd": 2 * token + cube, "fwd+bwd": 3 * token + 2 * cube}[mode]
    release = {"fwd": 3 * token, "bwd": 6 * token, "fwd+bwd": 9 * token}[mode]
    tensor, bits = ROWS * D * torch.finfo(DTYPE).bits // 8, ROWS * D // 8
    nbytes = {"fwd": 2 * tensor + bits, "bwd": 3 * tensor + bits, "fwd+bwd": 5 * tensor + 2 * bits}[mode]
    return {"tflops": fused / seconds / 1e12, "tflops_release": release / seconds / 1e12,
            "gbps": nbytes / seconds / 1e9}


def _cublas_step(mode: str, x, m, dout):
    """The products alone: x M forward; dOut M^T and x^T dOut backward."""
    def step():
        if mode != "bwd":
            x @ m
        if mode != "fwd":
            dout @ m.t()
            x.t() @ dout
    return step


@pytest.mark.parametrize("provider, mode", CASES, ids=["-".join(case) for case in CASES])
def test_ista(benchmark, provider, mode):
    bu.skip_if_excluded(provider)
    benchmark.group = f"ista {mode} rows={ROWS} d={D} bf16"
    torch.manual_seed(0)
    x = torch.randn(ROWS, D, device="cuda", dtype=DTYPE, requires_grad=True)
    weight = torch.empty(D, D, device="cuda")
    torch.nn.init.kaiming_uniform_(weight)
    weight = weight.to(DTYPE).requires_grad_(True)
    dout = torch.randn_like(x)

    with bu.chosen_variant(benchmark, VARIANTS.get(provider)) if provider.startswith("triton") else nullcontext():
        if provider == "cublas-floor":
            m = (weight - weight.t() @ weight).detach()
            step = _cublas_step(mode, x.detach(), m, dout)
        else:
            fn = _forward_fn(provider)
            if mode == "fwd":
                def step():
                    fn(x, weight)
            elif mode == "bwd":
                out = fn(x, weight)

                def step():
                    torch.autograd.grad(out, (x, weight), dout, retain_graph=True)
            else:
                def step():
                    torch.autograd.grad(fn(x, weight), (x, weight), dout)

        try:
            step()  # warm-up: compiles and autotunes kernels
            bu.synchronize()
        except RuntimeError as exc:
            if provider in ("cuda", *CUDA_KERNELS):
                pytest.skip(f"the CUDA extension cannot run here: {str(exc).splitlines()[0][:200]}")
            raise
        benchmark.extra_info["peak_memory_bytes"] = bu.peak_memory(step)
        if provider not in ("compile-reference", "cublas-floor") and mode != "bwd":
            unique, total, _ = bu.saved_bytes(lambda: fn(x, weight))
            benchmark.extra_info.update(saved_bytes_unique=unique, saved_bytes_total=total)

        seconds = bu.record(benchmark, step, rounds=5)
    if seconds:
        benchmark.extra_info.update(_figures(mode, seconds))
