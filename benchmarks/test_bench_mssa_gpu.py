"""MSSA on the GPU: forward, backward and forward+backward, provider by provider, bf16.

Shapes: CRATE-MAE-Base (B=256, H=12, n=197, p=64) and two long sequences (n=1024, n=4096, smaller B).
Providers: `triton` (the fused kernels, variants v1), `triton-NAME` for every other kernel variant (forward variants
in `fwd` mode, backward variants in `bwd` mode, CRATE-MAE-Base only, to compare with `triton` there),
F.scaled_dot_product_attention(w, w, w) with each SDPA backend pinned (`sdpa-flash`, `sdpa-cudnn`,
`sdpa-efficient`, `sdpa-math`; one that cannot run the shape is skipped),
`reference` (eager release math), `compile-reference` (torch.compile of it), and `cuda` (the Triton forward with
the csrc/ CUDA-extension backward; skipped with the reason when the extension cannot build); `cuda-mma-tiled`
and `cuda-wmma` run `cuda` with another csrc/ backward kernel pinned (bwd and fwd+bwd only).
Order: shape by shape, and within a shape `triton` first, its variants, then its baselines (SDPA flash, cuDNN,
efficient, eager, compile), then the rest, so a suite stopped at its time limit has the comparisons that matter.
extra_info: device_ms and host_ms (bench_utils.record), tflops (4 n^2 p per head forward, 2.5x that backward)
and gbps (the fewest bytes each pass must move: w and out forward; w, out, dout and dw backward; plus the fp32
lse) from device time, peak_memory_bytes above what was allocated before the timed call, and
saved_bytes_unique/total (eager providers only).
"""
from contextlib import nullcontext

import bench_utils as bu
import pytest
import torch
import torch.nn.functional as F

from crate_kernels.ops import mssa_attention, mssa_reference

pytestmark = bu.requires_cuda

SHAPES = {"base-n197": (256, 12, 197, 64), "long-n1024": (16, 12, 1024, 64), "long-n4096": (2, 12, 4096, 64)}
VARIANTS = bu.variant_providers(("mssa_forward", "mssa_backward"), {"mssa_forward": "fwd", "mssa_backward": "bwd"})
PROVIDERS = ["triton", *VARIANTS, "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "reference", "compile-reference",
             "cuda", "cuda-mma-tiled", "cuda-wmma", "sdpa-math"]
MODES = ["fwd", "bwd", "fwd+bwd"]
CASES = [(shape, provider, mode) for shape in SHAPES for provider in PROVIDERS for mode in MODES
         if provider not in VARIANTS or (shape == "base-n197" and mode == VARIANTS[provider][2])]
DTYPE = torch.bfloat16
_COMPILED = {}
# Backend 'cuda' with its csrc/ backward kernel pinned, ranked against `cuda` (the default kernel: mma).
CUDA_KERNELS = {"cuda-mma-tiled": "mma-tiled", "cuda-wmma": "wmma"}


@pytest.fixture(autouse=True)
def _pinned_cuda_kernel(request):
    with bu.pinned_cuda_kernel(request, CUDA_KERNELS, "mssa"):
        yield


def _provider(name: str, scale: float):
    """A callable w -> out for one provider."""
    if name in ("triton", "cuda", *CUDA_KERNELS) or name in VARIANTS:
        backend = "cuda" if name in CUDA_KERNELS else "triton" if name in VARIANTS else name
        return lambda w: mssa_attention(w, scale, backend=backend)
    if name == "reference":
        return lambda w: mssa_reference(w, scale)
    if name == "compile-reference":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(mssa_reference, dynamic=False)
        return lambda w: _COMPILED["fn"](w, scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}[name]

    def sdpa(w):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(w, w, w, scale=scale)

    return sdpa


def _step(fn, w, dout, mode: str):
    """The timed work: forward (graph kept, as in training), backward of one saved forward, or both."""
    if mode == "fwd":
        return lambda: fn(w)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(w), w, dout)
    out = fn(w)
    return lambda: torch.autograd.grad(out, w, dout, retain_graph=True)


def _figures(mode: str, b: int, h: int, n: int, p: int, seconds: float) -> dict:
    fwd_flops = 4.0 * n * n * p * b * h
    flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}[mode]
    tensor, lse = b * h * n * p * torch.finfo(DTYPE).bits // 8, b * h * n * 4
    nbytes = {"fwd": 2 * tensor + lse, "bwd": 4 * tensor + lse, "fwd+bwd": 6 * tensor + 2 * lse}[mode]
    return {"tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9}


@pytest.mark.parametrize("shape, provider, mode", CASES, ids=["-".join(case) for case in CASES])
def test_mssa(benchmark, shape, provider, mode):
    bu.skip_if_excluded(provider)
    b, h, n, p = SHAPES[shape]
    benchmark.group = f"mssa {mode} {shape} B={b} H={h} n={n} p={p} bf16"
    torch.manual_seed(0)
    w = torch.randn(b, h, n, p, device="cuda", dtype=DTYPE, requires_grad=True)
    dout = torch.randn_like(w)
    fn = _provider(provider, p ** -0.5)

    with bu.chosen_variant(benchmark, VARIANTS.get(provider)) if provider.startswith("triton") else nullcontext():
        try:
            step = _step(fn, w, dout, mode)
            step()  # warm-up: compiles and autotunes kernels
            bu.synchronize()
        except RuntimeError as exc:
            if provider.startswith("sdpa") or provider in ("compile-reference", "cuda", *CUDA_KERNELS):
                pytest.skip(f"{provider} cannot run this shape: {str(exc).splitlines()[0][:200]}")
            raise

        benchmark.extra_info["peak_memory_bytes"] = bu.peak_memory(step)
        if provider != "compile-reference" and mode != "bwd":
            unique, total, _ = bu.saved_bytes(lambda: fn(w))
            benchmark.extra_info.update(saved_bytes_unique=unique, saved_bytes_total=total)

        seconds = bu.record(benchmark, step, rounds=5)
    if seconds:
        benchmark.extra_info.update(_figures(mode, b, h, n, p, seconds))
