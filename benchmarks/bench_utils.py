"""Shared helpers for the benchmark suites (imported by the benchmark files, which pytest puts on sys.path)."""
import contextlib
import os
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (this suite measures GPU kernels)")


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


def skip_if_excluded(provider: str) -> None:
    """Skip a provider listed in $CRATE_BENCH_SKIP (comma-separated; the GPU report lists 'cuda' there when the
    CUDA extension did not build, so that no suite waits on a build)."""
    if provider in os.environ.get("CRATE_BENCH_SKIP", "").split(","):
        pytest.skip(f"provider {provider!r} is excluded by $CRATE_BENCH_SKIP")


@contextlib.contextmanager
def pinned_cuda_kernel(request, kernels: dict[str, str], op: str):
    """Around a benchmark whose provider names a csrc/ backward kernel of ``op`` (``kernels``: provider -> kernel):
    backend 'cuda' with that kernel pinned; other providers run as they are. The forward does not depend on the
    backward kernel, so such a provider's fwd case is skipped."""
    kernel = kernels.get(request.node.callspec.params["provider"])
    if kernel is None:
        yield
        return
    skip_if_excluded("cuda")
    if request.node.callspec.params["mode"] == "fwd":
        pytest.skip("the forward is provider cuda's whatever the backward kernel")
    from crate_kernels.ops import cuda_ext

    with cuda_ext.pinned_kernels(**{op: kernel}):
        yield


def variant_providers(kinds: tuple[str, ...], modes: dict[str, str]) -> dict[str, tuple[str, str, str]]:
    """{"triton-NAME": (kind, NAME, mode)}: every Triton kernel variant of ``kinds`` other than v1 as a provider (in
    registration order: most likely to win first), measured in the mode its kind runs in (``modes[kind]``)."""
    from crate_kernels.ops import kernel_variants

    names = kernel_variants()
    return {f"triton-{name}": (kind, name, modes[kind]) for kind in kinds for name in names.get(kind, [])[1:]}


@contextlib.contextmanager
def chosen_variant(benchmark, variant: tuple[str, str, str] | None):
    """Run the body with kernel ``variant`` (kind, name, mode) chosen, or v1 when None; records extra_info
    kernel_variant = "kind=name" (or "v1"), to compare a variant with v1 within a benchmark group."""
    from crate_kernels.ops import set_variant

    benchmark.extra_info["kernel_variant"] = "v1" if variant is None else f"{variant[0]}={variant[1]}"
    if variant is None:
        yield
        return
    set_variant(variant[0], variant[1])
    try:
        yield
    finally:
        set_variant(variant[0], None)


def host_seconds(step, calls: int) -> float:
    """Host time to issue one ``step()`` (Python, dispatch, launches), the device idle at the start: the cost per
    call that device time does not show, and the floor of a small shape's time."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    seconds = (time.perf_counter() - start) / calls
    synchronize()
    return seconds


def record(benchmark, step, rounds: int, host_calls: int = 10):
    """Time a warmed-up ``step`` and return the seconds a suite's figures use (None under --benchmark-disable).

    pytest-benchmark times ``step(); synchronize()`` ``rounds`` times: the command-line table (wall time, with the
    Python of every call in it). On CUDA the returned time is device time: the median of CUDA events around
    many calls after warm-up, with L2 flushed between calls (triton.testing.do_bench), recorded as device_ms;
    the host time per call (host_seconds over ``host_calls`` calls) is recorded apart as host_ms. On CPU the
    returned time is the wall median.
    """
    def timed():
        step()
        synchronize()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    if not benchmark.stats:  # --benchmark-disable: ran once as a plain test
        return None
    wall = benchmark.stats.stats.median
    if not CUDA:
        return wall
    from triton.testing import do_bench

    device_ms = do_bench(step, warmup=1, rep=max(100.0, 5e3 * wall), return_mode="median")
    benchmark.extra_info.update(device_ms=device_ms, host_ms=host_seconds(step, host_calls) * 1e3)
    return device_ms / 1e3


def median_seconds(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_flops_per_second(n: int, dtype: torch.dtype, reps: int) -> float:
    """Measured rate of one dense n x n x n product on random data (the ceiling MFU is stated against)."""
    device = "cuda" if CUDA else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, reps)


def saved_bytes(fn):
    """Run ``fn()`` and return (unique, total) bytes that autograd saved for backward, plus fn's result.

    ``unique`` counts each storage once (what memory really holds); ``total`` counts every saved reference.
    """
    storages, total = {}, 0

    def pack(t):
        nonlocal total
        nbytes = t.numel() * t.element_size()
        total += nbytes
        key = (t.untyped_storage().data_ptr(), t.device)
        storages[key] = max(storages.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), total, result


def peak_memory(fn):
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before (bytes); None on CPU."""
    if not CUDA:
        fn()
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() - before


def crate_mae_train_flops(embed_dim: int, depth: int, batch: int, img_size: int = 224, patch: int = 16) -> float:
    """FLOPs of one training step (forward + backward = 3x forward) of the fused algorithm.

    Per layer and token: 2 d^2 per d x d product; attention 4 n d per token (w w^T and P w).
    Encoder layer: qkv, to_out, ISTA (one product with M) = 3 products + attention; decoder layer:
    linear, qkv, to_out = 3 products + attention. Patch embedding and prediction head: 2 N d (3 p^2) each.
    The d x d work of M = W - W^T W (2 d^3 per encoder layer) is added once per step.
    """
    n_patches = (img_size // patch) ** 2
    n = n_patches + 1
    d = embed_dim
    per_layer = batch * n * (3 * 2 * d * d + 4 * n * d)
    forward = 2 * depth * per_layer + 2 * 2 * batch * n_patches * d * 3 * patch * patch + depth * 2 * d ** 3
    return 3.0 * forward
