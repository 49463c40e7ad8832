"""WebDataset tar shards: the training stream that reads them and the writer that makes them from an image folder.

A shard is a tar of samples ``<key>.<ext>`` (an image: jpg, png, ...) beside ``<key>.cls`` (its label, optional),
read through the webdataset library (brace patterns, local paths, ``pipe:`` commands, URLs). ``write_shards``
leaves ``shards.json`` beside its shards with each shard's sample count, which sizes an epoch.

Order. Epoch e permutes the shards (seed, e); process r (global rank) reads every world_size-th shard of that order
from r, and its loading worker w every W-th of those from w (W, the workers, is at most the shards per process).
A worker cycles over its shards, each pass in a seeded order, through a seeded shuffle buffer (filled, drawn from
and refilled, emptied by the epoch's last draws), and yields exactly its batches of the epoch: batch b of a process
comes from worker b mod W (the DataLoader's round robin), so every process makes the same number of steps. A
sample's random choices (crop, flip, masking noise, the replacement of an unreadable image from the buffer) come
from a seed of (seed, e, r, w, its position in the worker's stream).

Resume. Restarting at batch b of an epoch, worker w skips, undecoded, the samples of the batches it had made before
(len(range(w, b, W)) x batch_size of them), and the loader's first worker plays worker b mod W: the uninterrupted
run's samples exactly, when the processes, loading workers and batch size are the ones it had (changing one
changes which samples come next, not how many).
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import tarfile

import numpy as np
import torch

from ...errors import DatasetError
from .datasets import IMAGE_EXTENSIONS, ImageDataset, ImageFolder, counted, open_encoded
from .images import _pil
from .sampling import MaskedViews, seed_for

COUNTS_FILE = "shards.json"
SHUFFLE_BUFFER = 1000  # samples per loading worker (WebDataset's customary size): memory ~ 1000 encoded images
_EXTENSIONS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise DatasetError("--dataset webdataset needs the webdataset library: pip install "
                           "'crate_kernels[webdataset]' (or pip install webdataset)") from None
    return webdataset


def expand_shards(pattern: str) -> list[str]:
    """The shard URLs of ``pattern`` (WebDataset's syntax: ``train-{000000..000146}.tar``, ``a.tar::b.tar``); local
    files must exist."""
    urls = _webdataset().shardlists.expand_urls(pattern)
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise DatasetError(f"--data_path {pattern}: {counted(len(missing), 'shard')} not found, e.g. {missing[0]} "
                           f"(a WebDataset pattern such as shards/train-{{000000..000146}}.tar)")
    if not urls:
        raise DatasetError(f"--data_path {pattern} names no shard")
    return urls


def _is_local(url: str) -> bool:
    return ":" not in url.split("/")[0]  # not pipe:..., http://..., s3://...


def shard_counts(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from the ``shards.json`` beside local shards (written by ``write_shards``); None when
    some shard is not listed."""
    counts, listed = {}, {}  # listed: folder -> {shard name: samples}, each shards.json read once
    for url in urls:
        folder = os.path.dirname(url)
        path = os.path.join(folder, COUNTS_FILE)
        if not _is_local(url) or not os.path.isfile(path):
            return None
        if folder not in listed:
            with open(path) as f:
                listed[folder] = {s["name"]: s["samples"] for s in json.load(f)["shards"]}
        if os.path.basename(url) not in listed[folder]:
            return None
        counts[url] = listed[folder][os.path.basename(url)]
    return counts


def shard_samples(url: str):
    """(source, image extension, encoded bytes, label) of each sample of one shard, in order; a sample without an
    image gives extension and bytes None. A shard that cannot be read raises ``DatasetError`` naming it."""
    wds = _webdataset()
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            ext = next((e for e in _EXTENSIONS if e in sample), None)
            label = int(sample["cls"]) if "cls" in sample else 0
            yield f"{url}:{sample['__key__']}", ext, (sample[ext] if ext else None), label
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise DatasetError(f"cannot read shard {url}: {e}") from e


class EncodedImages(ImageDataset):
    """Images held encoded in memory: items (source, extension, bytes, label), decoded by the transform as image
    folders' files are (``open_encoded``). ``first`` (optional) is item 0, ahead of ``items``."""

    def __init__(self, transform, items: list, first=None, name: str = "encoded images"):
        super().__init__(transform)
        self.items, self.first, self.name = items, first, name

    def __len__(self) -> int:
        return len(self.items) + (self.first is not None)

    def _item(self, index: int):
        return self.first if self.first is not None and index == 0 else self.items[index - (self.first is not None)]

    def describe(self) -> str:
        return f"{self.name} ({counted(len(self), 'image')})"

    def open(self, index: int):
        source, ext, data, _ = self._item(index)
        if data is None:
            raise OSError(f"no image in the sample (expected one of {', '.join(_EXTENSIONS)})")
        return open_encoded(data, ext)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        with _pil().open(io.BytesIO(self._item(index)[2])) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1), self.label(index)

    def label(self, index: int) -> int:
        return self._item(index)[3]

    def source(self, index: int) -> str:
        return self._item(index)[0]


