"""Datasets and MAE augmentation (PIL, no torchvision), with a deterministic sharded sampler.

Views are uint8: the transforms crop and resize with PIL (JPEGs decoded at reduced size where the crop allows),
data-loading workers ship uint8 batches, and the training step normalises them on its device (``normalize``).
Every random choice of a training sample (crop, flip, masking noise) is drawn from a generator seeded by
that sample's own seed, and the seeds and the order are a function of (seed, epoch). So the batches do not
depend on the number of workers or ranks, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import pickle
import re

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DatasetError, UnreadableImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("auto", "skimage", "imagefolder", "cifar10", "cifar100", "flowers102", "pets")

# The colour photographs that ship inside the scikit-image wheel (no download); grey ones are left out.
# Training crops come from the first seven; the last two are held out for the evaluation batch.
SKIMAGE_PHOTOS = (
    "astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
    "motorcycle_right.png",
)
SKIMAGE_HELD_OUT = ("chelsea.png", "coffee.png")
# JPEGs decode through simplejpeg where it is installed (pip install simplejpeg; the `jpeg` extra), else PIL.
_SIMPLEJPEG = importlib.util.find_spec("simplejpeg") is not None


# ---------------------------------------------------------------------------------------------- transforms
def _pil():
    from PIL import Image

    return Image


def image_size(im) -> tuple[int, int]:
    """(height, width) of a PIL image or of a uint8 (H, W, 3) tensor."""
    return tuple(im.shape[:2]) if isinstance(im, torch.Tensor) else (im.size[1], im.size[0])


class EncodedJPEG:
    """A JPEG file read but not decoded: what ``ImageFolder.open`` gives the transform when simplejpeg is
    installed. It decodes with libjpeg-turbo straight into a numpy array, about twice as fast as PIL's decode
    and copy, at the scale ``draft`` asked for; data simplejpeg refuses (CMYK, recoverable corruption) is
    handed to PIL, so what decodes and what counts as unreadable is PIL's call, as without simplejpeg."""

    mode = "RGB"

    def __init__(self, data: bytes):
        import simplejpeg

        self.data, self.scale = data, 1
        height, width, self.colorspace, _ = simplejpeg.decode_jpeg_header(data)
        self.size = (width, height)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def draft(self, mode: str, size: tuple[int, int]) -> None:
        """Decode at 1/2, 1/4 or 1/8 scale where the image holds that many times ``size`` = (width, height) on
        each side (PIL's rule for JPEGs)."""
        factor = min(self.size[0] // size[0], self.size[1] // size[1])
        self.scale = max(s for s in (1, 2, 4, 8) if s <= max(1, factor))

    def decode(self) -> np.ndarray:
        """(H, W, 3) uint8, ``ceil`` of the original sides over the scale."""
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_width=-(-self.size[0] // self.scale),
                                          min_height=-(-self.size[1] // self.scale))
        except ValueError:
            with _pil().open(io.BytesIO(self.data)) as im:
                im.draft("RGB", (self.size[0] // self.scale, self.size[1] // self.scale))
                return np.array(im.convert("RGB"))


def _decode_region(im, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The region ``box`` = (top, left, h, w) of an image (a lazily opened PIL image or ``EncodedJPEG``, or a uint8
    (H, W, 3) tensor held in memory), resized to ``size`` x ``size`` with antialiased bicubic resampling: uint8
    (3, size, size).

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) when the region stays at least twice ``size`` on each
    side, so a large photo cropped to a small view is never decoded whole; the region's edges then snap to that
    coarser pixel grid (a shift under half an output pixel). The resize runs on uint8 channels-last data
    (PyTorch's vectorised CPU kernel, several times faster than PIL's or a float resize)."""
    top, left, h, w = box
    if isinstance(im, torch.Tensor):
        pixels = im
    else:
        width, height = im.size
        reduce = 1
        while reduce < 8 and min(h, w) >= 4 * reduce * size:  # after doubling: at least 2 * size per side
            reduce *= 2
        if reduce > 1:
            im.draft("RGB", (width // reduce, height // reduce))
        if isinstance(im, EncodedJPEG):
            pixels = torch.from_numpy(im.decode())
        else:
            pixels = torch.from_numpy(np.array(im if im.mode == "RGB" else im.convert("RGB")))
        sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
        top, left, h, w = int(top * sy), int(left * sx), max(1, round(h * sy)), max(1, round(w * sx))
    region = pixels[top:top + h, left:left + w].permute(2, 0, 1).unsqueeze(0)  # a channels-last view, no copy
    if region.shape[-2:] != (size, size):
        region = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return region[0]


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``, on the images' device (the training
    step normalises its uint8 batches on the GPU; the constants are Python numbers, so nothing is copied to the
    device and nothing waits for it)."""
    x = images.float()
    for c in range(3):
        x[..., c, :, :].sub_(255.0 * mean[c]).div_(255.0 * std[c])
    return x


class TrainTransform:
    """MAE's view in uint8: RandomResizedCrop(size, scale, ratio, bicubic) and a horizontal flip (p 0.5).

    Called as ``transform(image, generator) -> uint8 (3, size, size)`` with a PIL image or a uint8 (H, W, 3)
    tensor; ``generator=None`` uses torch's global one. A lazily opened JPEG is decoded at reduced size where the
    crop allows (see ``_decode_region``).
    """

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def crop_box(self, height: int, width: int, gen: torch.Generator | None) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop, torchvision's algorithm (10 tries, then a centre crop)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, im, gen: torch.Generator | None = None) -> torch.Tensor:
        view = _decode_region(im, self.crop_box(*image_size(im), gen), self.size)
        return view.flip(-1) if torch.rand((), generator=gen) < 0.5 else view


class EvalTransform:
    """The centre square of side ``crop_pct`` x the shorter side, resized to ``size`` x ``size`` (bicubic); with
    ``crop_pct`` 0.875 this is MAE's evaluation view (resize the shorter side to size / 0.875, centre crop size).
    PIL image or uint8 (H, W, 3) tensor -> uint8 (3, size, size)."""

    def __init__(self, size: int, crop_pct: float = 1.0):
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, im, gen: torch.Generator | None = None) -> torch.Tensor:
        height, width = image_size(im)
        side = max(1, round(min(width, height) * self.crop_pct))
        return _decode_region(im, ((height - side) // 2, (width - side) // 2, side, side), self.size)


# ---------------------------------------------------------------------------------------------- datasets
# How PIL reports missing, truncated and malformed files: OSError (UnidentifiedImageError), SyntaxError (broken
# PNG chunks), ValueError, EOFError, DecompressionBombError.
def _pil_errors() -> tuple[type[BaseException], ...]:
    return OSError, SyntaxError, ValueError, EOFError, _pil().DecompressionBombError


def _reason(e: BaseException) -> str:
    """A failed decode in words. PIL names the file object it read from, which for an in-memory JPEG is
    ``<_io.BytesIO object at 0x...>``: that repr is dropped (``UnreadableImage`` names the path)."""
    if isinstance(e, _pil().UnidentifiedImageError):
        return "not an image PIL can identify (an unknown format, or the file's header is damaged)"
    return re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def read_image(path: str) -> torch.Tensor:
    """Decode an image file whole with PIL into a uint8 RGB (3, H, W) tensor; ``UnreadableImage`` names the file."""
    try:
        with _pil().open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # (3, H, W) view of (H, W, 3)
    except _pil_errors() as e:
        raise UnreadableImage(path, _reason(e)) from e


class ImageDataset(torch.utils.data.Dataset):
    """Base of the datasets: item ``index`` has an image and an int label.

    ``load(i)``: (uint8 (3, H, W) image decoded whole, label). ``open(i)``: the transform's input in a context
    manager, a uint8 (H, W, 3) tensor (file-backed datasets override it to open a PIL image lazily, so the
    transform can decode a JPEG at reduced size).
    ``view(i, generator)``: ``transform(image, generator)``, uint8. ``dataset[i]``: (normalised float view, label).
    """

    def __init__(self, transform):
        self.transform = transform

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def open(self, index: int):
        return contextlib.nullcontext(self.load(index)[0].permute(1, 2, 0))

    def label(self, index: int) -> int:
        return self.load(index)[1]

    def source(self, index: int) -> str:
        """Where item ``index`` comes from (named by ``UnreadableImage``)."""
        return f"item {index} of {self.describe()}"

    def view(self, index: int, gen: torch.Generator | None = None) -> torch.Tensor:
        try:
            with self.open(index) as im:
                return self.transform(im, gen)
        except _pil_errors() as e:
            raise UnreadableImage(self.source(index), _reason(e)) from e

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return normalize(self.view(index)), self.label(index)


def counted(n: int, noun: str) -> str:
    """``1 image``, ``2 images``, ``1 class``, ``3 classes``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def skimage_data_dir() -> str:
    """Folder of the images bundled with scikit-image (found without importing its data module)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the default dataset needs scikit-image (pip install scikit-image)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


class SkimagePhotos(ImageDataset):
    """The natural photographs bundled with scikit-image; an epoch is ``epoch_size`` views cycling over them.

    Labels are the photo indices. ``epoch_size=None`` gives one item per photo. ``names``: the training photos
    by default, ``SKIMAGE_HELD_OUT`` for evaluation.
    """

    def __init__(self, transform, epoch_size: int | None = None, names=SKIMAGE_PHOTOS):
        super().__init__(transform)
        root = skimage_data_dir()
        self.names = tuple(names)
        self.images = [read_image(os.path.join(root, name)) for name in self.names if self._exists(root, name)]
        if not self.images:
            raise DatasetError(f"no bundled scikit-image photographs found in {root}")
        self.epoch_size = len(self.images) if epoch_size is None else epoch_size

    @staticmethod
    def _exists(root: str, name: str) -> bool:
        return os.path.isfile(os.path.join(root, name))

    def __len__(self) -> int:
        return self.epoch_size

    def describe(self) -> str:
        held_out = "" if self.names == SKIMAGE_PHOTOS else f" held out of training: {', '.join(self.names)}"
        crops = f", {len(self)} random crops per epoch" if self.epoch_size != len(self.images) else ""
        return f"scikit-image's bundled photographs ({counted(len(self.images), 'photo')}{held_out}{crops})"

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        k = index % len(self.images)
        return self.images[k], k

    def label(self, index: int) -> int:
        return index % len(self.images)


class FileImages(ImageDataset):
    """Images in files, ``self.samples`` = [(path, label)]: decoded lazily, JPEGs at reduced size where the view
    allows and with simplejpeg when it is installed."""

    samples: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return f"{self.name} ({counted(len(self), 'image')}, {counted(len(self.classes), 'class')})"

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_image(path), label

    def open(self, index: int):
        """The image, not yet decoded: an ``EncodedJPEG`` for a JPEG in the colours simplejpeg decodes, when it
        is installed (the fast path); else a lazily opened PIL image."""
        path = self.samples[index][0]
        if _SIMPLEJPEG and path.lower().endswith((".jpg", ".jpeg")):
            with open(path, "rb") as f:
                data = f.read()
            try:
                jpeg = EncodedJPEG(data)
            except ValueError:  # not a JPEG simplejpeg can read: PIL decides
                jpeg = None
            if jpeg is not None and jpeg.colorspace in ("RGB", "YCbCr", "Gray"):
                return jpeg
            return _pil().open(io.BytesIO(data))
        return _pil().open(path)

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def source(self, index: int) -> str:
        return self.samples[index][0]


class ImageFolder(FileImages):
    """ImageNet layout ``root/<class>/<image>`` (classes: the sorted sub-folder names), or unlabelled images
    directly in ``root`` (one class) when no sub-folder holds any: pretraining needs no labels."""

    def __init__(self, root: str, transform):
        super().__init__(transform)
        if not os.path.isdir(root):
            raise DatasetError(f"image folder {root} does not exist or is not a directory")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = []
        for label, cls in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                self.samples += [
                    (os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
                ]
        if not self.samples:  # a flat folder of unlabelled images
            self.classes = [os.path.basename(os.path.normpath(root))]
            self.samples = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root))
                            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))]
        if not self.samples:
            raise DatasetError(
                f"no images found in {root}: expected images in it or the ImageNet layout {root}/<class>/<image>, "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )

    def describe(self) -> str:
        decoder = "simplejpeg" if _SIMPLEJPEG else "PIL (pip install simplejpeg decodes them faster)"
        return (f"image folder {self.root} ({counted(len(self), 'image')}, {counted(len(self.classes), 'class')}; "
                f"JPEG decoder {decoder})")


class CIFAR(ImageDataset):
    """CIFAR-10/100 from the standard python-pickle folders (cifar-10-batches-py, cifar-100-python); ``data`` is a
    uint8 (N, 32, 32, 3) tensor, as the bundled sets' ``data`` is a tensor."""

    LAYOUT = {
        10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
        100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
    }

    def __init__(self, root: str, transform, train: bool = True, num_classes: int = 10):
        super().__init__(transform)
        folder, train_files, test_files, label_key = self.LAYOUT[num_classes]
        base = root if os.path.basename(os.path.normpath(root)) == folder else os.path.join(root, folder)
        files = [os.path.join(base, f) for f in (train_files if train else test_files)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DatasetError(
                f"CIFAR-{num_classes} not found under {root}: missing {', '.join(missing)} "
                f"(expected the python version, folder {folder}/)"
            )
        data, labels = [], []
        for path in files:
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += list(batch[label_key])
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise DatasetError(f"cannot read CIFAR file {path}: {e!r}") from e
        self.data = torch.from_numpy(np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1)))
        self.labels = labels
        self.name = f"CIFAR-{num_classes} {'train' if train else 'test'} split in {base}"

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        return f"{self.name} ({counted(len(self), 'image')})"

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index].permute(2, 0, 1), self.labels[index]

    def open(self, index: int):
        return contextlib.nullcontext(self.data[index])

    def label(self, index: int) -> int:
        return self.labels[index]


