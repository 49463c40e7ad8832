"""One full training step (forward, backward, AdamW) of CRATE-MAE, provider by provider.

CPU: crate_mae_tiny at 224 px, batch $CRATE_BENCH_BATCH (default 8), fp32, providers `reference` and `torch`.
CUDA: crate_mae_base and crate_mae_small at 224 px, batch $CRATE_BENCH_BATCH (default 128), bf16 autocast,
providers `auto` (fused kernels) and `reference` (eager release math) for both models first, then
`compile-reference` (torch.compile of the reference model, whose compile can take minutes) last.
extra_info: device_ms and host_ms (bench_utils.record; host_ms here is one step's, and reads at most the device
time where the launch queue fills), img/s, model FLOPs utilisation against a bf16 matrix product measured in
the same session (CUDA), bytes saved for backward (and with --grad_checkpointing's layer recomputation) and peak
memory.
"""
import os

import pytest
import torch
from bench_utils import CUDA, crate_mae_train_flops, matmul_flops_per_second, peak_memory, record, saved_bytes

import crate_kernels

DEVICE = "cuda" if CUDA else "cpu"
BATCH = int(os.environ.get("CRATE_BENCH_BATCH", 128 if CUDA else 8))
MODELS = ["crate_mae_base", "crate_mae_small"] if CUDA else ["crate_mae_tiny"]
PROVIDERS = ["auto", "reference", "compile-reference"] if CUDA else ["reference", "torch"]


def cases(models: list[str], providers: list[str]) -> list[tuple[str, str]]:
    """(model, provider): every model with each provider but torch.compile, then torch.compile (whose compile can
    take minutes) for every model, so that a suite stopped at its time limit has measured the others."""
    pairs = [(name, provider) for name in models for provider in providers]
    return sorted(pairs, key=lambda pair: pair[1] == "compile-reference")


CASES = cases(MODELS, PROVIDERS)


@pytest.fixture(scope="module")
def matmul_ceiling():
    """Measured dense-matmul FLOP/s of this device (bf16 8192^3 on CUDA, fp32 2048^3 on CPU)."""
    if CUDA:
        return matmul_flops_per_second(8192, torch.bfloat16, 20)
    return matmul_flops_per_second(2048, torch.float32, 3)


def _build(name, provider):
    backend = "reference" if provider == "compile-reference" else provider
    model = getattr(crate_kernels, name)(backend=backend).to(DEVICE)
    runner = torch.compile(model) if provider == "compile-reference" else model
    return model, runner


@pytest.mark.parametrize("name, provider", CASES, ids=["-".join(case) for case in CASES])
def test_train_step(benchmark, name, provider, matmul_ceiling):
    benchmark.group = f"train step {name} 224px batch {BATCH} {'bf16 autocast' if CUDA else 'fp32'}"
    benchmark.extra_info.update(model=name, provider=provider)
    torch.manual_seed(0)
    model, runner = _build(name, provider)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    imgs = torch.randn(BATCH, 3, 224, 224, device=DEVICE)

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            return runner(imgs)[0]

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()

    step()  # warm-up: optimizer state, kernel compilation
    step()
    if CUDA:
        benchmark.extra_info["peak_memory_bytes"] = peak_memory(step)
    if provider != "compile-reference":
        unique, total, loss = saved_bytes(forward)
        del loss
        model.set_grad_checkpointing(True)  # what --grad_checkpointing keeps instead
        unique_recompute, _, loss = saved_bytes(forward)
        del loss
        model.set_grad_checkpointing(False)
        benchmark.extra_info.update(saved_bytes_unique=unique, saved_bytes_total=total,
                                    saved_bytes_grad_checkpointing=unique_recompute)
    seconds = record(benchmark, step, rounds=3, host_calls=1)
    if not seconds:
        return
    flops = crate_mae_train_flops(model.pos_embed.shape[-1], len(model.blocks), BATCH)
    benchmark.extra_info.update(
        img_per_s=BATCH / seconds, model_tflops=flops / seconds / 1e12,
        mfu=flops / seconds / matmul_ceiling, matmul_ceiling_tflops=matmul_ceiling / 1e12,
    )


SUPERVISED = ["crate_base", "crate_small"] if CUDA else ["crate_tiny"]
SUPERVISED_CASES = cases(SUPERVISED, PROVIDERS)


@pytest.mark.parametrize("name, provider", SUPERVISED_CASES, ids=["-".join(case) for case in SUPERVISED_CASES])
def test_supervised_train_step(benchmark, name, provider):
    """Supervised CRATE (crate_kernels.CRATE, the release's model/crate.py): a cross-entropy training step (AdamW),
    `reference` being the release's eager math and `compile-reference` torch.compile of it."""
    benchmark.group = f"train step supervised {name} 224px batch {BATCH} {'bf16 autocast' if CUDA else 'fp32'}"
    benchmark.extra_info.update(model=name, provider=provider)
    torch.manual_seed(0)
    backend = "reference" if provider == "compile-reference" else provider
    model = getattr(crate_kernels, name)(num_classes=1000, backend=backend).to(DEVICE)
    runner = torch.compile(model) if provider == "compile-reference" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    imgs = torch.randn(BATCH, 3, 224, 224, device=DEVICE)
    labels = torch.randint(1000, (BATCH,), device=DEVICE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
            loss = torch.nn.functional.cross_entropy(runner(imgs).float(), labels)
        loss.backward()
        optimizer.step()

    step()  # warm-up: optimizer state, kernel compilation
    if CUDA:
        benchmark.extra_info["peak_memory_bytes"] = peak_memory(step)
    seconds = record(benchmark, step, rounds=3, host_calls=1)
    if seconds:
        benchmark.extra_info["img_per_s"] = BATCH / seconds
