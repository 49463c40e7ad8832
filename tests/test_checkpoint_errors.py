"""A file that is not a checkpoint (or not this model's) gets one line saying what it is not and what was expected,
through every reader: train --resume, probe / finetune / analyze, load_checkpoint, classifier_from_pretrained; and
never advice to load unsafely (loading stays torch.load(weights_only=True))."""
import argparse
import fractions
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import seed_of
from PIL import Image

from crate_kernels import CRATEMAE, analyze, checkpoint, classifier_from_pretrained, finetune, load_checkpoint, probe
from crate_kernels import train as train_command
from crate_kernels.errors import TrainError
from crate_kernels.models.pretrained import load_pretrained

TINY = ["--input_size", "16", "--patch_size", "4", "--epoch_size", "8", "--batch_size", "4", "--max_steps", "1",
        "--eval_every", "0", "--num_workers", "0", "--no_tensorboard"]


def _demo() -> CRATEMAE:
    """The demo architecture at the TINY size (what ``train`` builds with TINY)."""
    return CRATEMAE(img_size=16, patch_size=4, embed_dim=128, depth=3, num_heads=4)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, request):
    """{case: (path, what its one-line error must say)} for four files that are not a usable checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    gen = np.random.default_rng(seed_of(request.node.nodeid))
    words = " ".join(gen.choice(["loss", "step", "epoch", "lr"], size=12))
    (root / "notes.txt").write_text(words + "\n")
    Image.fromarray(gen.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "photo.png")
    n = int(gen.integers(40, 80))  # an unrelated network's weights, under keys none of ours has
    torch.save({f"layer{i}.conv.weight": torch.randn(2, 2) for i in range(n)}, root / "resnet.pth")
    checkpoint.save({"model": _demo().state_dict()}, str(root / "real.pth"))
    whole = (root / "real.pth").read_bytes()
    (root / "truncated.pth").write_bytes(whole[:int(gen.integers(len(whole) // 4, 3 * len(whole) // 4))])
    return {
        "text": (root / "notes.txt", f"it is not a PyTorch checkpoint (it starts like text: {words[:40]!r})"),
        "png": (root / "photo.png", "it is not a PyTorch checkpoint (it starts like a PNG image)"),
        "unrelated": (root / "resnet.pth", f"its keys look like layer0.conv.weight, layer1.conv.weight, "
                                           f"layer2.conv.weight, ... ({n} keys)"),
        "truncated": (root / "truncated.pth", "it is truncated or damaged"),
    }


CASES = ("text", "png", "unrelated", "truncated")


def _one_line_error(err: str, program: str, expected: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"{program}: error: "), err
    assert expected in err and "Traceback" not in err and "weights_only" not in err, err
    return err


@pytest.mark.parametrize("case", CASES)
def test_train_resume_says_it_in_one_line(bad_files, tmp_path, case):
    path, expected = bad_files[case]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "crate_kernels.train", *TINY, "--resume", str(path),
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    err = _one_line_error(proc.stderr, "crate-train", expected)
    assert str(path) in err and not out.exists()
    if case == "unrelated":
        assert "holds none of CRATEMAE's" in err


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", [probe, finetune, analyze], ids=["probe", "finetune", "analyze"])
def test_evaluation_commands_say_it_in_one_line(bad_files, tmp_path, capsys, case, command):
    path, expected = bad_files[case]
    out = tmp_path / "out"
    assert command.main([str(path), "--output_dir", str(out)]) == 1
    captured = capsys.readouterr()
    program = "crate-" + command.__name__.rsplit(".", 1)[-1]
    err = _one_line_error(captured.err, program, expected)
    assert str(path) in err and not out.exists()
    if case == "unrelated":
        assert "not a CRATE-MAE, ViT-MAE or supervised CRATE checkpoint" in err


@pytest.mark.parametrize("case", CASES)
def test_the_api_says_it_in_one_line(bad_files, case):
    path, expected = bad_files[case]
    model = _demo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((TrainError, ValueError)) as caught:
        load_checkpoint(model, path)
    assert expected in str(caught.value) and "\n" not in str(caught.value) and "weights_only" not in str(caught.value)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)  # nothing copied
    with pytest.raises(TrainError) as caught:
        classifier_from_pretrained(str(path), num_classes=3, log=None)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_other_kinds_of_file_are_named(tmp_path):
    state = {"w": torch.randn(3)}
    cases = {
        "empty.pth": (b"", "it is empty"),
        "page.pth": (b"<!DOCTYPE html>\n<html><head><title>Google Drive", "it starts like an HTML page"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", "a Git LFS pointer"),
        "photo.jpg": (b"\xff\xd8\xff\xe0" + os.urandom(60), "it starts like a JPEG image"),
        "random.pth": (b"\x00\x01" + os.urandom(60), "unrecognised bytes 00 01"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TrainError, match=expected):
            checkpoint.load(str(tmp_path / name))
    torch.save(state, tmp_path / "weights.safetensors")
    with pytest.raises(TrainError, match="it is not a safetensors file \\(it starts like a torch.save file\\)"):
        checkpoint.load(str(tmp_path / "weights.safetensors"))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(state))
    with pytest.raises(TrainError, match="a Python pickle not written by torch.save"):
        checkpoint.load(str(tmp_path / "plain.pkl"))
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("a.txt", "hi")
    with pytest.raises(TrainError, match=r"a ZIP archive but not a torch.save file \(no data.pkl; it holds a.txt\)"):
        checkpoint.load(str(tmp_path / "images.zip"))


def test_python_objects_are_refused_by_name_without_unsafe_advice(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"model": _demo().state_dict(), "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(TrainError) as caught:
        load_checkpoint(_demo(), path)
    message = str(caught.value)
    assert "it holds Python objects (fractions.Fraction) that weights-only loading refuses" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_partial_mismatch_is_a_short_summary(tmp_path, capsys):
    state = _demo().state_dict()
    layer = int(torch.randint(0, 3, ()))
    dropped = [k for k in state if k.startswith(f"blocks.{layer}.")]
    partial = {k: v for k, v in state.items() if k not in dropped} | {"head.weight": torch.zeros(2, 128)}
    with pytest.raises(ValueError) as caught:
        load_checkpoint(_demo(), {"model": partial})
    message = str(caught.value)
    assert message == (f"the checkpoint does not match this CRATEMAE's {len(state)} tensors: missing "
                       f"{', '.join(dropped[:3])}, ... ({len(dropped)} keys); unexpected head.weight (1 key)")
    path = tmp_path / "partial.pth"
    torch.save({"model": {"module." + k: v for k, v in partial.items()}}, path)
    out = tmp_path / "run"
    assert train_command.main(TINY + ["--threads", "0", "--resume", str(path), "--output_dir", str(out)]) == 1
    err = _one_line_error(capsys.readouterr().err, "crate-train", f"cannot resume from {path}: {message}")
    assert len(err) < 400 and not out.exists()


def test_a_checkpoint_of_maes_training_script_loads_its_weights(tmp_path):
    """MAE's main_pretrain.py (which the CRATE-MAE release points to) saves model (DDP's 'module.' keys when run
    distributed), optimizer, epoch, scaler and its flags as an argparse.Namespace; the weights load, safely."""
    source = _demo()
    state = source.state_dict()
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 799, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_crate_base")},
               path)
    assert list(checkpoint.load(str(path))) == ["model"]
    model = _demo()
    load_checkpoint(model, path)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    assert load_pretrained(str(path)).model == "demo"