class ShardStream(torch.utils.data.IterableDataset):
    """MAE's training samples from WebDataset shards: (uint8 view, masking noise (num_patches,), failed reads) per
    sample, as ``MaskedViews`` gives for an image folder (collate with ``collate_views``). The batch schedule's
    interface is the sampler's: ``num_batches`` per process and epoch, ``set_epoch(epoch, start)``; see the module
    docstring for the order. ``epoch_size`` sizes an epoch when the shards have no ``shards.json``."""

    def __init__(self, pattern: str, transform, num_patches: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, accum_iter: int = 1, epoch_size: int | None = None, buffer: int = SHUFFLE_BUFFER):
        self.pattern, self.transform, self.num_patches = pattern, transform, num_patches
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.urls = expand_shards(pattern)
        if len(self.urls) < world_size:
            raise DatasetError(f"--data_path {pattern}: {counted(len(self.urls), 'shard')} for {world_size} processes; "
                               "each process reads whole shards (write more, smaller ones: --shard_size)")
        self.counts = shard_counts(self.urls)
        self.epoch_samples = sum(self.counts.values()) if self.counts else epoch_size
        if not self.epoch_samples:
            raise DatasetError(f"--data_path {pattern}: no {COUNTS_FILE} lists these shards' sizes; give --epoch_size "
                               "(images per epoch)")
        self.num_batches = self.epoch_samples // (batch_size * world_size) // accum_iter * accum_iter
        self.shards_per_process = len(self.urls) // world_size
        self.buffer = buffer
        self.workers = 1
        self.epoch, self.start = 0, 0

    def set_workers(self, requested: int) -> int:
        """The loading workers to start: ``requested``, at most the shards per process (a worker reads whole
        shards); 0 reads in the training process (the order of one worker)."""
        self.workers = max(1, min(requested, self.shards_per_process))
        return min(requested, self.workers)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.num_batches - self.start) * self.batch_size

    def describe(self) -> str:
        size = (f"{counted(self.epoch_samples, 'image')} per epoch ({COUNTS_FILE})" if self.counts else
                f"--epoch_size {self.epoch_samples} images per epoch")
        return f"WebDataset shards {self.pattern} ({counted(len(self.urls), 'shard')}, {size})"

    def worker_shards(self, epoch: int, worker: int) -> list[str]:
        """The shards this process's loading ``worker`` reads in ``epoch``."""
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(seed_for(self.seed, epoch)))
        mine = [self.urls[i] for i in order.tolist()][self.rank::self.world_size]
        return mine[worker::self.workers]

    def _encoded(self, shards: list[str], worker: int):
        """The worker's samples, its shards cycled (each pass in its own seeded order)."""
        for repeat in itertools.count():
            order = list(shards)
            random.Random(seed_for(self.seed, self.epoch, self.rank, worker, repeat)).shuffle(order)
            for url in order:
                empty = True
                for sample in shard_samples(url):
                    empty = False
                    yield sample
                if empty:
                    raise DatasetError(f"shard {url} holds no samples")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        # the DataLoader's round robin starts at its worker 0, and batch `start` belongs to worker start mod W: so
        # loader worker i plays the part of worker (i + start) mod W
        worker = ((info.id if info is not None else 0) + self.start) % self.workers
        shards = self.worker_shards(self.epoch, worker)
        total = len(range(worker, self.num_batches, self.workers)) * self.batch_size
        skip = len(range(worker, self.start, self.workers)) * self.batch_size
        size = min(self.buffer, total, sum(self.counts[u] for u in shards) if self.counts else total)
        rng = random.Random(seed_for(self.seed, self.epoch, self.rank, worker, 1 << 40))
        samples, buffer = self._encoded(shards, worker), []
        for _ in range(size):  # fill the shuffle buffer
            buffer.append(next(samples))
        for position in range(total):
            k = rng.randrange(len(buffer))
            if total - position > len(buffer):  # a draw, refilled from the stream
                item, buffer[k] = buffer[k], next(samples)
            else:  # the last draws empty the buffer: the worker reads each of its samples once
                item = buffer.pop(k)
            if position < skip:
                continue
            views = MaskedViews(EncodedImages(self.transform, buffer, first=item), self.num_patches)
            yield views[(0, seed_for(self.seed, self.epoch, self.rank, worker, position))]


