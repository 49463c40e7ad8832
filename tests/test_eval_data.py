"""Labelled datasets of the evaluation commands, each layout built here from small generated files: exact labels and
official splits, and one clear message for every broken layout."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from crate_kernels.errors import DatasetError
from crate_kernels.pipeline.data import (
    CIFAR,
    BundledArrays,
    EvalTransform,
    Flowers102,
    ImageFolder,
    LabelledViews,
    OxfordPets,
    build_labelled,
    collate_labelled,
    labels_of,
    resolve_labelled,
)

T = EvalTransform(8)


def _jpeg(path, value):
    """A small image whose mean colour encodes ``value`` (so each label can be read back from the pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(path, quality=95)


def _pixel(dataset, i):
    return int(round(dataset.load(i)[0].float().mean().item()))


def test_bundled_sets_have_fixed_disjoint_stratified_splits():
    digits = {s: BundledArrays("digits", T, s) for s in ("train", "test")}
    assert (len(digits["train"]), len(digits["test"])) == (1201, 596) and digits["train"].classes[3] == "3"
    assert build_labelled("auto", None, T, "test").describe() == digits["test"].describe()
    for split in ("train", "test"):
        counts = np.bincount(labels_of(digits[split]), minlength=10)
        assert counts.min() > 0 and counts.max() - counts.min() < 25
    from sklearn.datasets import load_digits
    bunch = load_digits()
    pixels = {np.round(img / 16 * 255).astype(np.uint8).tobytes(): int(t)
              for img, t in zip(bunch.images, bunch.target)}
    for split in ("train", "test"):
        ds = digits[split]
        for i in torch.randint(len(ds), (20,)).tolist():
            img, label = ds.load(i)
            assert img.shape == (3, 8, 8) and pixels[img[0].numpy().tobytes()] == label
    faces = {s: BundledArrays("faces", T, s) for s in ("train", "test")}
    assert (len(faces["train"]), len(faces["test"])) == (134, 66) and faces["train"].classes == ["face", "non-face"]
    assert sorted(set(labels_of(faces["test"]))) == [0, 1] and faces["test"][0][0].shape == (3, 8, 8)


def _found_and_named(parent, folder, make, name, cls, classes, value):
    """(root, make's result, train, test) for a set that `make` writes to parent/folder: 'auto' under `parent`
    resolves to `name` and builds train (a `cls` with these `classes`); test is built by name from the root; each
    test image's pixel is `value` * (its label + 1)."""
    root = parent / folder
    made = make(root)
    assert resolve_labelled("auto", str(parent)) == name
    train = build_labelled("auto", str(parent), T, "train")
    test = build_labelled(name, str(root), T, "test")
    assert isinstance(train, cls) and train.classes == classes
    assert all(_pixel(test, i) == value * (labels_of(test)[i] + 1) for i in range(len(test)))
    return root, made, train, test


def _flowers(root, n=12):
    labels = [1 + i % 3 for i in range(n)]  # 3 classes
    for i in range(1, n + 1):
        _jpeg(root / "jpg" / f"image_{i:05d}.jpg", 20 * labels[i - 1])
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]),
                                 "tstid": np.arange(7, n + 1)[None]})
    return labels


def test_flowers102_official_splits_and_labels(tmp_path):
    root, labels, train, test = _found_and_named(tmp_path, "flowers-102", _flowers, "flowers102", Flowers102,
                                                 ["1", "2", "3"], value=20)
    assert [p.rsplit("_", 1)[1] for p, _ in train.samples] == [f"{i:05d}.jpg" for i in range(1, 7)]
    assert len(test) == 6 and labels_of(test) == [c - 1 for c in labels[6:]]
    (root / "jpg" / "image_00008.jpg").unlink()
    with pytest.raises(DatasetError, match=r"setid.mat lists 1 image that do not exist, e.g. .*image_00008.jpg"):
        build_labelled("flowers102", str(root), T, "test")
    savemat(root / "setid.mat", {"trnid": np.array([[1]])})
    with pytest.raises(DatasetError, match="setid.mat has no variable 'tstid'"):
        build_labelled("flowers102", str(root), T, "test")


