"""Every command on every dataset layout README lists, each in its official on-disk format (generated tiny), with both
model families: pretraining where it applies, probe, finetune and analyze, for a tiny CRATE-MAE run and a tiny ViT-MAE
release checkpoint; and no command leaves an output folder behind when it fails."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from crate_kernels.analyze import main as analyze_main
from crate_kernels.finetune import main as finetune_main
from crate_kernels.models.registry import MODELS
from crate_kernels.models.vit_mae import MaskedAutoencoderViT
from crate_kernels.probe import main as probe_main
from crate_kernels.train import main as train_main

LAYOUTS = ("imagefolder", "cifar10", "cifar100", "flowers102", "pets")
# a few steps of batch 4 at 16 px, patch 4; no workers, no TensorBoard
TRAIN = ["--input_size", "16", "--patch_size", "4", "--batch_size", "4", "--max_steps", "2", "--num_workers", "0",
         "--no_tensorboard", "--threads", "1"]
PROBE = ["--logreg_c", "1", "--num_workers", "0", "--threads", "1"]
FINETUNE = ["--batch_size", "4", "--max_steps", "2", "--num_workers", "0", "--no_tensorboard", "--threads", "1"]
ANALYZE = ["--crops", "1", "--threads", "1"]


def _photo(path, gen, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gen.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _imagefolder(root, gen):
    """ImageNet's layout: train/<class>/*.JPEG and val/<class>/*.JPEG."""
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("n01440764", "n01443537", "n01484850"):
            for i in range(count):
                _photo(root / split / cls / f"{cls}_{split}_{i}.JPEG", gen)


def _cifar(root, gen, classes):
    """The python version: pickled dicts with bytes keys, data (N, 3072) uint8 rows (R, G, B planes)."""
    folder, labels_key = ("cifar-10-batches-py", b"labels") if classes == 10 else ("cifar-100-python", b"fine_labels")
    batches = ([(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)] if classes == 10
               else [("train", 12), ("test", 6)])
    (root / folder).mkdir(parents=True)
    kept = (0, 7, classes - 1)  # three classes, each in every batch: the test split's classes are all trained on
    for name, count in batches:
        labels = [kept[i % 3] for i in range(count)]
        batch = {b"batch_label": name.encode(), labels_key: labels, b"filenames": [f"{i}.png".encode() for i in
                 range(count)], b"data": gen.integers(0, 256, (count, 3072), dtype=np.uint8)}
        if classes == 100:
            batch[b"coarse_labels"] = [c // 5 for c in labels]
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = ({b"label_names": [f"class{c}".encode() for c in range(10)], b"num_cases_per_batch": 3}
            if classes == 10 else {b"fine_label_names": [f"fine{c}".encode() for c in range(100)],
                                   b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]})
    with open(root / folder / ("batches.meta" if classes == 10 else "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)


def _flowers(root, gen):
    """jpg/image_00001.jpg..., imagelabels.mat (1 x N labels 1-102), setid.mat (trnid, valid, tstid)."""
    from scipy.io import savemat

    for i in range(1, 16):
        _photo(root / "jpg" / f"image_{i:05d}.jpg", gen)
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 3] * 5], np.uint8)})
    savemat(root / "setid.mat", {"trnid": np.array([range(1, 7)], np.uint16),
                                 "valid": np.array([range(7, 10)], np.uint16),
                                 "tstid": np.array([range(10, 16)], np.uint16)})


