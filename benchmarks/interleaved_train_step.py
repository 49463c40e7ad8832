"""Training-step time of two backends measured in alternation, so machine drift hits both alike.

    python benchmarks/interleaved_train_step.py [--model crate_mae_tiny] [--batch 8] [--rounds 9] [--threads 2]
                                                [--flops]

pytest-benchmark times one provider after the other; on a shared or throttling CPU that order alone can move
the ratio by 15%. Here each round runs one step (forward, backward, AdamW) of every backend in turn; the
medians, their ratio and the bytes autograd saved for backward are printed. fp32, 224 px, CPU or CUDA.

--flops also profiles one step per backend and prints the matrix-product work it executed (from the shapes
torch.profiler records: mm/addmm for the linear maps, bmm and the flash-attention kernels for attention),
with the time those products took: where both backends multiply at the same rate, the ratio of executed
FLOPs bounds the ratio of step times that any rearrangement of PyTorch operators can reach.
"""
from __future__ import annotations

import argparse
import time

import torch
from bench_utils import saved_bytes, synchronize

import crate_kernels

# products a step executes, by profiler op name: (group, FLOPs from the recorded input shapes)
_PRODUCTS = {
    "aten::mm": lambda s: ("linear", 2 * s[0][0] * s[0][1] * s[1][1]),
    "aten::addmm": lambda s: ("linear", 2 * s[1][0] * s[1][1] * s[2][1]),
    "aten::bmm": lambda s: ("attention", 2 * s[0][0] * s[0][1] * s[0][2] * s[1][2]),
    "aten::baddbmm": lambda s: ("attention", 2 * s[1][0] * s[1][1] * s[1][2] * s[2][2]),
    # CPU flash attention with q = k = v (B, H, N, p): S and P V forward; S again, dP, dV, dQ, dK backward
    "aten::_scaled_dot_product_flash_attention_for_cpu":
        lambda s: ("attention", 4 * s[0][0] * s[0][1] * s[0][2] ** 2 * s[0][3]),
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward":
        lambda s: ("attention", 10 * s[1][0] * s[1][1] * s[1][2] ** 2 * s[1][3]),
}


def executed_products(step) -> dict:
    """{group: (GFLOP, ms)} of the matrix products one call of ``step()`` runs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    totals = {}
    for event in prof.events():
        formula = _PRODUCTS.get(event.name)
        if formula is None:
            continue
        group, flops = formula(event.input_shapes)
        gflop, ms = totals.get(group, (0.0, 0.0))
        totals[group] = (gflop + flops / 1e9, ms + event.self_cpu_time_total / 1e3)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crate_mae_tiny", choices=sorted(crate_kernels.CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs=2, default=["reference", "torch"])
    parser.add_argument("--flops", action="store_true", help="also print the matrix-product work of one step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    imgs = torch.randn(args.batch, 3, 224, 224, device=device)
    runs = {}
    for backend in args.backends:
        torch.manual_seed(0)
        model = getattr(crate_kernels, args.model)(backend=backend).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        runs[backend] = (model, optimizer, [])

    def step(backend):
        model, optimizer, _ = runs[backend]
        optimizer.zero_grad(set_to_none=True)
        model(imgs)[0].backward()
        optimizer.step()
        synchronize()

    for backend in runs:
        step(backend)  # warm-up
    for _ in range(args.rounds):
        for backend, (_, _, times) in runs.items():
            start = time.perf_counter()
            step(backend)
            times.append(time.perf_counter() - start)
    first, second = args.backends
    median = {b: sorted(t)[len(t) // 2] for b, (_, _, t) in runs.items()}
    saved = {b: saved_bytes(lambda: runs[b][0](imgs)[0])[0] for b in runs}
    for b in runs:
        print(f"{b:>10}: median {median[b] * 1e3:.0f} ms/step over {args.rounds} rounds, "
              f"saved for backward {saved[b] / 2**20:.1f} MiB")
    print(f"{args.model} batch {args.batch} on {device} ({args.threads} threads): {second}/{first} time "
          f"{median[second] / median[first]:.3f}, saved bytes {saved[second] / saved[first]:.3f}")
    if args.flops:
        work = {b: executed_products(lambda: step(b)) for b in runs}
        for b, groups in work.items():
            parts = ", ".join(f"{g} {gf:.1f} GFLOP in {ms:.0f} ms ({gf / ms * 1e3:.0f} GFLOP/s)"
                              for g, (gf, ms) in sorted(groups.items()))
            print(f"{b:>10}: {parts}; products {sum(gf for gf, _ in groups.values()):.1f} GFLOP")
        total = {b: sum(gf for gf, _ in groups.values()) for b, groups in work.items()}
        print(f"executed product FLOPs {second}/{first}: {total[second] / total[first]:.3f} "
              "(profiled step; times under the profiler run slower than the medians above)")


if __name__ == "__main__":
    main()
