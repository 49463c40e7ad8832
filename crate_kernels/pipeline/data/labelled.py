"""The labelled datasets of the evaluation commands (probe, analyze, finetune), each with its official split:
scikit-learn's digits and faces (bundled), image folders, CIFAR, Oxford Flowers-102 and Oxford-IIIT Pets.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from ...errors import DatasetError, UnreadableImage
from .datasets import (
    CIFAR,
    Flowers102,
    ImageDataset,
    ImageFolder,
    OxfordPets,
    _find_root,
    counted,
    skimage_data_dir,
)

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
