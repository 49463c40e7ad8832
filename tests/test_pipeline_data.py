"""Data: uint8 MAE transforms (JPEGs decoded at reduced size where the crop allows), datasets (scikit-image photos,
ImageFolder, CIFAR), deterministic sampler."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crate_kernels.errors import DatasetError, UnreadableImage
from crate_kernels.pipeline.data import (
    CIFAR,
    SKIMAGE_HELD_OUT,
    SKIMAGE_PHOTOS,
    EvalTransform,
    ImageFolder,
    MaskedViews,
    ShardedBatchSampler,
    SkimagePhotos,
    TrainTransform,
    UnreadableImages,
    build_dataset,
    collate_views,
    datasets,
    default_num_workers,
    fixed_batch,
    normalize,
    read_image,
    resolve_dataset,
    skimage_data_dir,
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


def _float_view(img: torch.Tensor, box, size: int, flip: bool) -> torch.Tensor:
    """The view computed the slow, exact way (the pipeline's earlier path): crop a uint8 (3, H, W) image, resize in
    float32 with antialiased bicubic interpolation, flip; values in [0, 1]."""
    top, left, h, w = box
    x = img[:, top:top + h, left:left + w].unsqueeze(0).float() / 255
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    return x.flip(-1) if flip else x


def test_transforms_are_uint8_deterministic_and_match_the_exact_float_view():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    img = F.avg_pool2d(img.float().unsqueeze(0), 5, 1, 2)[0].round().to(torch.uint8)  # photo-like smoothness
    t = TrainTransform(16)
    a = t(img.permute(1, 2, 0), torch.Generator().manual_seed(1))
    b = t(img.permute(1, 2, 0), torch.Generator().manual_seed(1))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)
    flips = 0
    for seed in range(20):  # the same crops and flips, from the same random draws, as the float path
        gen = torch.Generator().manual_seed(seed)
        box = t.crop_box(50, 70, gen)
        flip = bool(torch.rand((), generator=gen) < 0.5)
        flips += flip
        view = t(img.permute(1, 2, 0), torch.Generator().manual_seed(seed)).float() / 255
        exact = _float_view(img, box, 16, flip)
        assert (view - exact).abs().max() <= 1.01 / 255  # uint8 rounding only
    assert 3 <= flips <= 17
    white = EvalTransform(8)(torch.full((20, 30, 3), 255, dtype=torch.uint8))
    assert white.shape == (3, 8, 8) and white.dtype == torch.uint8 and (white == 255).all()
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(normalize(white), expected.view(3, 1, 1).expand(3, 8, 8))


def _photo_jpeg(path, width, height):
    """A JPEG with photo-like content: a bundled photograph resized to width x height."""
    Image.open(os.path.join(skimage_data_dir(), "astronaut.png")).convert("RGB").resize(
        (width, height), Image.BICUBIC).save(path, quality=92)


def test_jpegs_decode_at_reduced_size_when_the_crop_allows_and_stay_close_to_the_full_decode(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    _photo_jpeg(tmp_path / "big.jpg", 1200, 900)
    _photo_jpeg(tmp_path / "small.jpg", 500, 375)
    scales = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def observed_draft(im, mode, size):  # record the decoder's scale without changing it
        result = original_draft(im, mode, size)
        scales.append(im.decoderconfig[0] if im.decoderconfig else 1)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", observed_draft)
    monkeypatch.setattr(datasets, "_SIMPLEJPEG", False)  # PIL's decoder (simplejpeg's is compared with it below)
    for name, size, expect_reduced in [("big.jpg", 64, True), ("small.jpg", 224, False), ("big.jpg", 224, None)]:
        ds = ImageFolder(str(tmp_path), TrainTransform(size))
        index = [p for p, _ in ds.samples].index(str(tmp_path / name))
        full = read_image(ds.samples[index][0])
        for seed in range(6):
            gen = torch.Generator().manual_seed(seed)
            box = ds.transform.crop_box(full.shape[1], full.shape[2], gen)
            flip = bool(torch.rand((), generator=gen) < 0.5)
            scales[:] = []
            view = ds.view(index, torch.Generator().manual_seed(seed)).float() / 255
            reduced = max(scales, default=1) > 1
            assert expect_reduced in (None, reduced), (name, size, seed, scales)
            error = (view - _float_view(full, box, size, flip)).abs().mean().item()
            # reduced: the DCT-scaled decode, its region's edges snapped to its grid (< half an output pixel)
            assert error < (8 / 255 if reduced else 1 / 255), (name, size, seed, error)


def test_normalize_on_the_batch_device():
    batch = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(normalize(batch), (batch.double() / 255 - mean.double()) / std.double(),
                               check_dtype=False)
    assert normalize(batch).dtype == torch.float32


def test_skimage_photos_are_bundled_rgb_and_the_eval_split_is_held_out():
    ds = SkimagePhotos(EvalTransform(32), epoch_size=40)
    assert len(ds) == 40 and len(ds.images) == len(SKIMAGE_PHOTOS) == 7
    assert all(img.dtype == torch.uint8 and img.shape[0] == 3 for img in ds.images)
    assert ds[3][0].shape == (3, 32, 32) and resolve_dataset("auto", None) == "skimage"
    held_out = build_dataset("skimage", None, EvalTransform(32), train=False)
    assert held_out.names == SKIMAGE_HELD_OUT and len(held_out) == 2 and not set(SKIMAGE_HELD_OUT) & set(ds.names)
    train_pixels = {img.numpy().tobytes() for img in ds.images}
    assert not any(img.numpy().tobytes() in train_pixels for img in held_out.images)
    assert "held out of training: chelsea.png, coffee.png" in held_out.describe()


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
    with pytest.raises(UnreadableImage, match="broken.jpg"):
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


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])  # 2: the release files' (Python 2, numpy 1)
def test_cifar_files_are_read_with_a_restricted_unpickler_that_refuses_a_crafted_one(tmp_path, protocol):
    data = torch.randint(0, 256, (3, 3072), dtype=torch.uint8).numpy()
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": b"training batch 1 of 5", b"labels": [1, 2, 3], b"data": data,
                         b"filenames": [b"a.png", b"b.png", b"c.png"]}, f, protocol=protocol)
    test = build_dataset("cifar10", str(tmp_path), EvalTransform(32), train=False)
    assert torch.equal(test.load(2)[0], torch.from_numpy(data[2].reshape(3, 32, 32))) and test.load(2)[1] == 3

    marker = tmp_path / "ran"

    class Payload:  # what a crafted archive does: a pickle that calls a function when loaded
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0], b"data": Payload()}, f, protocol=protocol)
    with pytest.raises(DatasetError, match=r"test_batch: it names posix\.mkdir, which CIFAR's files never hold"):
        build_dataset("cifar10", str(tmp_path), EvalTransform(32), train=False)
    assert not marker.exists()


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
    (a, noise_a, fail_a), (b, noise_b, fail_b) = views[(2, 99)], views[(2, 99)]
    assert torch.equal(a, b) and torch.equal(noise_a, noise_b) and noise_a.shape == (16,) and fail_a == fail_b == []
    assert not torch.equal(views[(2, 100)][0], a)


def _folder_with_bad_files(root, good=12, bad=("b/bad.jpg", "a/bad_truncated.png")):
    """An ImageNet-style folder of random images in which the ``bad`` files are truncated or not images."""
    for i in range(good):
        cls = "ab"[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.randint(0, 256, (20, 24, 3), np.uint8)).save(root / cls / f"{i}.png")
    for k, name in enumerate(bad):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if k % 2:
            Image.fromarray(np.random.randint(0, 256, (20, 24, 3), np.uint8)).save(root / name)
            data = (root / name).read_bytes()
            (root / name).write_bytes(data[: len(data) // 2])  # truncated
        else:
            (root / name).write_bytes(b"\xff\xd8 not a jpeg")
    return ImageFolder(str(root), TrainTransform(8))


def test_unreadable_images_are_replaced_by_a_deterministic_other_sample(tmp_path):
    ds = _folder_with_bad_files(tmp_path)
    views = MaskedViews(ds, num_patches=4)
    bad = [i for i, (path, _) in enumerate(ds.samples) if "bad" in path]
    assert len(bad) == 2
    for index in bad:
        img, noise, failures = views[(index, 1234 + index)]
        again = views[(index, 1234 + index)]
        assert img.shape == (3, 8, 8) and torch.isfinite(img).all() and noise.shape == (4,)
        assert torch.equal(img, again[0]) and torch.equal(noise, again[1])  # a function of (index, seed)
        assert failures and failures[0][0] == ds.samples[index][0] and failures[0][1]
    batch = collate_views([views[(i, 7 * i)] for i in range(len(ds))])
    assert batch[0].shape == (len(ds), 3, 8, 8) and {p for p, _ in batch[2]} == {ds.samples[i][0] for i in bad}


@pytest.mark.parametrize("decoder", ["simplejpeg", "PIL"])
def test_an_unreadable_images_warning_names_the_file_and_the_reason_in_words(tmp_path, monkeypatch, decoder):
    monkeypatch.setattr(datasets, "_SIMPLEJPEG", decoder == "simplejpeg" and datasets._SIMPLEJPEG)
    ds = _folder_with_bad_files(tmp_path, good=2, bad=("b/bad.jpg", "a/truncated.png"))
    reasons = {}
    for index, (path, _) in enumerate(ds.samples):
        try:
            ds.view(index)
        except UnreadableImage as e:
            reasons[os.path.basename(e.path)] = e.reason
            assert e.path == path and str(e) == f"cannot read image {path}: {e.reason}"
    assert set(reasons) == {"bad.jpg", "truncated.png"}
    assert "object at 0x" not in "".join(reasons.values())  # never the repr of an in-memory file
    assert reasons["bad.jpg"].startswith("not an image PIL can identify") and "truncated" in reasons["truncated.png"]
    warnings = []
    UnreadableImages(1.0, warnings.append).add([(ds.samples[0][0], reasons["bad.jpg"])], 3)
    assert warnings == [f"warning: skipped unreadable image {ds.samples[0][0]} ({reasons['bad.jpg']}); a "
                        "deterministic other sample replaces it"]


def test_a_sample_with_no_readable_image_gives_a_batch_of_none(tmp_path):
    ds = _folder_with_bad_files(tmp_path, good=0, bad=("a/0.jpg", "a/1.jpg"))
    imgs, noise, failures = collate_views([MaskedViews(ds, num_patches=4, attempts=3)[(0, 5)]])
    assert imgs is None and noise is None and len(failures) == 3
    with pytest.raises(DatasetError, match=r"no readable image in any file it tried \(3 failed reads"):
        UnreadableImages(0.5, lambda text: None).add(failures, None)


def test_unreadable_tally_warns_once_per_file_and_stops_past_the_fraction():
    warnings = []
    tally = UnreadableImages(0.01, warnings.append, min_reads=1000)
    for _ in range(3):
        tally.add([("/data/x.jpg", "truncated")], 63)
    assert len(warnings) == 1 and "/data/x.jpg" in warnings[0] and (tally.failed, tally.reads) == (3, 192)
    for k in range(7):  # 10 failed reads: at the allowance of 1% of at least 1000 reads
        tally.add([(f"/data/y{k}.jpg", "bad")], 63)
    with pytest.raises(DatasetError, match=r"11 of 704 image reads failed \(9 files\), more than --max_unreadable 0.01 "
                                           r"of 1000 reads, the fewest the fraction is counted over"):
        tally.add([("/data/z.jpg", "bad")], 63)  # 11 > 1% of 1000: stopped now rather than at the 1000th read
    late = UnreadableImages(0.01, warnings.append, min_reads=1000, failed=10, reads=1990)
    late.add([("/data/w.jpg", "bad")], 9)  # 11 of 2000: within 1% of the reads so far
    with pytest.raises(DatasetError, match=r"more than --max_unreadable 0.01 of the reads;"):
        late.add([("/data/w.jpg", "bad")] * 10, 80)  # 21 of 2090
    strict = UnreadableImages(0.0, warnings.append)
    with pytest.raises(DatasetError, match="more than --max_unreadable 0"):
        strict.add([("/data/x.jpg", "bad")], 7)


def test_eval_batch_skips_unreadable_images_and_is_fixed(tmp_path):
    ds = _folder_with_bad_files(tmp_path)
    a, noise_a, failures = fixed_batch(ds, 14, 4, seed=3)
    b, noise_b, _ = fixed_batch(ds, 14, 4, seed=3)
    assert a.shape == (14, 3, 8, 8) and torch.equal(a, b) and torch.equal(noise_a, noise_b) and failures


def test_default_workers_fit_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_num_workers() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_num_workers() == 10
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers() == 7
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(1)), raising=False)
    assert default_num_workers() == 1


def test_simplejpeg_and_pil_decode_the_same_views(tmp_path, monkeypatch):
    """With simplejpeg installed, JPEGs take its faster decoder; the views are those of PIL's (same libjpeg-turbo
    decode, same DCT scaling), and what it refuses (a CMYK JPEG here) still decodes through PIL."""
    pytest.importorskip("simplejpeg")
    _photo_jpeg(tmp_path / "a.jpg", 640, 480)
    _photo_jpeg(tmp_path / "b.jpg", 375, 500)
    Image.open(tmp_path / "a.jpg").convert("CMYK").save(tmp_path / "c_cmyk.jpg", quality=90)
    for size in (224, 64):
        views = {}
        for fast in (True, False):
            monkeypatch.setattr(datasets, "_SIMPLEJPEG", fast)
            ds = ImageFolder(str(tmp_path), TrainTransform(size))
            kinds = [type(ds.open(i)).__name__ for i in range(len(ds))]
            assert ("EncodedJPEG" in kinds) == fast
            views[fast] = [ds.view(i, torch.Generator().manual_seed(10 * i + s)) for i in range(3) for s in range(4)]
        for fast_view, pil_view in zip(views[True], views[False]):
            assert torch.equal(fast_view, pil_view)
