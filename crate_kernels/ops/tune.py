"""Tune a model's operator shapes ahead of training: ``python -m crate_kernels.ops.tune --model crate_mae_base
--batch_size 256 --dtype bf16`` (``--help``).

One forward and backward of the model on a random batch (a masked autoencoder's loss, or a supervised CRATE's
cross-entropy on random labels), its operators under backend ``auto``, so every operator shape it reaches is decided:
measured (``crate_kernels.ops.tuning``) or read from the tuning cache. Prints one table per operator and direction
(candidate, median ms, error against the float64 library path, chosen) and where the cache lives; a second run reads
the cache and measures nothing. The API is ``crate_kernels.ops.tune_step(step)`` and
``crate_kernels.ops.tuning_table()``.

A command, not an operator: it builds models, so it sits in the commands layer although it lives under ``ops`` for
the name users type; nothing in ``crate_kernels.ops`` imports it (tests/test_layering.py).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..models.registry import CHECKPOINT_MODELS, build_mae, build_supervised, family
from ..pipeline.distributed import resolve_device
from . import tuning

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m crate_kernels.ops.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=list(CHECKPOINT_MODELS),
                        help="a registered architecture: a masked autoencoder or a supervised CRATE")
    parser.add_argument("--batch_size", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--input_size", type=int, default=224, help="image side in pixels, a multiple of the patch")
    parser.add_argument("--patch_size", type=int, default=16, help="patch side in pixels (default 16)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                        help="autocast dtype of the step (fp32: no autocast; default bf16)")
    parser.add_argument("--device", default="auto", help="auto (cuda where available), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.patch_size < 1 or args.input_size < args.patch_size or args.input_size % args.patch_size:
        parser.error(f"--input_size must be a positive multiple of --patch_size ({args.patch_size}), got "
                     f"{args.input_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = resolve_device(args.device, 0)
    imgs = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    dtype = DTYPES[args.dtype]
    if family(args.model) == "supervised":
        model = build_supervised(args.model, 1000, args.input_size, args.patch_size, backend="auto").to(device)
        labels = torch.randint(0, 1000, (args.batch_size,), device=device)

        def loss():
            return torch.nn.functional.cross_entropy(model(imgs).float(), labels)
    else:
        model = build_mae(args.model, args.input_size, args.patch_size, backend="auto").to(device)

        def loss():
            return model(imgs)[0]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            value = loss()
        value.backward()

    rows = tuning.tune_step(step)
    stats = tuning.tuning_stats()
    print(f"{args.model}, batch {args.batch_size}, {args.input_size}px, {args.dtype} on {device}: "
          f"{stats['measured']} operator shapes measured ({stats['seconds']:.1f} s), {stats['from_cache']} read from "
          f"the cache {tuning.cache_path(device)}")
    print(tuning.format_tables(rows) if rows else "no fused operators in this model (nothing to tune)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
