"""Data: torch-only MAE transforms, datasets (scikit-image photos, ImageFolder, CIFAR), deterministic sampler."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from crate_kernels.train.data import (
    CIFAR, DatasetError, EvalTransform, ImageFolder, MaskedViews, ShardedBatchSampler, SkimagePhotos, TrainTransform,
    build_dataset, resolve_dataset,
)


def test_random_resized_crop_boxes_follow_the_recipe():
    t = TrainTransform(32)
    gen = torch.Generator().manual_seed(0)
    for height, width in [(300, 451), (40, 500), (64, 64)]:
        for _ in range(200):
            top, left, h, w = t.crop_box(height, width, gen)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            if (height, width) == (64, 64):
                assert 0.2 * 64 * 64 * 0.9 <= h * w <= 64 * 64 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_transforms_shapes_normalisation_and_determinism():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    t = TrainTransform(16)
    a = t(img, torch.Generator().manual_seed(1))
    b = t(img, torch.Generator().manual_seed(1))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    white = EvalTransform(8)(torch.full((3, 20, 30), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert white.shape == (3, 8, 8) and torch.allclose(white, expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-5)


def test_skimage_photos_are_bundled_rgb():
    ds = SkimagePhotos(EvalTransform(32), epoch_size=40)
    assert len(ds) == 40 and len(ds.images) >= 9
    assert all(img.dtype == torch.uint8 and img.shape[0] == 3 for img in ds.images)
    assert ds[3][0].shape == (3, 32, 32) and resolve_dataset("auto", None) == "skimage"


def test_image_folder(tmp_path):
    for cls in ("b_dog", "a_cat"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / "train" / cls / f"{i}.png")
    ds = build_dataset("auto", str(tmp_path), EvalTransform(8))
    assert isinstance(ds, ImageFolder) and ds.classes == ["a_cat", "b_dog"] and len(ds) == 4
    img, label = ds[3]
    assert img.shape == (3, 8, 8) and label == 1
    # no val/ folder: the eval split falls back to train/
    assert len(build_dataset("imagefolder", str(tmp_path), EvalTransform(8), train=False)) == 4


def test_flat_folder_of_unlabelled_images(tmp_path):
    """Pretraining needs no labels: images directly in --data_path form one class."""
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 60 * i, np.uint8)).save(tmp_path / "photos" / f"{i}.jpg")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    ds = build_dataset("auto", str(tmp_path / "photos"), EvalTransform(8))
    assert isinstance(ds, ImageFolder) and ds.classes == ["photos"] and len(ds) == 3
    assert ds[2][0].shape == (3, 8, 8) and ds[2][1] == 0


def test_empty_missing_and_unreadable_datasets_are_named(tmp_path):
    with pytest.raises(DatasetError, match=f"no images found in {tmp_path}"):
        ImageFolder(str(tmp_path), EvalTransform(8))
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(str(tmp_path / "nowhere"), EvalTransform(8))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        ImageFolder(str(tmp_path), EvalTransform(8))[0]
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        build_dataset("cifar10", str(tmp_path), EvalTransform(8))


def _write_cifar(root, files, label_key, n=5):
    root.mkdir(parents=True)
    for i, name in enumerate(files):
        data = np.arange(n * 3072, dtype=np.int64).reshape(n, 3072) % 256 + i
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data.astype(np.uint8), label_key: list(range(n))}, f)


def test_cifar_pickle_folders(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels")
    _write_cifar(tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels")
    assert resolve_dataset("auto", str(tmp_path)) == "cifar10"
    train = build_dataset("cifar10", str(tmp_path), EvalTransform(32))
    test = build_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"), EvalTransform(32), train=False)
    assert isinstance(train, CIFAR) and len(train) == 25 and len(test) == 5
    assert train.load(6)[0].shape == (3, 32, 32) and train.load(6)[1] == 1
    assert len(build_dataset("cifar100", str(tmp_path), EvalTransform(32))) == 5


def test_sampler_is_a_function_of_seed_and_epoch_and_shards_global_batches():
    single = ShardedBatchSampler(50, batch_size=8, seed=3, accum_iter=2)
    assert single.num_batches == 6  # 50 // 8 = 6 batches, a multiple of accum_iter
    ranks = [ShardedBatchSampler(50, batch_size=4, world_size=2, rank=r, seed=3, accum_iter=2) for r in range(2)]
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        for whole, r0, r1 in zip(single, *ranks):
            assert whole == r0 + r1
    single.set_epoch(1)
    full = list(single)
    single.set_epoch(1, start=4)
    assert list(single) == full[4:] and len(single) == 2
    single.set_epoch(2)
    assert list(single) != full


def test_masked_views_are_deterministic_per_sample():
    views = MaskedViews(SkimagePhotos(TrainTransform(16), epoch_size=8), num_patches=16)
    (a, noise_a), (b, noise_b) = views[(2, 99)], views[(2, 99)]
    assert torch.equal(a, b) and torch.equal(noise_a, noise_b) and noise_a.shape == (16,)
    assert not torch.equal(views[(2, 100)][0], a)