def _labelled_root(data_path: str) -> str | None:
    """``pets`` or ``flowers102`` when ``data_path`` (or its usual sub-folder) is that dataset's root, else None."""
    if _find_root(data_path, os.path.join("annotations", "trainval.txt"), OxfordPets.FOLDERS):
        return "pets"
    if _find_root(data_path, "setid.mat", Flowers102.FOLDERS):
        return "flowers102"
    return None


def resolve_dataset(name: str, data_path: str | None) -> str:
    """``auto``: scikit-image photos without --data_path; CIFAR, Oxford-IIIT Pets or Flowers-102 when their files
    are found; else an image folder."""
    if name != "auto":
        return name
    if not data_path:
        return "skimage"
    for variant, (folder, *_rest) in CIFAR.LAYOUT.items():
        if os.path.basename(os.path.normpath(data_path)) == folder or os.path.isdir(os.path.join(data_path, folder)):
            return f"cifar{variant}"
    return _labelled_root(data_path) or "imagefolder"


def build_dataset(name: str, data_path: str | None, transform, train: bool = True,
                  epoch_size: int | None = None) -> ImageDataset:
    """The dataset ``name`` (see ``resolve_dataset``). ImageNet layout: ``data_path/train`` and ``data_path/val``
    when present, else ``data_path`` itself; the eval split falls back to the training one. The scikit-image
    photos' eval split is the two photos held out of training; Pets and Flowers-102 train on their official
    training split's photos (labels unused) and evaluate on the test split's. ``imagefolder`` on a Pets root is
    refused: read as class folders, its trimap masks would count as photos."""
    name = resolve_dataset(name, data_path)
    if name == "skimage":
        return SkimagePhotos(transform, epoch_size) if train else SkimagePhotos(transform, names=SKIMAGE_HELD_OUT)
    if not data_path:
        raise DatasetError(f"--dataset {name} needs --data_path")
    if name in ("cifar10", "cifar100"):
        return CIFAR(data_path, transform, train=train, num_classes=int(name[5:]))
    if name in ("flowers102", "pets"):
        return (Flowers102 if name == "flowers102" else OxfordPets)(data_path, transform, "train" if train else "test")
    if name == "imagefolder":
        if _labelled_root(data_path) == "pets":
            raise DatasetError(
                f"--data_path {data_path} is the root of Oxford-IIIT Pets, not an image folder: read as one, its "
                "annotations/ (trimap masks) would be trained on as photos; use --dataset pets (or auto) to pretrain "
                "on the photos in images/ (the trainval split)"
            )
        for split in (("train",) if train else ("val", "train")):
            if os.path.isdir(os.path.join(data_path, split)):
                return ImageFolder(os.path.join(data_path, split), transform)
        return ImageFolder(data_path, transform)
    raise DatasetError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")


