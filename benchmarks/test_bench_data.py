"""Input pipeline: images per second for MAE's training view (RandomResizedCrop 224 + flip) of ImageNet-like JPEGs.

- ``test_transform_per_core``: one core (one thread), per image: the pipeline's earlier path (decode the whole JPEG,
  crop, resize in float32, normalise on the CPU; kept here as the baseline) beside the current one (JPEG decoded
  at reduced size where the crop allows, uint8 resize, normalisation left to the training step's device), with
  PIL's decoder and with simplejpeg's (used when installed).
  extra_info: img_per_s_per_core, and for the current path ``vs_earlier``, the speed ratio from rounds of the two
  paths taken in turn in the same run (robust to a machine whose speed drifts).
- ``test_source_per_core``: one core, no worker process: MAE's training samples (read, decode, view, masking noise)
  from the JPEG folder (sharded sampler, one file per image) and from the same JPEGs written as WebDataset shards
  (``python -m crate_kernels.pipeline.shards``; read as a stream through a shuffle buffer). extra_info
  img_per_s_per_core.
- ``test_loader_workers``: the training DataLoader (MaskedViews, sharded sampler, uint8 collation) with 1..N worker
  processes; extra_info img_per_s and img_per_s_per_worker. A GPU needs (its training img/s) / (img/s per core)
  cores of input processing.

The JPEGs are bundled scikit-image photographs resized to the common ImageNet sizes (about 500 x 375) and saved at
quality 90, so they decode like real photographs (noise would decode slower).
"""
import os
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crate_kernels.pipeline.data import (
    SKIMAGE_HELD_OUT,
    SKIMAGE_PHOTOS,
    ImageFolder,
    MaskedViews,
    ShardedBatchSampler,
    ShardStream,
    TrainTransform,
    collate_views,
    datasets,
    read_image,
    skimage_data_dir,
    write_shards,
)

SIZE = 224
JPEG_SIZES = [(500, 375), (500, 333), (375, 500), (500, 400), (640, 480), (400, 300)]
COPIES = 2  # JPEGs per (photo, size): 9 photos x 6 sizes x 2 = 108 files
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
WORKERS = [n for n in (1, 2, 4, 8) if n <= CORES]
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_like")
    for name in SKIMAGE_PHOTOS + SKIMAGE_HELD_OUT:
        photo = Image.open(os.path.join(skimage_data_dir(), name)).convert("RGB")
        for width, height in JPEG_SIZES:
            resized = photo.resize((width, height), Image.BICUBIC)
            for copy in range(COPIES):
                resized.save(root / f"{name.split('.')[0]}_{width}x{height}_{copy}.jpg", quality=90 - 5 * copy)
    return str(root)


def earlier_view(path: str, transform: TrainTransform, gen: torch.Generator) -> torch.Tensor:
    """The pipeline's earlier path: the whole JPEG decoded, the crop resized in float32, normalised on the CPU."""
    img = read_image(path)
    top, left, h, w = transform.crop_box(img.shape[1], img.shape[2], gen)
    x = img[:, top:top + h, left:left + w].unsqueeze(0).float().div_(255.0)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    return (x - MEAN) / STD


def _views_per_second(fn, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


@pytest.mark.parametrize("path", ["earlier", "current-pil", "current-simplejpeg"])
def test_transform_per_core(benchmark, jpeg_folder, monkeypatch, path):
    benchmark.group = f"training view {SIZE}px of ~500x375 JPEGs, one core"
    if path == "current-simplejpeg":
        pytest.importorskip("simplejpeg", reason="simplejpeg is not installed (pip install simplejpeg)")
    monkeypatch.setattr(datasets, "_SIMPLEJPEG", path == "current-simplejpeg")
    dataset = ImageFolder(jpeg_folder, TrainTransform(SIZE))
    files = [p for p, _ in dataset.samples]
    gen = torch.Generator().manual_seed(0)
    earlier = lambda i: earlier_view(files[i], dataset.transform, gen)  # noqa: E731
    current = lambda i: dataset.view(i, gen)  # noqa: E731
    view = earlier if path == "earlier" else current
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(lambda: [view(i) for i in range(len(files))], rounds=3, iterations=1, warmup_rounds=1)
        if not benchmark.stats:  # --benchmark-disable: ran once as a plain test
            return
        benchmark.extra_info.update(provider=path, images=len(files),
                                    img_per_s_per_core=round(len(files) / benchmark.stats.stats.median, 1))
        if path != "earlier":  # the two paths in turn: a ratio that machine drift does not move
            ratios = [_views_per_second(current, len(files)) / _views_per_second(earlier, len(files))
                      for _ in range(3)]
            benchmark.extra_info["vs_earlier"] = round(sorted(ratios)[1], 2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_source_per_core(benchmark, jpeg_folder, tmp_path, source):
    benchmark.group = f"training samples {SIZE}px from ~500x375 JPEGs, one core: files vs WebDataset shards"
    patches = (SIZE // 16) ** 2
    if source == "webdataset":
        pytest.importorskip("webdataset", reason="webdataset is not installed (the webdataset extra)")
        summary = write_shards(jpeg_folder, str(tmp_path / "shards"), shard_size=27)
        stream = ShardStream(str(tmp_path / "shards" / summary["pattern"]), TrainTransform(SIZE), patches, 1)
        images = stream.num_batches
        epoch = lambda: list(stream)  # noqa: E731
    else:
        dataset = MaskedViews(ImageFolder(jpeg_folder, TrainTransform(SIZE)), patches)
        sampler = ShardedBatchSampler(len(dataset), batch_size=1, seed=0)
        images = sampler.num_batches
        epoch = lambda: [dataset[key] for batch in sampler for key in batch]  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    if not benchmark.stats:
        return
    benchmark.extra_info.update(provider=source, images=images, decoder="simplejpeg" if datasets._SIMPLEJPEG else "PIL",
                                img_per_s_per_core=round(images / benchmark.stats.stats.median, 1))


@pytest.mark.parametrize("workers", WORKERS)
def test_loader_workers(benchmark, jpeg_folder, workers):
    benchmark.group = f"training DataLoader {SIZE}px, batches of 16 uint8 views"
    dataset = ImageFolder(jpeg_folder, TrainTransform(SIZE))
    sampler = ShardedBatchSampler(len(dataset), batch_size=16, seed=0)
    loader = torch.utils.data.DataLoader(
        MaskedViews(dataset, (SIZE // 16) ** 2), batch_sampler=sampler, num_workers=workers,
        collate_fn=collate_views, persistent_workers=True,
    )
    epoch = [0]

    def one_epoch():
        sampler.set_epoch(epoch[0])
        epoch[0] += 1
        for imgs, noise, failures in loader:
            assert imgs.dtype == torch.uint8 and not failures

    one_epoch()  # workers started and warm
    benchmark.pedantic(one_epoch, rounds=3, iterations=1)
    if not benchmark.stats:
        return
    images = sampler.num_batches * 16
    benchmark.extra_info.update(provider=f"{workers} workers", workers=workers,
                                decoder="simplejpeg" if datasets._SIMPLEJPEG else "PIL",
                                img_per_s=round(images / benchmark.stats.stats.median, 1),
                                img_per_s_per_worker=round(images / benchmark.stats.stats.median / workers, 1))
