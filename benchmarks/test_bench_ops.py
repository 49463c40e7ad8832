"""Per-operator forward+backward, `reference` vs fused `torch` backend (and `triton` on CUDA), side by side.

Shapes are one CRATE-MAE-Tiny layer at a small batch (CPU-sized): MSSA (B=8, H=6, n=197, p=64) and ISTA
(8*197 rows x 384). extra_info carries the bytes autograd saved for backward, and on CUDA device_ms and host_ms
(bench_utils.record: at these shapes the host time per call is often the larger). GPU-sized shapes live in
test_bench_mssa_gpu.py and test_bench_ista_gpu.py.
"""
import pytest
import torch
from bench_utils import CUDA, record, saved_bytes, synchronize

from crate_kernels import ops

DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["reference", "torch"] + (["triton"] if CUDA else [])


def _bench(benchmark, step, rounds=5):
    step()  # warm-up (also compiles kernels on the GPU)
    synchronize()
    record(benchmark, step, rounds)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mssa_forward_backward(benchmark, backend):
    benchmark.group = "mssa fwd+bwd B=8 H=6 n=197 p=64 fp32"
    w = torch.randn(8, 6, 197, 64, device=DEVICE, requires_grad=True)
    dout = torch.randn_like(w)
    unique, total, _ = saved_bytes(lambda: ops.mssa_attention(w, backend=backend))
    benchmark.extra_info.update(saved_bytes_unique=unique, saved_bytes_total=total)

    def step():
        w.grad = None
        ops.mssa_attention(w, backend=backend).backward(dout)

    _bench(benchmark, step)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ista_forward_backward(benchmark, backend):
    benchmark.group = "ista fwd+bwd rows=1576 d=384 fp32"
    x = torch.randn(8 * 197, 384, device=DEVICE, requires_grad=True)
    weight = torch.empty(384, 384, device=DEVICE)
    torch.nn.init.kaiming_uniform_(weight)
    weight.requires_grad_(True)
    dout = torch.randn_like(x)
    unique, total, _ = saved_bytes(lambda: ops.ista_step(x, weight, backend=backend))
    benchmark.extra_info.update(saved_bytes_unique=unique, saved_bytes_total=total)

    def step():
        x.grad = weight.grad = None
        ops.ista_step(x, weight, backend=backend).backward(dout)

    _bench(benchmark, step)
