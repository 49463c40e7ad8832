"""Datasets and MAE augmentation (PIL, no torchvision), with a deterministic sharded sampler, split by job:

    images     decoding (PIL, simplejpeg) and the transforms: TrainTransform, EvalTransform, normalize
    datasets   the pretraining datasets (scikit-image photos, image folders, CIFAR, Flowers-102, Pets) and --dataset
    sampling   seeded views with masking noise, the sharded batch order, unreadable-read tallies, loader workers
    labelled   the evaluation commands' labelled sets with their official splits, and their views
    shards     WebDataset tar shards: the training stream (exact resume) and the writer from an image folder

Views are uint8: the transforms crop and resize with PIL (JPEGs decoded at reduced size where the crop allows),
data-loading workers ship uint8 batches, and the training step normalises them on its device (``normalize``).
Every random choice of a training sample (crop, flip, masking noise) is drawn from a generator seeded by
that sample's own seed, and the seeds and the order are a function of (seed, epoch). So the batches do not
depend on the number of workers or ranks, and a resumed run sees exactly the batches it would have seen.
This package re-exports the names the rest of crate_kernels uses.
"""
from __future__ import annotations

from .datasets import (
    CIFAR,
    DATASETS,
    SKIMAGE_HELD_OUT,
    SKIMAGE_PHOTOS,
    Flowers102,
    ImageDataset,
    ImageFolder,
    OxfordPets,
    SkimagePhotos,
    build_dataset,
    counted,
    resolve_dataset,
    skimage_data_dir,
)
from .images import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, normalize, read_image
from .labelled import (
    LABELLED_DATASETS,
    BundledArrays,
    LabelledViews,
    build_labelled,
    collate_labelled,
    labels_of,
    resolve_labelled,
)
from .sampling import (
    LabelledTrainViews,
    MaskedViews,
    ShardedBatchSampler,
    UnreadableImages,
    collate_views,
    default_num_workers,
    fixed_batch,
    seed_for,
    stop_workers,
)
from .shards import ShardStream, first_samples, write_shards

__all__ = [
    "CIFAR", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "LABELLED_DATASETS", "SKIMAGE_HELD_OUT", "SKIMAGE_PHOTOS",
    "BundledArrays", "EvalTransform", "Flowers102", "ImageDataset", "ImageFolder", "LabelledTrainViews",
    "LabelledViews", "MaskedViews", "OxfordPets", "ShardedBatchSampler", "SkimagePhotos", "TrainTransform",
    "UnreadableImages", "build_dataset", "build_labelled", "collate_labelled", "collate_views", "counted",
    "default_num_workers", "fixed_batch", "labels_of", "normalize", "read_image", "resolve_dataset",
    "resolve_labelled", "seed_for", "ShardStream", "first_samples", "skimage_data_dir", "stop_workers", "write_shards",
]
