"""Sampling: seeded views with masking noise, the deterministic sharded batch order, the tally of unreadable reads,
the fixed evaluation batch, and the data-loading workers.

The seeds and the order are a function of (seed, epoch), so the batches do not depend on the number of workers or
ranks, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ...errors import DatasetError, UnreadableImage
from .datasets import ImageDataset, counted


def seed_for(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class MaskedViews(torch.utils.data.Dataset):
    """(index, seed) -> (augmented image, masking noise of shape (num_patches,), unreadable files).

    Image and noise come from one generator seeded by the sample's seed. An image that cannot be read is
    replaced by another sample drawn from ``seed_for(seed, attempt)`` (up to ``attempts`` tries), so a batch
    still depends only on its (index, seed) pairs; the third item lists each failed read as (path, reason).
    When every try fails, image and noise are None (``collate_views`` then returns a batch of None).
    """

    def __init__(self, dataset: ImageDataset, num_patches: int, attempts: int = 8):
        self.dataset, self.num_patches, self.attempts = dataset, num_patches, attempts

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, seed: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 view, masking noise (num_patches,)) of item ``index``; raises ``UnreadableImage``."""
        return self.dataset.view(index, gen), torch.rand(self.num_patches, generator=gen)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        failures = []
        for attempt in range(self.attempts):
            tried = seed if attempt == 0 else seed_for(seed, attempt)
            gen = torch.Generator().manual_seed(tried)
            if attempt:
                index = int(torch.randint(len(self.dataset), (), generator=gen))
            try:
                return (*self.sample(index, tried, gen), failures)
            except UnreadableImage as e:
                failures.append((e.path, e.reason))
        return None, None, failures


class LabelledTrainViews(MaskedViews):
    """(item, sample seed) -> (uint8 training view, label, failed reads), each view a function of its seed;
    ``augment(view, seed)`` (optional) transforms the uint8 view further. An unreadable image is replaced, as in
    ``MaskedViews``, by a seeded other item with that item's own label."""

    def __init__(self, dataset: ImageDataset, augment=None, attempts: int = 8):
        super().__init__(dataset, 0, attempts)
        self.augment = augment

    def sample(self, index: int, seed: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        view = self.dataset.view(index, gen)
        if self.augment is not None:
            view = self.augment(view, seed_for(seed, 1 << 20))
        return view, torch.tensor(self.dataset.label(index))


def collate_views(samples: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    """A batch of ``MaskedViews`` items -> (images (B, 3, S, S), noise (B, num_patches), failed reads).

    Images and noise are None when some sample had no readable image at all."""
    failures = [f for sample in samples for f in sample[2]]
    if any(sample[0] is None for sample in samples):
        return None, None, failures
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]), failures


class UnreadableImages:
    """The main process's tally of failed image reads: one warning per file, a stop past ``max_fraction``.

    ``add(failures, images)`` takes one batch's failed reads and its number of images; it raises
    ``DatasetError`` when no image could be read for a sample, or when failed reads exceed ``max_fraction`` of
    max(reads so far, ``min_reads``): the fraction is counted over at least ``min_reads`` reads, so a few bad files
    early in a run do not stop it, and the run stops as soon as the failures exceed that fraction of ``min_reads``
    (before ``min_reads`` reads, since failures only grow, it would stop when reaching them).
    ``outcome`` ends each warning: what happens to the sample.
    """

    def __init__(self, max_fraction: float, warn, min_reads: int = 1000, failed: int = 0, reads: int = 0,
                 outcome: str = "a deterministic other sample replaces it"):
        self.max_fraction, self.warn, self.min_reads = max_fraction, warn, min_reads
        self.failed, self.reads, self.outcome = failed, reads, outcome
        self.seen: set[str] = set()

    def add(self, failures: list[tuple[str, str]], images: int | None) -> None:
        for path, reason in failures:
            if path not in self.seen:
                self.seen.add(path)
                self.warn(f"warning: skipped unreadable image {path} ({reason}); {self.outcome}")
        self.failed += len(failures)
        self.reads += len(failures) + (images or 0)
        if images is None:
            raise DatasetError(f"a sample found no readable image in any file it tried ({len(failures)} failed reads "
                               f"in its batch); the last: {failures[-1][0]} ({failures[-1][1]})")
        if self.failed > self.max_fraction * max(self.reads, self.min_reads):
            counted_over = ("the reads" if self.reads >= self.min_reads else
                            f"{self.min_reads} reads, the fewest the fraction is counted over")
            raise DatasetError(
                f"{self.failed} of {self.reads} image reads failed ({counted(len(self.seen), 'file')}), more than "
                f"--max_unreadable {self.max_fraction:g} of {counted_over}; the last: {failures[-1][0]} "
                f"({failures[-1][1]})"
            )


class ShardedBatchSampler:
    """Deterministic, rank-sharded batches of (index, sample seed) pairs.

    Order and sample seeds are a function of (seed, epoch). Global batch k is samples
    [k * G, (k + 1) * G) of the epoch's permutation, G = batch_size * world_size; rank r takes the contiguous
    chunk r of it. An epoch holds a whole number of optimizer steps (``accum_iter`` batches each); the rest of
    the data is dropped. ``set_epoch(epoch, start)`` skips the first ``start`` batches (resuming).
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 accum_iter: int = 1):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.num_batches = num_samples // (batch_size * world_size) // accum_iter * accum_iter
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self):
        gen = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=gen).tolist()
        seeds = torch.randint(0, 2 ** 62, (self.num_samples,), generator=gen).tolist()
        global_batch = self.batch_size * self.world_size
        for k in range(self.start, self.num_batches):
            lo = k * global_batch + self.rank * self.batch_size
            yield [(order[i], seeds[i]) for i in range(lo, lo + self.batch_size)]


def fixed_batch(dataset: ImageDataset, count: int, num_patches: int, seed: int):
    """A fixed evaluation batch: ``count`` views of items evenly spaced over the dataset (cycled if it is
    smaller), each with its own seed from ``seed``; unreadable images are replaced as in training.

    Returns (uint8 images (count, 3, S, S), noise (count, num_patches), failed reads)."""
    stride = max(1, len(dataset) // count)
    views = MaskedViews(dataset, num_patches)
    imgs, noise, failures = collate_views([views[(i * stride % len(dataset), seed_for(seed, i))]
                                           for i in range(count)])
    if imgs is None:
        raise DatasetError(f"no readable image for the evaluation batch; the last tried: {failures[-1][0]} "
                           f"({failures[-1][1]})")
    return imgs, noise, failures


def default_num_workers() -> int:
    """Data-loading workers that fit this machine: the cores this process may use, shared among the processes
    of the node (torchrun's LOCAL_WORLD_SIZE), less one for the training process; at least 1, at most 10."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(10, per_process - 1))


def stop_workers(loader: torch.utils.data.DataLoader, iterator=None) -> None:
    """End a DataLoader's worker processes now and wait for them: its persistent workers' iterator, or
    ``iterator`` (one ``iter(loader)`` gave, whose workers are not persistent).

    The training workers ignore SIGTERM and SIGINT (a signal to the whole job is for the main process), so the
    exit hook of multiprocessing, which terminates daemonic children with SIGTERM and then joins them without a
    time limit, would wait forever for a worker still alive at exit. This shuts them down through the
    DataLoader's own protocol and kills any that did not end."""
    iterator = iterator if iterator is not None else getattr(loader, "_iterator", None)
    if iterator is None:
        return
    workers = list(getattr(iterator, "_workers", ()))
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if loader._iterator is iterator:
        loader._iterator = None
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