# ---------------------------------------------------------------------------------------------- sampling
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


# ---------------------------------------------------------------------------------------------- workers
def default_num_workers() -> int:
    """Data-loading workers that fit this machine: the cores this process may use, shared among the processes
    of the node (torchrun's LOCAL_WORLD_SIZE), less one for the training process; at least 1, at most 10."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(10, per_process - 1))


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """End a DataLoader's worker processes now and wait for them.

    The training workers ignore SIGTERM and SIGINT (a signal to the whole job is for the main process), so the
    exit hook of multiprocessing, which terminates daemonic children with SIGTERM and then joins them without a
    time limit, would wait forever for a worker still alive at exit. This shuts them down through the
    DataLoader's own protocol and kills any that did not end."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    workers = list(getattr(iterator, "_workers", ()))
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


# ---------------------------------------------------------------------------------------------- labelled sets
# The labelled datasets of the evaluation commands (probe, analyze, finetune), each with its official split.
LABELLED_DATASETS = ("auto", "digits", "faces", "imagefolder", "cifar10", "cifar100", "flowers102", "pets")
SPLITS = ("train", "test")


def labels_of(dataset: ImageDataset) -> list[int]:
    """Every item's label, without decoding an image."""
    if hasattr(dataset, "labels"):
        return list(dataset.labels)
    return [label for _, label in dataset.samples]