def _pets(root):
    rows = {"trainval": [("Abyssinian_1", 1), ("Abyssinian_2", 1), ("beagle_10", 2), ("beagle_11", 2),
                         ("Bombay_3", 3)],
            "test": [("Abyssinian_5", 1), ("beagle_12", 2), ("Bombay_4", 3), ("Bombay_9", 3)]}
    for split, items in rows.items():
        lines = [f"{name} {cid} {1 + (cid == 2)} {cid}\n" for name, cid in items]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.txt").write_text("".join(lines))
        for name, cid in items:
            _jpeg(root / "images" / f"{name}.jpg", 30 * cid)
    return rows


def test_oxford_pets_official_splits_and_labels(tmp_path):
    root, rows, train, test = _found_and_named(tmp_path, "oxford-iiit-pet", _pets, "pets", OxfordPets,
                                               ["Abyssinian", "beagle", "Bombay"], value=30)
    assert labels_of(train) == [cid - 1 for _, cid in rows["trainval"]] and len(test) == 4
    with open(root / "annotations" / "test.txt", "a") as f:
        f.write("beagle_13 3 2 3\n")
    with pytest.raises(DatasetError, match="class id 3 is given to both Bombay and beagle"):
        build_labelled("pets", str(root), T, "test")
    (root / "annotations" / "test.txt").write_text("Abyssinian_5 one 1 1\n")
    with pytest.raises(DatasetError, match=r"test.txt, line 1: expected '<image> <class id>"):
        build_labelled("pets", str(root), T, "train")


def test_image_folder_needs_matching_class_folders(tmp_path):
    for split, classes in (("train", ("cat", "dog", "emu")), ("val", ("cat", "emu"))):
        for c, cls in enumerate(classes):
            _jpeg(tmp_path / split / cls / "0.jpg", 40 * (c + 1))
    assert resolve_labelled("auto", str(tmp_path)) == "imagefolder"
    with pytest.raises(DatasetError, match="missing from val/: dog"):
        build_labelled("auto", str(tmp_path), T, "test")
    _jpeg(tmp_path / "val" / "dog" / "0.jpg", 80)
    test = build_labelled("imagefolder", str(tmp_path), T, "test")
    assert isinstance(test, ImageFolder) and test.classes == ["cat", "dog", "emu"] and labels_of(test) == [0, 1, 2]


def test_cifar_through_the_labelled_builder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, count in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
        labels = torch.randint(10, (count,)).tolist()
        data = np.repeat(np.array(labels, np.uint8)[:, None] * 20, 3072, axis=1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    test = build_labelled("auto", str(tmp_path), T, "test")
    assert isinstance(test, CIFAR) and test.classes == [str(c) for c in range(10)] and len(test) == 4
    names = [f"class{c}".encode() for c in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    assert build_labelled("cifar10", str(folder), T, "train").classes[3] == "class3"
    assert all(_pixel(test, i) == 20 * labels_of(test)[i] for i in range(4))


def test_a_folder_in_no_layout_is_one_message_naming_the_layouts(tmp_path):
    _jpeg(tmp_path / "cats" / "0.jpg", 10)
    with pytest.raises(DatasetError, match="none of the labelled layouts: an ImageNet-style folder .* Oxford-IIIT"):
        resolve_labelled("auto", str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_labelled("auto", str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="--dataset pets needs --data_path"):
        build_labelled("pets", None, T, "train")
    with pytest.raises(DatasetError, match="--dataset digits ships inside an installed package and reads no"):
        build_labelled("digits", str(tmp_path), T, "train")


def test_unreadable_images_are_skipped_with_their_labels(tmp_path):
    for c, cls in enumerate(("a", "b")):
        for i in range(3):
            _jpeg(tmp_path / "train" / cls / f"{i}.jpg", 50 + 100 * c)
            _jpeg(tmp_path / "val" / cls / f"{i}.jpg", 50 + 100 * c)
    broken = tmp_path / "val" / "a" / "1.jpg"
    broken.write_bytes(b"not a jpeg")
    test = build_labelled("imagefolder", str(tmp_path), T, "test")
    imgs, labels, indices, failures = collate_labelled([LabelledViews(test)[i] for i in range(len(test))])
    assert len(imgs) == 5 and indices.tolist() == [0, 2, 3, 4, 5] and labels.tolist() == [0, 0, 1, 1, 1]
    assert failures == [(str(broken), failures[0][1])]
    assert imgs.dtype == torch.uint8  # normalised on the device
    brightness = imgs.float().mean(dim=(1, 2, 3)).round()
    assert (brightness == torch.tensor([50.0, 50, 150, 150, 150])).all()  # each kept image with its own label
