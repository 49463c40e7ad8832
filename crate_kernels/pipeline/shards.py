"""``python -m crate_kernels.pipeline.shards IMAGEFOLDER OUT``: WebDataset tar shards of an image folder (ImageNet
layout or flat), for ``crate_kernels.train --dataset webdataset --data_path "OUT/train-{000000..NNNNNN}.tar"``.

Each sample is its file's bytes (not re-encoded) and its class index; shards hold ``--shard_size`` samples in a
seeded random order, and ``OUT/shards.json`` their sizes (an epoch's length). See ``pipeline.data.shards``.
"""
from __future__ import annotations

import argparse
import os
import shlex

from .data import write_shards
from .flags import command_main


def main(argv: list[str] | None = None) -> int:
    """0 done, 1 failed (an unreadable folder, an output folder that already holds shards), 2 bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m crate_kernels.pipeline.shards",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="image folder: root/<class>/<image> or images directly in it")
    parser.add_argument("out", help="output folder for <prefix>-NNNNNN.tar and shards.json")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per shard (default 1000; each "
                        "process reads whole shards, each of its loading workers its own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the images are written in")
    parser.add_argument("--prefix", default="train", help="shard file names' prefix (default train)")
    args = vars(parser.parse_args(argv))

    def write(cfg: dict) -> dict:
        summary = write_shards(cfg["folder"], cfg["out"], cfg["shard_size"], cfg["seed"], cfg["prefix"])
        pattern = os.path.join(cfg["out"], summary["pattern"])
        print(f"wrote {summary['images']} images of {len(summary['classes'])} classes into {len(summary['shards'])} "
              f"shards under {cfg['out']}\ntrain on them: python -m crate_kernels.train --dataset webdataset "
              f"--data_path {shlex.quote(pattern)}")
        return summary

    return command_main("crate-shards", lambda _: args, write, argv)


if __name__ == "__main__":
    raise SystemExit(main())