def _every_third_to_test(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of a fixed stratified split: within each class, in dataset order, every third item is test."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.flatnonzero((rank % 3 == 2) == (split == "test"))


class BundledArrays(ImageDataset):
    """A small labelled set that ships inside an installed package, as uint8 RGB images; fixed stratified split
    (in each class, every third image is test).

    ``digits``: scikit-learn's 1,797 handwritten digits (8 x 8, 10 classes, 1,201 train / 596 test).
    ``faces``: scikit-image's LFW subset (25 x 25, 100 faces then 100 non-faces, 134 train / 66 test).
    """

    def __init__(self, name: str, transform, split: str = "train"):
        super().__init__(transform)
        if name == "digits":
            try:
                from sklearn.datasets import load_digits
            except ImportError as e:
                raise DatasetError("--dataset digits needs scikit-learn (pip install 'crate_kernels[analysis]')") from e
            bunch = load_digits()
            images, labels = bunch.images / 16.0, bunch.target
            self.classes = [str(c) for c in bunch.target_names]
            self.origin = "scikit-learn's handwritten digits"
        elif name == "faces":
            images = np.load(os.path.join(skimage_data_dir(), "lfw_subset.npy"))
            labels = np.repeat([0, 1], len(images) // 2)
            self.classes = ["face", "non-face"]
            self.origin = "scikit-image's LFW face / non-face subset"
        else:
            raise DatasetError(f"no bundled labelled set {name!r}; choose digits or faces")
        keep = _every_third_to_test(np.asarray(labels), split)
        grey = torch.from_numpy(np.round(np.clip(images[keep], 0, 1) * 255).astype(np.uint8))
        self.data = grey.unsqueeze(1).expand(-1, 3, -1, -1)
        self.labels = [int(c) for c in np.asarray(labels)[keep]]
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        counts = f"{counted(len(self), 'image')}, {counted(len(self.classes), 'class')}"
        return f"{self.origin}, {self.split} split ({counts})"

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data[index], self.labels[index]


def _find_root(data_path: str, marker: str, folders: tuple[str, ...]) -> str | None:
    """``data_path`` or one of its sub-folders ``folders`` that holds the file or folder ``marker``."""
    for root in (data_path, *(os.path.join(data_path, f) for f in folders)):
        if os.path.exists(os.path.join(root, marker)):
            return root
    return None


def _check_files(paths: list[str], what: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{what} lists {counted(len(missing), 'image')} that do not exist, e.g. "
                           f"{', '.join(missing[:3])}")


class Flowers102(FileImages):
    """Oxford Flowers-102 as its archives unpack: ``jpg/image_00001.jpg``..., ``imagelabels.mat`` (labels 1-102) and
    ``setid.mat`` (image ids of trnid / valid / tstid). Official split: train = trnid + valid (2,040 images),
    test = tstid (6,149). Labels are 0-based (the .mat's label minus one)."""

    FOLDERS = ("flowers-102", "flowers102")

    def __init__(self, root: str, transform, split: str = "train"):
        super().__init__(transform)
        base = _find_root(root, "setid.mat", self.FOLDERS)
        if base is None or not os.path.isfile(os.path.join(base, "imagelabels.mat")):
            raise DatasetError(f"Oxford Flowers-102 not found under {root}: expected jpg/, imagelabels.mat and "
                               "setid.mat (the official archives unpacked)")
        labels = self._mat(os.path.join(base, "imagelabels.mat"), "labels")
        ids = self._mat(os.path.join(base, "setid.mat"), *(("trnid", "valid") if split == "train" else ("tstid",)))
        if labels.min() < 1 or ids.min() < 1 or ids.max() > len(labels):
            raise DatasetError(f"{base}: setid.mat or imagelabels.mat holds ids or labels outside 1..{len(labels)}")
        self.classes = [str(c) for c in range(1, int(labels.max()) + 1)]
        self.samples = [(os.path.join(base, "jpg", f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in ids]
        _check_files([p for p, _ in self.samples], os.path.join(base, "setid.mat"))
        self.name = f"Oxford Flowers-102 {split} split in {base}"

    @staticmethod
    def _mat(path: str, *keys: str) -> np.ndarray:
        """The integer arrays ``keys`` of a MATLAB file, flattened and concatenated."""
        from scipy.io import loadmat

        try:
            mat = loadmat(path)
            return np.concatenate([np.asarray(mat[k]).astype(np.int64).ravel() for k in keys])
        except KeyError as e:
            raise DatasetError(f"{path} has no variable {e} (expected {', '.join(keys)})") from None
        except (OSError, ValueError, TypeError) as e:
            raise DatasetError(f"cannot read {path}: {e}") from e


class OxfordPets(FileImages):
    """Oxford-IIIT Pets as its archives unpack: ``images/<Name>_<n>.jpg`` and ``annotations/trainval.txt`` /
    ``annotations/test.txt`` (lines ``<image> <class id 1-37> <species> <breed id>``). Official split: train =
    trainval (3,680 images), test (3,669). Labels are the class id minus one; class names come from the image
    names."""

    FOLDERS = ("oxford-iiit-pet", "oxford_iiit_pet", "pets")

    def __init__(self, root: str, transform, split: str = "train"):
        super().__init__(transform)
        base = _find_root(root, os.path.join("annotations", "trainval.txt"), self.FOLDERS)
        if base is None or not os.path.isdir(os.path.join(base, "images")):
            raise DatasetError(f"Oxford-IIIT Pets not found under {root}: expected images/ and "
                               "annotations/trainval.txt, annotations/test.txt (the official archives unpacked)")
        names = {}
        for which in ("trainval", "test"):  # class names from both lists, so both splits share them
            rows = self._rows(os.path.join(base, "annotations", f"{which}.txt"))
            for _, _, class_id, breed in rows:
                if names.setdefault(class_id, breed) != breed:
                    raise DatasetError(f"annotations/{which}.txt in {base}: class id {class_id} is given to both "
                                       f"{names[class_id]} and {breed}")
            if which == ("trainval" if split == "train" else "test"):
                self.samples = [(os.path.join(base, "images", image + ".jpg"), class_id - 1)
                                for _, image, class_id, _ in rows]
        if sorted(names) != list(range(1, len(names) + 1)):
            raise DatasetError(f"annotations in {base}: class ids {sorted(names)} are not 1..{len(names)}")
        self.classes = [names[c] for c in range(1, len(names) + 1)]
        _check_files([p for p, _ in self.samples], os.path.join(base, "annotations"))
        self.name = f"Oxford-IIIT Pets {split} split in {base}"

    @staticmethod
    def _rows(path: str) -> list[tuple[int, str, int, str]]:
        """(line number, image name, class id, breed name) of an annotation list; '#' lines are comments."""
        if not os.path.isfile(path):
            raise DatasetError(f"Oxford-IIIT Pets annotation list {path} does not exist")
        rows = []
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                try:
                    rows.append((number, fields[0], int(fields[1]), fields[0].rsplit("_", 1)[0]))
                except (IndexError, ValueError):
                    raise DatasetError(f"{path}, line {number}: expected '<image> <class id> <species> <breed id>', "
                                       f"got {line.strip()!r}") from None
        return rows


def resolve_labelled(name: str, data_path: str | None, default: str = "digits") -> str:
    """``auto``: ``default`` without --data_path; else the layout found in it (CIFAR, Flowers-102, Pets, an
    ImageNet-style folder with train/ and val/); a folder in none of them is an error listing the layouts."""
    if name != "auto":
        return name
    if not data_path:
        return default
    if not os.path.isdir(data_path):
        raise DatasetError(f"--data_path {data_path} does not exist or is not a directory")
    for variant, (folder, *_rest) in CIFAR.LAYOUT.items():
        if os.path.basename(os.path.normpath(data_path)) == folder or os.path.isdir(os.path.join(data_path, folder)):
            return f"cifar{variant}"
    if _find_root(data_path, "setid.mat", Flowers102.FOLDERS):
        return "flowers102"
    if _find_root(data_path, os.path.join("annotations", "trainval.txt"), OxfordPets.FOLDERS):
        return "pets"
    if os.path.isdir(os.path.join(data_path, "train")) and os.path.isdir(os.path.join(data_path, "val")):
        return "imagefolder"
    raise DatasetError(
        f"--data_path {data_path} is in none of the labelled layouts: an ImageNet-style folder with train/<class>/ and "
        "val/<class>/, cifar-10-batches-py/ or cifar-100-python/, Oxford Flowers-102 (jpg/, imagelabels.mat, "
        "setid.mat) or Oxford-IIIT Pets (images/, annotations/trainval.txt, annotations/test.txt)"
    )


def _cifar_class_names(data_path: str, count: int) -> list[str]:
    """The class names in the archive's meta file (batches.meta / meta), else the label numbers."""
    folder, meta, key = {10: ("cifar-10-batches-py", "batches.meta", b"label_names"),
                         100: ("cifar-100-python", "meta", b"fine_label_names")}[count]
    base = data_path if os.path.basename(os.path.normpath(data_path)) == folder else os.path.join(data_path, folder)
    try:
        with open(os.path.join(base, meta), "rb") as f:
            names = [n.decode() for n in pickle.load(f, encoding="bytes")[key]]
        if len(names) == count:
            return names
    except (OSError, pickle.UnpicklingError, KeyError, EOFError, AttributeError):
        pass
    return [str(c) for c in range(count)]


def build_labelled(name: str, data_path: str | None, transform, split: str) -> ImageDataset:
    """The ``split`` ("train" or "test") of the labelled dataset ``name`` (see ``resolve_labelled``), with
    ``classes`` (names, index = label). ImageFolder's test split is val/, whose class folders must be train/'s."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = resolve_labelled(name, data_path)
    if name in ("digits", "faces"):
        if data_path:
            raise DatasetError(f"--dataset {name} ships inside an installed package and reads no --data_path "
                               f"(got {data_path})")
        return BundledArrays(name, transform, split)
    if not data_path:
        raise DatasetError(f"--dataset {name} needs --data_path")
    if name in ("cifar10", "cifar100"):
        count = int(name[5:])
        dataset = CIFAR(data_path, transform, train=split == "train", num_classes=count)
        dataset.classes = _cifar_class_names(data_path, count)
        return dataset
    if name == "flowers102":
        return Flowers102(data_path, transform, split)
    if name == "pets":
        return OxfordPets(data_path, transform, split)
    if name == "imagefolder":
        folders = {s: os.path.join(data_path, f) for s, f in (("train", "train"), ("test", "val"))}
        missing = [f for f in folders.values() if not os.path.isdir(f)]
        if missing:
            raise DatasetError(f"an image-folder dataset needs {data_path}/train and {data_path}/val with one folder "
                               f"per class; missing: {', '.join(missing)}")
        classes = {s: sorted(e.name for e in os.scandir(f) if e.is_dir()) for s, f in folders.items()}
        if classes["train"] != classes["test"]:
            only_train = sorted(set(classes["train"]) - set(classes["test"]))
            only_val = sorted(set(classes["test"]) - set(classes["train"]))
            raise DatasetError(
                f"the class folders of {folders['train']} and {folders['test']} differ, so labels would not match: "
                + "; ".join(part for part in (
                    only_train and f"missing from val/: {', '.join(only_train[:10])}",
                    only_val and f"not in train/: {', '.join(only_val[:10])}") if part))
        if len(classes["train"]) < 2:
            raise DatasetError(f"{folders['train']} needs at least 2 class folders, found {len(classes['train'])}")
        return ImageFolder(folders[split], transform)
    raise DatasetError(f"--dataset must be one of {', '.join(LABELLED_DATASETS)}, got {name!r}")


class LabelledViews(torch.utils.data.Dataset):
    """index -> (uint8 view or None, label, index, failed read or None): an unreadable image is skipped, never
    replaced, so no image is ever paired with another's label; ``normalize`` the views on the device."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            img = self.dataset.view(index)
        except UnreadableImage as e:
            return None, None, index, (e.path, e.reason)
        return img, self.dataset.label(index), index, None


def collate_labelled(samples: list):
    """A batch of ``LabelledViews`` items -> (uint8 images (b, 3, S, S) or None, labels (b,), indices (b,), failed
    reads), b counting the readable ones."""
    kept = [s for s in samples if s[0] is not None]
    failures = [s[3] for s in samples if s[3] is not None]
    if not kept:
        return None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), failures
    return (torch.stack([s[0] for s in kept]), torch.tensor([s[1] for s in kept]), torch.tensor([s[2] for s in kept]),
            failures)
