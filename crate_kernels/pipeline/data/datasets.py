"""The pretraining datasets: scikit-image's bundled photos, image folders (ImageNet-style or flat), CIFAR; what
``--dataset auto`` finds under ``--data_path``; unreadable files reported as ``UnreadableImage`` naming the file.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pickle

import numpy as np
import torch

from ...errors import DatasetError, UnreadableImage
from .images import EncodedJPEG, _pil, _pil_errors, _reason, normalize, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("auto", "skimage", "imagefolder", "cifar10", "cifar100", "flowers102", "pets", "webdataset")

# The colour photographs that ship inside the scikit-image wheel (no download); grey ones are left out.
# Training crops come from the first seven; the last two are held out for the evaluation batch.
SKIMAGE_PHOTOS = (
    "astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
    "motorcycle_right.png",
)
SKIMAGE_HELD_OUT = ("chelsea.png", "coffee.png")
# JPEGs decode through simplejpeg where it is installed (pip install simplejpeg; the `jpeg` extra), else PIL.
_SIMPLEJPEG = importlib.util.find_spec("simplejpeg") is not None


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


def open_encoded(data: bytes, extension: str):
    """An encoded image's bytes, not yet decoded (the transform decodes, at reduced size where it can): an
    ``EncodedJPEG`` for a JPEG in the colours simplejpeg decodes, when it is installed; else a lazily opened PIL
    image. ``extension``: the file's, without the dot (``jpg``, ``png``, ...)."""
    if _SIMPLEJPEG and extension.lower() in ("jpg", "jpeg"):
        try:
            jpeg = EncodedJPEG(data)
        except ValueError:  # not a JPEG simplejpeg can read: PIL decides
            jpeg = None
        if jpeg is not None and jpeg.colorspace in ("RGB", "YCbCr", "Gray"):
            return jpeg
    return _pil().open(io.BytesIO(data))


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
                return open_encoded(f.read(), "jpg")
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


class _CIFARUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR's python files hold and nothing else: dicts, lists, bytes, str and ints (built in,
    no class lookup) and numpy arrays; any other class or function a pickle names is refused, so a crafted file
    cannot run code (pickle.load would call whatever the file names)."""

    ALLOWED = ({(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}
               | {(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")}  # pickle protocol 5
               | {("numpy", "ndarray"), ("numpy", "dtype")}
               | {("_codecs", "encode")})  # bytes, as Python 3 writes them at protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR's files never hold (refused: a "
                                         "pickle can run any function it names)")
        return super().find_class(module, name)


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
                    batch = _CIFARUnpickler(f, encoding="bytes").load()
                data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += list(batch[label_key])
            except pickle.UnpicklingError as e:
                raise DatasetError(f"cannot read CIFAR file {path}: {e}") from e
            except (OSError, KeyError, ValueError, EOFError, TypeError) as e:
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
    """``auto``: scikit-image photos without --data_path; WebDataset shards for a path or pattern ending in .tar;
    CIFAR, Oxford-IIIT Pets or Flowers-102 when their files are found; else an image folder."""
    if name != "auto":
        return name
    if not data_path:
        return "skimage"
    if data_path.endswith(".tar") or ".tar::" in data_path:
        return "webdataset"
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
    if name == "webdataset":
        raise DatasetError("WebDataset shards are read as a stream (pipeline.data.shards.ShardStream), not as a "
                           "dataset of indexed items")
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