def first_samples(pattern: str, transform, count: int) -> EncodedImages:
    """The first ``count`` samples of the shards in ``pattern``'s order (the evaluation batch's images)."""
    items = list(itertools.islice((s for url in expand_shards(pattern) for s in shard_samples(url)), count))
    return EncodedImages(transform, items, name=f"the first samples of {pattern}")


def write_shards(folder: str, out: str, shard_size: int = 1000, seed: int = 0, prefix: str = "train") -> dict:
    """Write the images of ``folder`` (as ``--dataset imagefolder`` reads it: ImageNet layout or flat) into tar
    shards ``out/<prefix>-NNNNNN.tar`` of ``shard_size`` samples in a seeded random order (each shard mixes the
    classes), each sample its file's bytes (not re-encoded) and its class index (``.cls``), then ``shards.json``.
    Every file is written under a temporary name and renamed when complete; returns what ``shards.json`` holds."""
    wds = _webdataset()
    if shard_size < 1:
        raise DatasetError(f"--shard_size must be at least 1, got {shard_size}")
    if os.path.exists(os.path.join(out, COUNTS_FILE)):
        raise DatasetError(f"{out} already holds shards ({COUNTS_FILE}); choose another output folder")
    images = ImageFolder(folder, None)
    order = torch.randperm(len(images.samples), generator=torch.Generator().manual_seed(seed)).tolist()
    os.makedirs(out, exist_ok=True)
    shards = []
    for number, lo in enumerate(range(0, len(order), shard_size)):
        name = f"{prefix}-{number:06d}.tar"
        path = os.path.join(out, name)
        with wds.TarWriter(path + ".tmp", mtime=0) as sink:
            for i in order[lo:lo + shard_size]:
                file, label = images.samples[i]
                ext = os.path.splitext(file)[1].lstrip(".").lower()
                with open(file, "rb") as f:
                    sink.write({"__key__": f"{i:08d}", ext: f.read(), "cls": str(label)})
        os.replace(path + ".tmp", path)
        shards.append({"name": name, "samples": len(order[lo:lo + shard_size])})
    last = len(shards) - 1
    summary = {"source": os.path.abspath(folder), "classes": images.classes, "images": len(order), "seed": seed,
               "pattern": f"{prefix}-{{000000..{last:06d}}}.tar" if last else shards[0]["name"], "shards": shards}
    tmp = os.path.join(out, COUNTS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, COUNTS_FILE))
    return summary
