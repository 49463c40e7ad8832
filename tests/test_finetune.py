"""python -m crate_kernels.finetune: the recipe's pieces (layer-wise lr decay, mixup/cutmix, RandAugment), end to end
on tiny models and each dataset layout, exact resume after a stop signal, and bad inputs."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from image_folders import colour_folder
from PIL import Image
from safetensors.torch import load_file

from crate_kernels import CRATEClassifier, ViTClassifier, checkpoint
from crate_kernels.finetune import main, resolve
from crate_kernels.models.vit_mae import MaskedAutoencoderViT
from crate_kernels.pipeline.recipe import (
    ImageAugment,
    layer_decay_groups,
    mix_batch,
    randaug_settings,
    smoothed_one_hot,
)

# Fine-tuning settings of the end-to-end tests: batches of 8, logged every step; workers left at their default.
TINY = ["--batch_size", "8", "--epochs", "2", "--warmup_steps", "2", "--log_every", "1", "--no_tensorboard",
        "--blr", "1e-2", "--seed", "3"]


def _records(folder, kind):
    with open(os.path.join(folder, "log.txt")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


# ---------------------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("family", ["crate", "vit"])
def test_layer_decay_groups_scale_each_layer_and_cover_every_trainable_parameter_once(family):
    depth, decay = 3, 0.7
    if family == "crate":
        model = CRATEClassifier(5, img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2)
    else:
        model = ViTClassifier(5, img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, global_pool=True)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=decay)
    names = [n for g in groups for n in g["param_names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    assert "pos_embed" not in names  # a fixed table
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    top = depth + 1
    assert scale["patch_embed.proj.weight"] == pytest.approx(decay ** top)
    assert scale["cls_token"] == pytest.approx(decay ** top)
    for i in range(depth):
        in_block = [n for n in names if n.startswith(f"blocks.{i}.")]
        assert in_block and all(scale[n] == pytest.approx(decay ** (top - i - 1)) for n in in_block)
    assert scale["head.weight"] == 1.0 and scale["head.bias"] == 1.0
    assert wd["head.weight"] == 0.05 and wd["head.bias"] == 0.0 and wd["cls_token"] == 0.0
    assert all(wd[n] == 0.0 for n in names if n.endswith(".bias") or "norm" in n)
    params = dict(model.named_parameters())
    for g in groups:  # the tensors are the named ones
        assert all(p is params[n] for n, p in zip(g["param_names"], g["params"]))


def test_smoothed_targets_sum_to_one():
    labels = torch.randint(0, 7, (11,))
    t = smoothed_one_hot(labels, 7, 0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(11))
    assert torch.allclose(t.gather(1, labels[:, None]).squeeze(1), torch.full((11,), 0.9 + 0.1 / 7))


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_targets_sum_to_one_and_weigh_the_pixels_they_mix(mixup, cutmix):
    torch.manual_seed(int(mixup * 10 + cutmix))
    b = 6
    labels = torch.arange(b)  # distinct classes: target[i] holds lam at i and 1 - lam at the mirror's class
    imgs = (labels + 1).double().view(b, 1, 1, 1).expand(b, 3, 20, 24).clone()  # image i is the constant i + 1
    kinds = set()
    for _ in range(30):
        mixed, targets = mix_batch(imgs, labels, b, mixup, cutmix, 0.5, smoothing=0.0)
        torch.testing.assert_close(targets.sum(1), torch.ones(b, dtype=targets.dtype))
        for i in range(b):
            j = b - 1 - i
            lam = targets[i, i].item() if i != j else 1.0
            own = mixed[i] == imgs[i]
            if bool((own | (mixed[i] == imgs[j])).all()) and (cutmix > 0):  # cutmix: pasted pixels or own ones
                kinds.add("cutmix")
                assert own.double().mean().item() == pytest.approx(lam, abs=1e-6)  # lam is the unpasted share
            else:
                kinds.add("mixup")
                torch.testing.assert_close(mixed[i], lam * imgs[i] + (1 - lam) * imgs[j], rtol=0, atol=1e-6)
    assert kinds == {k for k, alpha in (("mixup", mixup), ("cutmix", cutmix)) if alpha > 0}
    plain, targets = mix_batch(imgs, labels, b, 0.0, 0.0, 0.5, smoothing=0.1)
    assert plain is imgs and torch.allclose(targets.sum(1), torch.ones(b))


@pytest.mark.parametrize("m,reprob", [(9, 0.0), (0, 1.0), (9, 0.25)])
def test_image_augment_is_a_function_of_the_seed_and_keeps_uint8(m, reprob):
    pytest.importorskip("kornia")
    view = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    augment = ImageAugment(2, m, reprob)
    state = torch.get_rng_state()
    a, b, c = augment(view, 11), augment(view, 11), augment(view, 12)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert a.dtype == torch.uint8 and a.shape == view.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    if m == 0:  # erasing alone: a box of the mean colour, the rest untouched
        erased = (a != view).any(0)
        mean = torch.tensor([round(255 * v) for v in (0.485, 0.456, 0.406)], dtype=torch.uint8)
        assert erased.any() and (a.permute(1, 2, 0)[erased] - mean.int()).abs().max() <= 1
        rows, cols = erased.nonzero().unbind(1)
        box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.9  # one rectangle (a few box pixels may equal the mean colour already)


# ---------------------------------------------------------------------------------------------- end to end
def _finetune_cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "crate_kernels.finetune", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.mark.e2e
def test_end_to_end_on_the_default_digits_writes_scores_best_model_and_resumes_to_nothing(run_dir, tmp_path):
    out = tmp_path / "ft"
    proc = _finetune_cli([str(run_dir), *TINY, "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CRATEClassifier:" in proc.stdout and "parameters" in proc.stdout and "dropped (the decoder)" in proc.stdout
    files = set(os.listdir(out))
    assert {"args.yaml", "log.txt", "checkpoint-last.pth", "model.safetensors", "model-best.safetensors",
            "results.json"} <= files
    evals = _records(out, "eval")
    steps_per_epoch = 1201 // 8
    assert [r["step"] for r in evals] == [steps_per_epoch, 2 * steps_per_epoch]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 and r["test_images"] == 596 for r in evals)
    results = json.loads((out / "results.json").read_text())
    best = max(evals, key=lambda r: r["top1"])
    assert results["best"]["top1"] == best["top1"] and results["final"]["top1"] == evals[-1]["top1"]
    assert best["top1"] > 20.0  # ten classes: chance is 10%
    meta_best = load_file(out / "model-best.safetensors")
    clf = CRATEClassifier(10, img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)
    clf.load_state_dict(meta_best)  # the classifier's own layout, loadable as it is
    again = _finetune_cli([str(run_dir), *TINY, "--output_dir", str(out)])
    assert again.returncode == 0 and len(_records(out, "train")) == 2 * steps_per_epoch


def _cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = np.random.default_rng(1)
    for name, count in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        labels = [int(v) for v in gen.integers(0, 10, count)]
        data = gen.integers(0, 256, (count, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    return root


def _flowers(root):
    from scipy.io import savemat

    (root / "jpg").mkdir(parents=True)
    for i in range(1, 13):
        Image.fromarray(np.full((18, 22, 3), 20 * i, np.uint8)).save(root / "jpg" / f"image_{i:05d}.jpg")
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 3] * 4])})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 3, 4, 5, 6]]), "valid": np.array([[7, 8, 9]]),
                                 "tstid": np.array([[10, 11, 12]])})
    return root


def _pets(root):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rows = {"trainval": [], "test": []}
    for c, breed in enumerate(("Abyssinian", "beagle", "Bengal"), start=1):
        for i in range(4):
            name = f"{breed}_{i}"
            Image.fromarray(np.full((20, 16, 3), 60 * c, np.uint8)).save(root / "images" / f"{name}.jpg")
            rows["trainval" if i < 3 else "test"].append(f"{name} {c} 1 {i}")
    for split, lines in rows.items():
        (root / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("layout", ["imagefolder", "cifar10", "flowers102", "pets"])
def test_each_dataset_layout_end_to_end(run_dir, tmp_path, layout, one_thread):
    data = {"imagefolder": colour_folder, "cifar10": _cifar10, "flowers102": _flowers, "pets": _pets}[layout](
        tmp_path / "data")
    out = tmp_path / "ft"
    assert main([str(run_dir), "--data_path", str(data), "--batch_size", "4", "--max_steps", "3", "--no_tensorboard",
                 "--num_workers", "0", "--threads", "0", "--output_dir", str(out)]) == 0
    evals = _records(out, "eval")
    assert evals and evals[-1]["step"] == 3 and evals[-1]["test_images"] > 0
    with open(out / "args.yaml") as f:
        assert f"dataset: {layout}" in f.read()


@pytest.mark.parametrize("family", ["crate", "vit"])
def test_a_release_checkpoint_fine_tunes(tmp_path, capsys, one_thread, family):
    from crate_kernels import CRATEMAE
    from crate_kernels.models.registry import MODELS

    torch.manual_seed(0)
    if family == "vit":
        mae = MaskedAutoencoderViT(img_size=16, patch_size=4, **MODELS["mae_vit_demo"])
        name, clf_class = "mae_vit_demo", ViTClassifier
    else:
        mae, name, clf_class = CRATEMAE(img_size=16, patch_size=4, **MODELS["demo"]), "demo", CRATEClassifier
    release = tmp_path / "release.pth"
    torch.save({"model": {f"module.{k}": v for k, v in mae.state_dict().items()}}, release)  # the releases' format
    out = tmp_path / "ft"
    assert main([str(release), "--max_steps", "2", "--batch_size", "4", "--num_workers", "0", "--threads", "0",
                 "--no_tensorboard", "--grad_checkpointing", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{clf_class.__name__}:" in printed and f"{name} (" in printed and "16px, patch 4)" in printed
    assert _records(out, "eval")[-1]["step"] == 2
    clf = clf_class(10, img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)
    clf.load_state_dict(load_file(out / "model.safetensors"))


def test_recipe_given_in_the_same_run_must_match_to_resume_and_nothing_is_written(run_dir, tmp_path, capsys,
                                                                                   one_thread):
    out = tmp_path / "ft"
    args = [str(run_dir), "--batch_size", "8", "--max_steps", "2", "--num_workers", "0", "--threads", "0",
            "--no_tensorboard", "--output_dir", str(out)]
    assert main(args) == 0
    before = {name: os.path.getmtime(out / name) for name in os.listdir(out) if name != ".lock"}
    capsys.readouterr()
    assert main(args + ["--smoothing", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "smoothing 0.1 -> 0.2" in err and "new --output_dir" in err
    assert {name: os.path.getmtime(out / name) for name in os.listdir(out) if name != ".lock"} == before
    # MAE's --eval: the fine-tuned model tested again gives the run's own final score, and nothing is written
    final = _records(out, "eval")[-1]
    outside = set(os.listdir(tmp_path))
    for source in ([str(out)], [str(run_dir), "--resume", str(out / "model.safetensors")],
                   ["--finetune", str(out / "checkpoint-last.pth"), "--no_dist_eval"]):
        assert main(source + ["--eval", "--batch_size", "8", "--num_workers", "0"]) == 0
        text = capsys.readouterr().out
        assert f"top-1 {final['top1']:.2f}%, top-5 {final['top5']:.2f}%" in text and "on 596 images" in text
    assert {name: os.path.getmtime(out / name) for name in os.listdir(out) if name != ".lock"} == before
    assert set(os.listdir(tmp_path)) == outside and not (run_dir.parent / "finetune").exists()


def test_bad_inputs_are_one_message_before_anything_is_written(run_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main([str(run_dir), "--nb_classes", "1000", "--output_dir", str(out)]) == 2
    assert "--nb_classes 1000 disagrees with the data: " in capsys.readouterr().err and not out.exists()
    assert main([str(run_dir), "--eval", "--output_dir", str(out)]) == 1  # a pretrained encoder has no head to test
    assert "--eval needs a fine-tuned checkpoint" in capsys.readouterr().err and not out.exists()
    assert main([str(tmp_path / "missing"), "--output_dir", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    not_a_model = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, not_a_model)
    assert main([str(not_a_model), "--output_dir", str(out)]) == 1
    assert "not a CRATE-MAE, ViT-MAE or supervised CRATE checkpoint" in capsys.readouterr().err
    assert main([str(run_dir), "--data_path", str(tmp_path), "--output_dir", str(out)]) == 1
    assert "none of the labelled layouts" in capsys.readouterr().err
    colour_folder(tmp_path / "mismatch", (("train", 2), ("val", 1)))
    (tmp_path / "mismatch" / "val" / "purple").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mismatch" / "val" / "purple" / "0.png")
    assert main([str(run_dir), "--data_path", str(tmp_path / "mismatch"), "--output_dir", str(out)]) == 1
    assert "not in train/: purple" in capsys.readouterr().err
    assert main([str(run_dir), "--layer_decay", "1.5"]) == 2
    assert "--layer_decay must lie in (0, 1]" in capsys.readouterr().err
    assert main([str(run_dir), "--input_size", "18", "--output_dir", str(out)]) == 2
    assert "multiple of the checkpoint's patch size (4)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.e2e
def test_a_stop_signal_then_resume_reproduces_the_uninterrupted_run_bitwise(run_dir, tmp_path):
    """With RandAugment, random erasing, mixup and cutmix all on, and the default data-loading workers."""
    pytest.importorskip("kornia")
    # 18 steps an epoch: tests at steps 18, 36 and 45, the stop after the first of them
    args = [str(run_dir), "--batch_size", "64", "--max_steps", "45", "--save_every", "5", "--log_every", "1",
            "--recipe", "mae", "--no_tensorboard", "--threads", "1", "--seed", "4"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = _finetune_cli(args + ["--output_dir", str(reference)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RandAugment(n 2, m 9, mstd 0.5, increasing), random erasing 0.25" in done.stdout  # MAE's --aa default

    proc = subprocess.Popen([sys.executable, "-m", "crate_kernels.finetune", *args, "--output_dir", str(victim)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (victim / "log.txt").exists() or not any(r["step"] >= 22 for r in _records(victim, "train")):
        assert proc.poll() is None, "the run finished before it could be stopped"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    stopped_at = checkpoint.load(victim / "checkpoint-last.pth")["step"]
    assert 20 <= stopped_at < 36

    resumed = _finetune_cli(args + ["--output_dir", str(victim)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {victim}/checkpoint-last.pth at step {stopped_at}" in resumed.stdout
    expected = [(r["step"], r["loss"]) for r in _records(reference, "train")]
    assert [(r["step"], r["loss"]) for r in _records(victim, "train")] == expected  # bitwise, every step once
    a, b = load_file(reference / "model.safetensors"), load_file(victim / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _records(reference, "eval")] == [18, 36, 45]
    assert [r["top1"] for r in _records(victim, "eval")] == [r["top1"] for r in _records(reference, "eval")]


def test_start_epoch_starts_at_that_epoch_and_exact_resume_overrides_it(run_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "ft"
    args = [str(run_dir), "--batch_size", "64", "--epochs", "2", "--start_epoch", "1", "--warmup_epochs", "1",
            "--log_every", "1", "--num_workers", "0", "--no_tensorboard", "--output_dir", str(out)]
    assert main(args) == 0
    steps_per_epoch = 1201 // 64
    train = _records(out, "train")
    assert [r["step"] for r in train] == list(range(steps_per_epoch + 1, 2 * steps_per_epoch + 1))
    assert train[0]["lr"] == pytest.approx(1e-2 * 64 / 256)  # epoch 1's lr: the warmup (epoch 0) is over
    assert [r["step"] for r in _records(out, "eval")] == [2 * steps_per_epoch]
    capsys.readouterr()
    assert main(args) == 0  # the finished run resumes its own step, not --start_epoch's
    assert "--start_epoch 1 is not used" in capsys.readouterr().out
    assert main(args[:1] + ["--start_epoch", "2", "--epochs", "2"]) == 2
    assert "--start_epoch (2) must be below --epochs (2)" in capsys.readouterr().err


@pytest.mark.parametrize("aa, expected", [
    ("rand-m9-mstd0.5-inc1", dict(randaug_m=9, randaug_n=2, randaug_mstd=0.5, randaug_inc=True)),
    ("rand-m7-n3", dict(randaug_m=7, randaug_n=3, randaug_mstd=0.0, randaug_inc=False)),
    ("rand-n1-inc0-mstd101", dict(randaug_m=10, randaug_n=1, randaug_mstd=101.0, randaug_inc=False)),
    ("rand", dict(randaug_m=10, randaug_n=2, randaug_mstd=0.0, randaug_inc=False)),
    ("none", dict(randaug_m=0)),
])
def test_mae_aa_strings_set_the_randaugment_flags(aa, expected):
    assert randaug_settings(aa, {}) == expected
    cfg = resolve(["--aa", aa])
    assert {k: cfg[k] for k in expected} == expected and "aa" not in cfg
    assert resolve(["--aa", aa, "--randaug_m", str(expected["randaug_m"])])["randaug_m"] == expected["randaug_m"]


@pytest.mark.parametrize("aa, message", [
    ("rand-m9-x3", "cannot read the part 'x3'"), ("rand-mfoo", "cannot read the part 'mfoo'"),
    ("rand-inc2", "cannot read the part 'inc2'"), ("rand-m9-p0.5", "cannot read the part 'p0.5'"),
    ("v0", "only RandAugment strings are supported"), ("augmix-m5", "only RandAugment strings"),
    ("rand-m11", "the magnitude must lie in 0..10"), ("rand-m9-n0", "the operations be at least 1"),
])
def test_bad_aa_strings_name_the_flag_and_the_grammar(aa, message, capsys):
    assert main(["--aa", aa]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert f"--aa {aa!r}" in err and "rand[-m<magnitude 0-10>][-n<operations>][-mstd<std>][-inc<0|1>]" in err


def test_mae_flags_map_onto_ours(capsys):
    cfg = resolve(["--finetune", "a.pth", "--global_pool", "--nb_classes", "10", "--no_dist_eval"])
    assert cfg["checkpoint"] == "a.pth" and cfg["pool"] == "mean" and cfg["nb_classes"] == 10
    assert cfg["dist_eval"] is False and resolve([])["dist_eval"] is True
    assert resolve(["--cls_token"])["pool"] == "cls" and resolve([])["pool"] == "cls"  # the paper's [CLS] feature
    for bad, message in ((["b.pth", "--finetune", "a.pth"], "--finetune a.pth and the positional checkpoint b.pth"),
                         (["--global_pool", "--pool", "cls"], "ask for different pooling"),
                         (["--aa", "rand-m9", "--randaug_m", "5"], "--aa sets --randaug_m 9, but --randaug_m 5"),
                         (["--nb_classes", "0"], "--nb_classes must be positive")):
        assert main(bad) == 2 and message in capsys.readouterr().err


def test_randaugment_magnitude_noise_is_drawn_per_image_within_0_to_10():
    """timm's magnitude noise: N(m, mstd) clipped to [0, 10] per image; mstd >= 100: uniform on [0, m]. Means are
    judged against the exact clipped-normal mean within 5 standard errors (m = 9 sits 2 sigma below the clip)."""
    pytest.importorskip("kornia")
    m, mstd, n = int(torch.randint(1, 10, ())), 0.5, 4000
    aug = ImageAugment(2, m, 0.0, mstd=mstd, inc=True)
    draws = torch.tensor([aug.magnitude() for _ in range(n)], dtype=torch.float64)
    assert draws.min() >= 0 and draws.max() <= 10 and draws.std() > 0.4
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    lo, hi = (0 - m) / mstd, (10 - m) / mstd
    clipped_mean = m * (cdf(hi) - cdf(lo)) + mstd * (pdf(lo) - pdf(hi)) + 10 * (1 - cdf(hi))
    assert abs(draws.mean().item() - clipped_mean) < 5 * draws.std().item() / math.sqrt(n)
    assert ImageAugment(2, m, 0.0).magnitude() == m  # mstd 0: fixed
    uniform = ImageAugment(2, m, 0.0, mstd=100)
    u = torch.tensor([uniform.magnitude() for _ in range(2000)], dtype=torch.float64)
    assert u.min() >= 0 and u.max() <= m and abs(u.mean().item() - m / 2) < 5 * (m / math.sqrt(12)) / math.sqrt(2000)
    view = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(aug(view, 7), aug(view, 7))  # the drawn magnitude too is a function of the seed


def test_help_lists_the_recipe_flags(capsys):
    with pytest.raises(SystemExit):
        resolve(["--help"])
    text = capsys.readouterr().out
    for flag in ("--layer_decay", "--mixup", "--cutmix", "--smoothing", "--randaug_m", "--reprob", "--recipe",
                 "--aa", "--eval", "--dist_eval", "--start_epoch", "--finetune", "--global_pool", "--nb_classes"):
        assert flag in text


@pytest.mark.e2e
def test_two_process_ddp_matches_one_process_and_tests_the_whole_split(run_dir, tmp_path):
    args = [str(run_dir), "--max_steps", "4", "--save_every", "2", "--log_every", "1", "--no_tensorboard",
            "--num_workers", "0", "--blr", "1e-2"]
    one, two = tmp_path / "one", tmp_path / "two"
    done = _finetune_cli(args + ["--batch_size", "8", "--threads", "1", "--output_dir", str(one)])
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "crate_kernels.finetune", *args, "--batch_size", "4", "--output_dir", str(two)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _records(one, "train"), _records(two, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and [r["lr"] for r in a] == [r["lr"] for r in b]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]),
                               rtol=1e-4, atol=1e-6)
    (ea,), (eb,) = _records(one, "eval"), _records(two, "eval")
    assert ea["test_images"] == eb["test_images"] == 596  # each test image counted once over the two shards
    assert abs(ea["top1"] - eb["top1"]) <= 100 / 596 + 1e-9 and ea["eval_loss"] == pytest.approx(eb["eval_loss"],
                                                                                                    rel=1e-3)
    # MAE's --eval under torchrun: each process tests its share (--dist_eval, the default), rank 0 prints the total
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "crate_kernels.finetune", str(one), "--eval", "--batch_size", "8", "--num_workers", "0"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("top-1") == 1 and "on 596 images" in proc.stdout
    shown = float(proc.stdout.split("top-1 ")[1].split("%")[0])
    assert abs(shown - ea["top1"]) <= 100 / 596 + 0.01