def _pets(root, gen):
    """images/<Breed>_<n>.jpg; annotations/list.txt, trainval.txt, test.txt ('<image> <class id> <species> <breed
    id>') and the trimaps (PNG masks of 1, 2, 3) that pretraining must not read as photos."""
    rows = {"trainval": [], "test": []}
    for c, (breed, species) in enumerate((("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)), start=1):
        for i in range(1, 6):
            name = f"{breed}_{i}"
            _photo(root / "images" / f"{name}.jpg", gen)
            (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
            Image.fromarray(gen.integers(1, 4, (20, 24), dtype=np.uint8)).save(
                root / "annotations" / "trimaps" / f"{name}.png")
            rows["trainval" if i <= 3 else "test"].append(f"{name} {c} {species} {i}")
    for split, lines in rows.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "annotations" / "list.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(rows["trainval"] + rows["test"]) + "\n")


def make_layout(layout, root):
    gen = np.random.default_rng(abs(hash(layout)) % 2 ** 32)
    if layout.startswith("cifar"):
        _cifar(root, gen, int(layout[5:]))
    else:
        {"imagefolder": _imagefolder, "flowers102": _flowers, "pets": _pets}[layout](root, gen)
    return root


def _photos_in(root):
    return sorted(os.path.join(folder, f) for folder, _, files in os.walk(root) for f in files
                  if f.lower().endswith((".jpg", ".jpeg")))[:2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{'crate': a tiny CRATE-MAE run directory, 'vit': a tiny ViT-MAE release checkpoint (FAIR's format)}."""
    root = tmp_path_factory.mktemp("checkpoints")
    assert train_main(TRAIN + ["--eval_every", "0", "--epoch_size", "8", "--output_dir", str(root / "crate")]) == 0
    vit = MaskedAutoencoderViT(img_size=16, patch_size=4, **MODELS["mae_vit_demo"])
    torch.save({"model": {f"module.{k}": v for k, v in vit.state_dict().items()}}, root / "vit.pth")
    return {"crate": str(root / "crate"), "vit": str(root / "vit.pth")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_command_on_each_layout_with_both_families(layout, checkpoints, tmp_path, capsys):
    data = make_layout(layout, tmp_path / "data")
    # pretraining from scratch, the layout detected (Pets: the photos of its trainval split, never the trimaps)
    run = tmp_path / "pretrain"
    warmup = ["--warmup_steps", "1"] if layout == "cifar10" else []  # elsewhere the 2 steps end inside the warmup
    assert train_main(TRAIN + warmup + ["--data_path", str(data), "--eval_every", "2", "--eval_images", "2",
                                        "--output_dir", str(run)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    described = {"imagefolder": f"image folder {data / 'train'} (12 images, 3 classes",
                 "cifar10": "CIFAR-10 train split", "cifar100": "CIFAR-100 train split",
                 "flowers102": "Oxford Flowers-102 train split", "pets": "Oxford-IIIT Pets train split"}[layout]
    assert f"  data: {described}" in printed
    if layout == "pets":
        assert "(9 images, 3 classes)" in printed  # the trainval photos only
    assert ("note: the run ends inside the lr warmup: 2 steps (--max_steps), warmup" in printed) == (not warmup)
    for family, source in checkpoints.items():
        out = tmp_path / f"probe-{family}"
        assert probe_main([source, "--data_path", str(data), "--output_dir", str(out)] + PROBE) == 0, \
            capsys.readouterr().err
        results = [json.loads((out / f).read_text()) for f in os.listdir(out) if f.endswith(".json")]
        assert len(results) == 1 and 0 <= results[0]["top1"] <= 100 and results[0]["test_images"] > 0
        assert probe_main([source, "--data_path", str(data), "--output_dir", str(out)] + PROBE) == 0
        assert "features: cached" in capsys.readouterr().out  # the data's fingerprint is stable
        out = tmp_path / f"finetune-{family}"
        assert finetune_main([source, "--data_path", str(data), "--output_dir", str(out)] + FINETUNE) == 0, \
            capsys.readouterr().err
        with open(out / "args.yaml") as f:
            assert f"dataset: {layout}" in f.read()
        assert os.path.isfile(out / "model.safetensors") and not os.path.exists(out / ".lock")
        photos = _photos_in(data)  # analyze reads image files: none in the CIFAR pickles
        if photos:
            out = tmp_path / f"analyze-{family}"
            assert analyze_main([source, *photos, "--output_dir", str(out)] + ANALYZE) == 0, capsys.readouterr().err
            assert "analysis.json" in os.listdir(out)


def test_pretraining_refuses_a_pets_root_read_as_an_image_folder(tmp_path, capsys):
    data = make_layout("pets", tmp_path / "pets")
    out = tmp_path / "run"
    assert train_main(TRAIN + ["--dataset", "imagefolder", "--data_path", str(data), "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--data_path {data} is the root of Oxford-IIIT Pets" in err and "--dataset pets" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "probe", "finetune", "analyze"])
def test_a_command_that_fails_leaves_no_output_folder(command, checkpoints, tmp_path, capsys):
    """A data error at the start (Pets' trainval list names a missing photo; analyze: an unreadable image) leaves
    no folder, nor the parents it would have made. The probe also when every image is unreadable, an error that
    comes once feature extraction has begun. (Pretraining and fine-tuning that fail later keep their log.)"""
    data = make_layout("pets", tmp_path / "pets")
    os.remove(data / "images" / "Bengal_2.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not an image")
    out = tmp_path / "out" / "nested"
    args = ["--data_path", str(data), "--output_dir", str(out)]
    code = {"train": lambda: train_main(TRAIN + ["--eval_every", "0"] + args),
            "probe": lambda: probe_main([checkpoints["crate"]] + args + PROBE),
            "finetune": lambda: finetune_main([checkpoints["vit"]] + args + FINETUNE),
            "analyze": lambda: analyze_main([checkpoints["vit"], str(broken), "--output_dir", str(out)] + ANALYZE),
            }[command]()
    err = capsys.readouterr().err
    expected = "not an image PIL can identify" if command == "analyze" else "Bengal_2.jpg"
    assert code == 1 and expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    if command == "probe":
        data = make_layout("imagefolder", tmp_path / "folder")
        for folder, _, files in os.walk(data / "val"):
            for f in files:
                with open(os.path.join(folder, f), "wb") as handle:
                    handle.write(b"\xff\xd8 not an image")
        assert probe_main([checkpoints["crate"], "--data_path", str(data), "--output_dir", str(out)] + PROBE) == 1
        err = capsys.readouterr().err
        assert "no readable image in image folder" in err and "object at 0x" not in err
        assert not (tmp_path / "out").exists()
