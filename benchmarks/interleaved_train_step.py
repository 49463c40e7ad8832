"""Training-step time of two backends measured in alternation, so machine drift hits both alike.

    python benchmarks/interleaved_train_step.py [--model crate_mae_tiny] [--batch 8] [--rounds 9] [--threads 2]

pytest-benchmark times one provider after the other; on a shared or throttling CPU that order alone can move
the ratio by 15%. Here each round runs one step (forward, backward, AdamW) of every backend in turn; the
medians, their ratio and the bytes autograd saved for backward are printed. fp32, 224 px, CPU or CUDA.
"""
from __future__ import annotations

import argparse
import time

import torch

import crate_kernels
from bench_utils import saved_bytes, synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crate_mae_tiny", choices=sorted(crate_kernels.CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs=2, default=["reference", "torch"])
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


if __name__ == "__main__":
    main()
